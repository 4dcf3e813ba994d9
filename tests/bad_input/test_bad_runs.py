"""Bad input and a hostile environment through the real entry points: every expected failure is one line
on stderr with no traceback and the exit code of README's table (2: input refused before any work, 1: a
failure during the run), and nothing already written is lost.

CI runs as root, so a folder cannot be made read-only with chmod: the writes fail instead (os.replace or
open patched to raise ENOSPC)."""
import builtins
import errno
import os
import signal
import socket
import sys
from pathlib import Path

import pytest
import yaml

from pec.checkpoint import checkpoint_files
from pec.config import Config, to_dict
from pec.evaluate import main as evaluate_main
from pec.experiments.guidance_sweep import main as guidance_sweep_main
from pec.experiments import paper_table
from pec.logging_utils import read_metrics
from pec.pretrain import main as pretrain_main
from pec.rewards import REWARDS
from pec.run_safety import Preempted
from pec.train import main as train_main
from tests._tiny_runs import tiny_config

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@REWARDS.register("server_gone_at_call1")
def build_gone_reward(device="cpu", directory=None):
    """A reward whose server is gone by the first step (what the http reward raises then)."""
    def score(images, prompts):
        raise ConnectionError("reward server http://127.0.0.1:9/ (--paths.reward_url) did not answer after 4 tries")
    return score


@REWARDS.register("sigterm_at_call1")
def build_sigterm_reward(device="cpu", directory=None):
    """A reward during which SIGTERM arrives in step 1 (what the preemption handler raises then)."""
    def score(images, prompts):
        raise Preempted(signal.SIGTERM)
    return score


def _config_file(world, tmp_path, **overrides) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(to_dict(tiny_config(world, tmp_path / "run", **overrides))))
    return path


def _fails(main, argv, capsys, prog: str) -> tuple[int, str, str]:
    """Run a command's main(argv) that must fail: (exit code, its one error line, all of stderr)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"{prog}: ") and str(info.value) == line, err
    return info.value.code, line, err


def _two_step_run_stopped_after_one(world, tmp_path) -> Path:
    train_main(["--config", str(_config_file(world, tmp_path, train={"steps": 2, "stop_after": 1}))])
    return tmp_path / "run"


@pytest.mark.parametrize("command", ["train --config", "evaluate RUN", "evaluate --config", "guidance_sweep --config",
                                     "paper_table --jobs", "pretrain --out"])
def test_input_refused_before_any_work_is_exit_2_and_one_line(command, tmp_path, capsys):
    missing = str(tmp_path / "missing.yaml")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    main, prog, argv, named = {
        "train --config": (train_main, "pec.train", ["--config", missing], missing),
        "evaluate RUN": (evaluate_main, "pec.evaluate", [str(tmp_path / "no_run"), "--out", str(tmp_path / "e")],
                         "no_run"),
        "evaluate --config": (evaluate_main, "pec.evaluate", ["pretrained", "--config", missing], missing),
        "guidance_sweep --config": (guidance_sweep_main, "pec.experiments.guidance_sweep", ["--", "--config", missing],
                                    missing),
        "paper_table --jobs": (paper_table.main, "pec.experiments.paper_table",
                               ["--out", str(tmp_path / "t"), "--jobs", "0"], "--jobs"),
        "pretrain --out": (pretrain_main, "pec.pretrain", ["--out", str(a_file)], str(a_file)),
    }[command]
    code, line, _ = _fails(main, argv, capsys, prog)
    assert code == 2 and named in line


def test_a_full_disk_at_the_first_checkpoint_says_there_is_none_and_the_plot_does_not_hide_it(
        world, tmp_path, capsys, monkeypatch):
    config = _config_file(world, tmp_path)
    replace = os.replace

    def full_disk(src, dst):  # the checkpoint's rename and the final curves.png fail, as on a full disk
        if Path(dst).suffix == ".pt" or Path(dst).name == "curves.png":
            raise ENOSPC
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    code, line, err = _fails(train_main, ["--config", str(config)], capsys, "pec.train")
    assert code == 1
    assert "could not write the checkpoint of step 1" in line and "No space left" in line
    assert f"{tmp_path / 'run'} holds no checkpoint of this run" in line and "intact" not in line
    warnings = [w for w in err.splitlines() if w.startswith("warning:")]
    assert len(warnings) == 1 and "curves.png" in warnings[0]
    assert checkpoint_files(tmp_path / "run") == []


class _FullDisk:
    """An open file whose disk fills up after `room` characters."""

    def __init__(self, fh, room: int) -> None:
        self._fh, self._room = fh, room

    def write(self, data):
        if len(data) > self._room:
            self._fh.write(data[:self._room])
            self._room = 0
            raise ENOSPC
        self._room -= len(data)
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def _fill_disk(monkeypatch, *names: str, room: int = 200) -> None:
    """From now on, a write to a file whose name holds one of `names` fails after `room` characters (its
    temporary file's too: `.config.yaml.123-ab.tmp`)."""
    real_open = builtins.open

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        writes = set(mode) & set("wxa")
        return _FullDisk(fh, room) if writes and any(n in Path(os.fspath(file)).name for n in names) else fh

    monkeypatch.setattr(builtins, "open", open_on_a_full_disk)


def test_a_full_disk_names_the_last_checkpoint_on_disk(world, tmp_path, capsys, monkeypatch):
    """The checkpoint of step 2 of a resumed run hits a full disk while torch.save writes it (torch then
    raises a RuntimeError of its own), and so does the final curves.png."""
    run = _two_step_run_stopped_after_one(world, tmp_path)
    _fill_disk(monkeypatch, ".pt", "curves.png")
    argv = ["--run-dir", str(run), "--resume", "--train.stop_after", "none"]
    code, line, err = _fails(train_main, argv, capsys, "pec.train")
    assert code == 1 and line.startswith("pec.train: could not write the checkpoint of step 2")
    assert "No space left" in line and "step-00000001.pt" in line and f"--run-dir {run} --resume" in line
    assert any(w.startswith("warning:") and "curves.png" in w for w in err.splitlines()), err
    assert [p.name for p in checkpoint_files(run)] == ["step-00000001.pt"]


def _keys(tree: dict, prefix: str = "") -> set[str]:
    return {k for key, value in tree.items()
            for k in (_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key})}


