"""Training checkpoints that never go backwards: atomic, finite, kept in a rotation, plus milestones.

Layout of a run folder:

    checkpoints/step-00000012.pt   the last `keep` checkpoints (older ones are deleted once a newer
                                   one is safely on disk)
    milestones/step-00000020.pt    snapshots every `milestone_every` steps, never deleted (evaluation
                                   along training reads them)

Each file holds the trainable weights, the optimizer state, the RNG states, the step and the run's
config. Rules:
- A state with a non-finite weight or optimizer moment is never written (`NonFiniteStateError`).
- A write goes to a temporary file in the same folder, is fsynced, then renamed over its final name and
  the folder is fsynced: a write interrupted at any point (a kill, a full disk) leaves every earlier
  checkpoint intact, and a leftover temporary file is ignored and cleaned up by the next write.
- `load_checkpoint` returns the newest *valid* checkpoint: one that loads, holds finite tensors and
  passes the caller's check (e.g. that it matches the run's config); it says which ones it skipped.
"""
from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
MILESTONE_DIR = "milestones"
FORMAT = 2
_NAME = re.compile(r"^step-(\d+)\.pt$")


class NonFiniteStateError(ValueError):
    """A training state holds NaN or Inf and must not be written."""


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


def checkpoint_name(step: int) -> str:
    """File name of the checkpoint of `step` (zero-padded so names sort by step)."""
    return f"step-{step:08d}.pt"


