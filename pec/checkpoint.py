"""Atomic training checkpoints: trainable weights, optimizer, RNG states, step and config.

A checkpoint is written to a temporary file and renamed over `checkpoint.pt`, so an interrupted
write never leaves a torn file: the previous checkpoint stays valid until the new one is complete.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    """The RNG states of Python, numpy, torch CPU and (when present) every CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states saved by `rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, *, step: int, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], config: dict[str, Any], extra: dict[str, Any] | None = None
                    ) -> Path:
    """Atomically write the checkpoint of a finished `step` into `run_dir`; return its path."""
    path = Path(run_dir) / CHECKPOINT_NAME
    tmp = path.with_suffix(".pt.tmp")
    payload = {"step": step, "model": model_state, "optimizer": optimizer_state, "rng": rng_state(),
               "config": config, "extra": extra or {}}
    torch.save(payload, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read the checkpoint of `run_dir` (raises FileNotFoundError naming the path when there is none)."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: nothing to resume or evaluate")
    return torch.load(path, map_location=map_location, weights_only=False)
