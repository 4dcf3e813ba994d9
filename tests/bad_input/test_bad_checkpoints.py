"""Bad checkpoints through the real entry points (issue 17): a crafted pickle never runs under
`pec.train --resume`, `pec.evaluate RUN` or the converter without --trusted, and the user gets one line
naming the file and the converter; a format-2 run resumes exactly once converted; a stray higher-numbered
file cannot make rotation delete the new checkpoints; a checkpoint of another LoRA rank is one line in
`pec.evaluate`; a FIFO, folder or dangling symlink named like a checkpoint neither hangs nor stops
evaluation or resume. All on one tiny 3-step run (2 prompts x 3 samples, 2 denoising steps)."""
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared helpers in tests/

from _checkpoints import deadline, rewrite_as_format2, write_crafted  # noqa: E402
from _tiny_runs import tiny_config  # noqa: E402
from pec.checkpoint import main as checkpoint_main  # noqa: E402
from pec.evaluate import main as evaluate_main  # noqa: E402
from pec.experiments.tiny_world import write_tiny_world  # noqa: E402
from pec.logging_utils import read_metrics  # noqa: E402
from pec.trainer import Trainer  # noqa: E402
from pec.train import main as train_main  # noqa: E402

STEP = "step-{:08d}.pt".format
EVAL = ["--eval.images_per_prompt", "6", "--eval.batch", "30"]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """An uninterrupted 3-step pec run with a feature bank (so `extra` holds tensors), every checkpoint kept."""
    world = write_tiny_world(tmp_path_factory.mktemp("tiny_world"))
    run = tmp_path_factory.mktemp("runs") / "full"
    Trainer(tiny_config(world, run, method="pec", train={"steps": 3}, logging={"keep_checkpoints": 3},
                        perceptual={"k": 1, "scope": "batch", "bank_steps": 2})).run()
    return run


def _cut(full, folder, through):
    """A copy of the `full` run as if it had stopped after step `through` (its later metric rows are
    dropped on resume)."""
    run = folder / "run"
    shutil.copytree(full, run)
    for path in (run / "checkpoints").iterdir():
        if int(path.name[5:13]) > through:
            path.unlink()
    return run


def _metrics(run):
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in read_metrics(run / "metrics.jsonl")]


def _one_line_error(entry, argv, code=2):
    """The one line an entry point refuses `argv` with (exit `code`: 2 = input refused before any work)."""
    with pytest.raises(SystemExit) as exit_info:
        entry(argv)
    message = str(exit_info.value)
    assert exit_info.value.code == code, message
    assert "\n" not in message and "Traceback" not in message, message
    return message


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the bare pickle
@pytest.mark.parametrize("zip_format", [True, False], ids=["torch_save", "bare_pickle"])
def test_a_crafted_checkpoint_never_runs_and_the_error_names_it_and_the_converter(full, tmp_path, zip_format):
    run = _cut(full, tmp_path, through=0)
    marker = tmp_path / "code_ran"
    crafted = write_crafted(run / "checkpoints" / STEP(1), marker, zip_format=zip_format)
    convert = f"python -m pec.checkpoint convert {run} --trusted"
    for entry, argv in [(train_main, ["--run-dir", str(run), "--resume"]),
                        (evaluate_main, [str(run), "--out", str(tmp_path / "eval"), *EVAL]),
                        (evaluate_main, [f"{run}@1", "--out", str(tmp_path / "eval"), *EVAL])]:
        message = _one_line_error(entry, argv)
        assert crafted.name in message and "full pickle" in message and "convert" in message, message
        assert convert in message or f"python -m pec.checkpoint convert {crafted} --trusted" in message, message
        assert not marker.exists()
    message = _one_line_error(checkpoint_main, ["convert", str(crafted)])
    assert "--trusted" in message and "nothing was read" in message
    assert not marker.exists()


def test_a_format2_run_is_refused_then_resumes_exactly_once_converted(full, tmp_path, capsys):
    run = _cut(full, tmp_path, through=1)
    rewrite_as_format2(run / "checkpoints" / STEP(1))
    message = _one_line_error(train_main, ["--run-dir", str(run), "--resume"])
    assert f"python -m pec.checkpoint convert {run} --trusted" in message
    checkpoint_main(["convert", str(run), "--trusted"])
    assert "converted (format 2 -> 3)" in capsys.readouterr().out
    train_main(["--run-dir", str(run), "--resume"])
    assert f"{STEP(1)} (step 1)" in capsys.readouterr().err
    assert _metrics(run) == _metrics(full)


def test_a_stray_higher_checkpoint_never_makes_rotation_delete_the_new_ones(full, tmp_path, capsys):
    run = _cut(full, tmp_path, through=1)
    stray = run / "checkpoints" / STEP(99)
    stray.write_bytes(b"a torn copy")
    train_main(["--run-dir", str(run), "--resume", "--logging.keep_checkpoints", "1", "--train.stop_after", "1"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [STEP(2), STEP(99)]
    capsys.readouterr()
    train_main(["--run-dir", str(run), "--resume"])
    err = capsys.readouterr().err
    assert f"skipping checkpoint {stray}" in err and f"{STEP(2)} (step 2)" in err
    assert _metrics(run) == _metrics(full)


def test_evaluate_refuses_a_checkpoint_of_another_lora_rank_in_one_line(full, tmp_path):
    for run in (str(full), f"{full}@2"):
        message = _one_line_error(evaluate_main, [run, "--train.lora_rank", "4", "--out", str(tmp_path), *EVAL])
        assert "train.lora_rank is 8 in the checkpoint but 4 now" in message, message


def test_entries_that_are_not_files_neither_hang_nor_stop_evaluate_or_resume(full, tmp_path, capsys):
    run = _cut(full, tmp_path, through=2)
    folder = run / "checkpoints"
    os.mkfifo(folder / STEP(3))
    (folder / STEP(4)).mkdir()
    (folder / STEP(5)).symlink_to(tmp_path / "nowhere")
    (folder / STEP(6)).symlink_to(folder / STEP(4))
    with deadline(60):
        evaluate_main([str(run), "--out", str(tmp_path / "eval"), *EVAL])
        err = capsys.readouterr().err
        train_main(["--run-dir", str(run), "--resume"])
    for step, why in [(3, "is not a regular file (a FIFO)"), (4, "is not a regular file (a directory)"),
                      (5, "cannot be read"), (6, "is not a regular file (a directory)")]:
        assert f"skipping checkpoint {folder / STEP(step)}: {why}" in err
    assert f"{STEP(2)} (step 2)" in capsys.readouterr().err
    assert _metrics(run) == _metrics(full)