def test_a_full_disk_while_resuming_keeps_config_yaml_whole(world, tmp_path, capsys, monkeypatch):
    run = _two_step_run_stopped_after_one(world, tmp_path)
    before = (run / "config.yaml").read_bytes()
    _fill_disk(monkeypatch, "config.yaml")
    argv = ["--run-dir", str(run), "--resume", "--train.stop_after", "none"]
    code, line, _ = _fails(train_main, argv, capsys, "pec.train")
    assert code == 1 and "No space left" in line
    assert (run / "config.yaml").read_bytes() == before
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # no temporary left

    monkeypatch.undo()
    train_main(argv)
    assert _keys(yaml.safe_load((run / "config.yaml").read_text())) == _keys(to_dict(Config()))
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]


def test_a_torn_last_metrics_row_is_dropped_with_one_warning(world, tmp_path, capsys):
    run = _two_step_run_stopped_after_one(world, tmp_path)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 2, "rew')
    capsys.readouterr()
    train_main(["--run-dir", str(run), "--resume", "--train.stop_after", "none"])
    warnings = [w for w in capsys.readouterr().err.splitlines() if "warning" in w]
    assert len(warnings) == 1 and "metrics.jsonl" in warnings[0] and "last line" in warnings[0], warnings
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]


def test_sigterm_before_the_first_checkpoint_says_there_is_none(world, tmp_path, capsys):
    config = _config_file(world, tmp_path, reward="sigterm_at_call1")
    code, line, _ = _fails(train_main, ["--config", str(config)], capsys, "pec.train")
    assert code == 128 + signal.SIGTERM and "SIGTERM" in line and "holds no checkpoint" in line
    assert checkpoint_files(tmp_path / "run") == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_reward_server_that_is_down_at_start_is_one_line(world, tmp_path, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/"
    argv = ["--config", str(_config_file(world, tmp_path)), "--reward", "http", "--paths.reward_url", url]
    code, line, _ = _fails(train_main, argv, capsys, "pec.train")
    assert code == 2 and "--paths.reward_url" in line and url in line


def test_a_reward_server_gone_during_the_run_is_one_line(world, tmp_path, capsys):
    config = _config_file(world, tmp_path, reward="server_gone_at_call1")
    code, line, _ = _fails(train_main, ["--config", str(config)], capsys, "pec.train")
    assert code == 1 and "did not answer" in line and "nothing to resume" in line


def test_a_failed_paper_table_job_is_one_line_naming_its_log(tmp_path, capsys, monkeypatch):
    out = tmp_path / "table"
    log = out / "pretrained" / "evaluate.log"

    def failing_plan(out, results, mode, images, extra):  # one job that fails as a refused evaluation does
        return [paper_table.Job("evaluate pretrained", [sys.executable, "-c", "raise SystemExit(2)"], log,
                                out / "pretrained" / "metrics.json")], []

    monkeypatch.setattr(paper_table, "plan", failing_plan)
    code, line, _ = _fails(paper_table.main, ["--out", str(out), "--steps", "2", "--seeds", "0"], capsys,
                           "pec.experiments.paper_table")
    assert code == 1 and "evaluate pretrained failed (exit 2)" in line and str(log) in line