def nonfinite_entries(tree: Any, prefix: str = "") -> list[str]:
    """Dotted names of the floating-point tensors in a nested dict/list state that hold NaN or Inf."""
    bad: list[str] = []
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and not bool(torch.isfinite(tree).all()):
            bad.append(prefix or "<tensor>")
    elif isinstance(tree, dict):
        for key, value in tree.items():
            bad += nonfinite_entries(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            bad += nonfinite_entries(value, f"{prefix}[{i}]")
    return bad


def save_checkpoint(run_dir: str | Path, *, step: int, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], config: dict[str, Any], rng: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None, keep: int = 2, milestone: bool = False) -> Path:
    """Write the checkpoint of a finished `step` into `run_dir/checkpoints` and keep the newest `keep`.

    Args:
        run_dir: the run folder.
        step: the last finished training step the state belongs to.
        model_state, optimizer_state: the trainable weights and the optimizer's state dict.
        config: the run's configuration (a plain dict), checked on resume.
        rng: RNG states to store (default: the current ones, `rng_state()`).
        extra: anything else to keep (plain Python objects).
        keep: how many regular checkpoints to keep (>= 1); milestones are never deleted.
        milestone: also keep this state in `run_dir/milestones`.

    Returns:
        The path of the new checkpoint.

    Raises:
        NonFiniteStateError: a weight or optimizer moment is not finite; nothing is written.
        OSError: the write failed (e.g. the disk is full); earlier checkpoints are intact and the
            partial file is removed.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    bad = nonfinite_entries({"model": model_state, "optimizer": optimizer_state})
    if bad:
        raise NonFiniteStateError(f"the state of step {step} holds NaN/Inf in {', '.join(bad[:5])}"
                                  f"{' ...' if len(bad) > 5 else ''}; it was not written")
    payload = {"format": FORMAT, "step": step, "model": model_state, "optimizer": optimizer_state,
               "rng": rng if rng is not None else rng_state(), "config": config, "extra": extra or {}}
    folder = Path(run_dir) / CHECKPOINT_DIR
    path = _atomic_save(payload, folder / checkpoint_name(step))
    if milestone:
        _link_or_copy(path, Path(run_dir) / MILESTONE_DIR / checkpoint_name(step), payload)
    for old in _sorted_files(folder)[keep:]:
        old.unlink(missing_ok=True)
    return path


def checkpoint_files(run_dir: str | Path) -> list[Path]:
    """Every checkpoint file of a run (rotation and milestones), newest step first; for one step the
    rotation's copy comes before the milestone's."""
    run_dir = Path(run_dir)
    files = _sorted_files(run_dir / CHECKPOINT_DIR) + _sorted_files(run_dir / MILESTONE_DIR)
    return sorted(files, key=lambda p: -_step_of(p))


def milestone_files(run_dir: str | Path) -> list[Path]:
    """The milestone snapshots of a run, oldest step first."""
    return _sorted_files(Path(run_dir) / MILESTONE_DIR)[::-1]


def checkpoint_at(run_dir: str | Path, step: int, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint of finished `step` (a kept one or a milestone), validated like `read_checkpoint`;
    a ValueError lists the steps the run holds when there is none."""
    files = [p for p in checkpoint_files(run_dir) if _step_of(p) == step]
    if not files:
        held = sorted({_step_of(p) for p in checkpoint_files(run_dir)})
        raise ValueError(f"{run_dir} has no checkpoint of step {step}; it holds steps {held} (milestones are kept "
                         f"with --logging.milestone_every)")
    return read_checkpoint(files[0], map_location)


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether `run_dir` holds any checkpoint file (valid or not)."""
    return bool(checkpoint_files(run_dir))


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one checkpoint file and check that it is complete and finite (ValueError saying why not).
    The returned dict also holds "path"."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # a torn or foreign file: any unpickling error means "not loadable"
        raise ValueError(f"cannot be loaded ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or not {"step", "model", "optimizer", "rng", "config"} <= payload.keys():
        raise ValueError("is not a pec checkpoint (missing keys)")
    bad = nonfinite_entries({"model": payload["model"], "optimizer": payload["optimizer"]})
    if bad:
        raise ValueError(f"holds NaN/Inf in {', '.join(bad[:3])}")
    payload["path"] = path
    return payload


def load_checkpoint(run_dir: str | Path, map_location: str | torch.device = "cpu", *,
                    check: Callable[[dict[str, Any]], None] | None = None,
                    on_skip: Callable[[Path, str], None] | None = None) -> dict[str, Any]:
    """The newest valid checkpoint of `run_dir` (see the module docstring); "path" says which file.

    Args:
        run_dir: the run folder.
        map_location: where tensors are loaded.
        check: raises ValueError when a loaded checkpoint does not fit the caller (e.g. another
            model or LoRA config); such a checkpoint is skipped like a torn one.
        on_skip: called with (path, reason) for every newer checkpoint that was skipped.

    Raises:
        FileNotFoundError: no valid checkpoint; the message lists every file tried and why it failed.
    """
    tried: list[str] = []
    for path in checkpoint_files(run_dir):
        try:
            payload = read_checkpoint(path, map_location)
            if check is not None:
                check(payload)
        except ValueError as err:
            tried.append(f"{path.name}: {err}")
            if on_skip is not None:
                on_skip(path, str(err))
            continue
        return payload
    detail = f" (tried {'; '.join(tried)})" if tried else ""
    raise FileNotFoundError(f"no valid checkpoint in {Path(run_dir) / CHECKPOINT_DIR}{detail}: nothing to "
                            f"resume or evaluate")


def config_mismatch(saved: dict[str, Any], current: dict[str, Any], keys: Iterable[str]) -> str | None:
    """None when the dotted config `keys` agree between two config dicts, else what differs."""
    diffs = []
    for key in keys:
        a, b = _lookup(saved, key), _lookup(current, key)
        if a != b:
            diffs.append(f"{key} is {a!r} in the checkpoint but {b!r} now")
    return "; ".join(diffs) or None


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _step_of(path: Path) -> int:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else -1


def _sorted_files(folder: Path) -> list[Path]:
    """Checkpoint files in `folder`, newest step first (temporary and foreign files are ignored)."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name)), key=_step_of, reverse=True)


def _atomic_save(payload: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob("*.tmp"):  # left by a writer that was killed
        stale.unlink(missing_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _link_or_copy(src: Path, dst: Path, payload: dict[str, Any]) -> None:
    """A milestone shares the rotation file's bytes (a hard link) where the filesystem allows."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
        _fsync_dir(dst.parent)
    except OSError:
        _atomic_save(payload, dst)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
