"""Shared helpers for the checkpoint tests (test_checkpoint.py and bad_input/test_bad_checkpoints.py):
files as pec wrote them before checkpoint format 3, and crafted pickles. Not a test module."""
import contextlib
import io
import os
import pickle
import random
import shlex
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from pec.checkpoint import set_rng_state


class RunsCode:
    """Unpickling this object runs a shell command (what a crafted checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def write_crafted(path: Path, marker: Path, *, zip_format: bool = True) -> Path:
    """A `step-*.pt` with pec's keys whose payload creates `marker` when unpickled: a torch.save file
    (zip, as pec writes) or a bare pickle."""
    payload = {"format": 2, "step": 1, "model": {}, "optimizer": {}, "rng": RunsCode(marker), "config": {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    if zip_format:
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        path.write_bytes(buffer.getvalue())
    else:
        path.write_bytes(pickle.dumps(payload))
    return path


def rewrite_as_format2(path: Path) -> dict:
    """Rewrite a current checkpoint as pec wrote it before format 3 (a full pickle: the RNG states as
    `random.getstate()` / `np.random.get_state()` return them, format 2); returns that payload."""
    payload = torch.load(path, weights_only=True)
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        set_rng_state(payload["rng"])
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
    payload.update(format=2, rng=rng)
    torch.save(payload, path)
    return payload


@contextlib.contextmanager
def deadline(seconds):
    """Fail (instead of hanging the suite) if the block blocks for longer than `seconds`: pytest.fail
    raises a BaseException, which no `except OSError` / `except Exception` in the code under test hides,
    and the timer repeats in case something catches it anyway."""
    def expired(signum, frame):
        pytest.fail(f"blocked for more than {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
