"""Bad input to `python -m pec.export` and `python -m pec.sample` through their main(argv): one line on stderr, no
traceback, exit 2 for input refused before any work (naming the argument at fault), exit 1 for a failure while
writing, which leaves no partial export. One tiny embedded LoRA run (2 prompts x 3 samples, 2 denoising steps,
one step) and its LoRA export serve every case."""
import errno
import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared helpers in tests/

from _tiny_runs import tiny_config  # noqa: E402
from pec import export as export_module  # noqa: E402
from pec.experiments.tiny_world import write_tiny_world  # noqa: E402
from pec.export import LORA_WEIGHTS, main as export_main  # noqa: E402
from pec.sample import main as sample_main  # noqa: E402
from pec.trainer import Trainer  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-step LoRA run of the tiny world, with its LoRA export beside it (run.parent / "export")."""
    root = tmp_path_factory.mktemp("runs")
    world = write_tiny_world(root / "world")
    folder = root / "run"
    Trainer(tiny_config(world, folder)).run()
    export_main([str(folder), "--out", str(root / "export")])
    return folder


def _one_line_error(entry, argv, code=2) -> str:
    """The one line an entry point refuses `argv` with (exit `code`: 2 = input refused before any work)."""
    with pytest.raises(SystemExit) as exit_info:
        entry(argv)
    message = str(exit_info.value)
    assert exit_info.value.code == code, message
    assert "\n" not in message and "Traceback" not in message, message
    return message


def test_bad_export_arguments(run, tmp_path):
    out = ["--out", str(tmp_path / "out")]
    not_empty = tmp_path / "not-empty"
    not_empty.mkdir()
    (not_empty / "notes.txt").write_text("mine")
    no_checkpoint = tmp_path / "no-checkpoint"
    no_checkpoint.mkdir()
    shutil.copy(run / "config.yaml", no_checkpoint)
    cases = [
        ([str(tmp_path / "missing"), *out], "not a run folder"),  # a missing run
        ([str(run.parent / "world"), *out], "not a run folder"),  # a folder that is no run
        ([str(no_checkpoint), *out], "no checkpoint"),
        ([f"{run}@x", *out], "@STEP must be a step number"),
        ([f"{run}@7", *out], "no checkpoint of step 7; it holds steps [1]"),
        ([str(run), "--out", str(not_empty)], "exists and is not empty"),
        ([str(run), "--out", str(not_empty), "--force"], "holds no earlier export"),  # --force deletes only exports
        ([str(run), "--out", str(run / "config.yaml")], "is not a folder"),
        ([str(run), *out, "--link"], "--link"),  # a LoRA export copies nothing from the base model
        ([str(run), *out, "--table", str(tmp_path / "nowhere")], "--table"),
    ]
    for argv, expected in cases:
        message = _one_line_error(export_main, argv)
        assert message.startswith("pec.export: ") and expected in message, (argv, message)
    assert (not_empty / "notes.txt").read_text() == "mine" and not (tmp_path / "out").exists()
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    (moved / "config.yaml").write_text((run / "config.yaml").read_text().replace(
        str(run.parent / "world" / "embedded"), str(tmp_path / "gone")))
    message = _one_line_error(export_main, [str(moved), *out])
    assert "--model.path" in message and "gone" in message and "not there" in message, message


def test_a_failed_write_leaves_no_partial_export(run, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_module, "atomic_write_text", full_disk)
    message = _one_line_error(export_main, [str(run), "--out", str(tmp_path / "out")], code=1)
    assert "No space left on device" in message
    assert list(tmp_path.iterdir()) == []  # neither the export nor its temporary folder


def test_bad_sample_arguments(run, tmp_path):
    export = run.parent / "export"
    prompt, out = ["--prompt", "a handwritten 7"], ["--out", str(tmp_path / "out")]
    not_empty = tmp_path / "not-empty"
    not_empty.mkdir()
    (not_empty / "notes.txt").write_text("mine")
    empty_file = tmp_path / "prompts.txt"
    empty_file.write_text("\n")
    cases = [
        ([str(run), *out], "--prompt TEXT (repeatable) or --prompts FILE"),
        ([str(run), *prompt, "--prompts", str(empty_file), *out], "not both or neither"),
        ([str(run), "--prompts", str(empty_file), *out], "--prompts"),
        ([str(run), "--prompts", str(tmp_path / "none.txt"), *out], "--prompts"),
        ([str(run), "--prompt", " ", *out], "--prompt must not be empty"),
        ([str(run), *prompt, "--n", "0", *out], "--n must be >= 1"),
        ([str(run), *prompt, "--seed", "-1", *out], "--seed must be >= 0"),
        ([str(tmp_path / "missing"), *prompt, *out], "neither a run folder"),
        ([f"{run}@x", *prompt, *out], "@STEP must be a step number"),
        ([f"{run}@7", *prompt, *out], "no checkpoint of step 7"),
        ([f"{export}@1", *prompt, *out], "an export holds one model"),
        ([str(run), *prompt, "--out", str(not_empty)], "exists and is not empty"),
        ([str(run), *prompt, "--reward", "nope", *out], "--reward"),
        ([str(run), *prompt, "--eval.num_steps", "0", *out], "eval.num_steps"),
        ([str(run), *prompt, "--eval.guidance", "true", *out], "eval.guidance needs a PCGS guided run"),
        ([str(run), *prompt, "--method", "pcgs", "--pcgs.form", "guided", "--eval.guidance", "true", "--n", "3",
          "--eval.batch", "2", *out], "leave a call with 1"),  # a lone image has nothing to be guided away from
    ]
    for argv, expected in cases:
        message = _one_line_error(sample_main, argv)
        assert message.startswith("pec.sample: ") and expected in message, (argv, message)
    assert (not_empty / "notes.txt").read_text() == "mine" and not (tmp_path / "out").exists()


def test_bad_exports_given_to_sample(run, tmp_path):
    prompt, out = ["--prompt", "a handwritten 7"], ["--out", str(tmp_path / "out")]
    merged = tmp_path / "merged"
    export_main([str(run), "--out", str(merged), "--merge"])
    message = _one_line_error(sample_main, [str(merged), *prompt, "--model.path", str(run), *out])
    assert "--model.path" in message and "whole-model export" in message, message

    def broken(name, change):
        folder = tmp_path / name
        shutil.copytree(run.parent / "export", folder)
        change(folder)
        return folder

    def manifest(folder, **fields):
        path = folder / "export.json"
        data = json.loads(path.read_text())
        for key, value in fields.items():
            data[key] = value
        path.write_text(json.dumps(data))

    cases = [
        (broken("bad-json", lambda f: (f / "export.json").write_text("{")), "not valid JSON"),
        (broken("bad-format", lambda f: manifest(f, format=99)), "not an export manifest of format 1"),
        (broken("no-lora", lambda f: (f / LORA_WEIGHTS).unlink()), f"LoRA file {LORA_WEIGHTS} (named in export.json)"),
        (broken("gone-base", lambda f: manifest(f, model={"name": "embedded", "path": str(tmp_path / "gone"),
                                                         "revision": None})), "--model.path"),
    ]
    for folder, expected in cases:
        message = _one_line_error(sample_main, [str(folder), *prompt, *out])
        assert expected in message, (folder.name, message)
