"""A run killed with SIGKILL (no handler runs, as when a node dies) and resumed from its last checkpoint
trains exactly what the uninterrupted run trains, for the algorithms with state of their own: DiffusionNFT
(its old policy and optimizer-step count) and MixGRPO (its window position)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from pec.logging_utils import read_metrics
from pec.train import main

STEPS = 6  # the kill lands after step 2's checkpoint, with 4 steps still to go
CASES = {
    "nft": ["--algorithm", "nft", "--train.minibatches", "2", "--train.lr", "0.05"],
    "mixgrpo": ["--algorithm", "mixgrpo", "--mixgrpo.window_size", "1", "--mixgrpo.limit", "2",
                "--mixgrpo.shift_interval", "1"],
}


def _argv(world, run, algorithm):
    return ["--device", "cpu", "--assets", str(world), "--model.path", str(world / "embedded"), "--method", "pec",
            "--sampling.prompts_per_step", "2", "--sampling.group_size", "3", "--sampling.num_steps", "2",
            "--train.micro_batch", "4", "--perceptual.k", "1", "--train.steps", str(STEPS),
            "--logging.tensorboard", "false", "--logging.progress", "false", "--logging.grid_samples", "1",
            *CASES[algorithm], "--run-dir", str(run)]


def _rows(run):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(run / "metrics.jsonl")]


@pytest.mark.parametrize("algorithm", sorted(CASES))
def test_a_run_killed_with_sigkill_resumes_exactly(world, tmp_path, algorithm):
    main(_argv(world, tmp_path / "full", algorithm))
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pec.train", *_argv(world, run, algorithm)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = run / "checkpoints" / "step-00000002.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert checkpoint.exists() and proc.poll() is None, "the run must be killed after step 2, before its end"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    main(["--run-dir", str(run), "--resume"])
    rows = _rows(run)
    assert len(rows) == STEPS and rows == _rows(tmp_path / "full")
