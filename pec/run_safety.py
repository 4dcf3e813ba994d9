"""Run safety beside `pec.checkpoint`: validity masks, skipped optimizer steps, preemption signals.

What the trainer does with bad numbers:
- Masks, not dropped rows (shapes stay fixed): a sample whose reward, image, perceptual features (in any
  logged space) or trained-step log-probs are not finite is invalid for that step. A prompt group with
  fewer than `min_valid` valid samples (k + 1 for the kNN estimator) is invalid as a whole. Invalid
  samples get advantage 0, are left out of the group statistics and of the perceptual entropy, and
  their rows of the rollout are zeroed so that no NaN reaches a forward or backward pass.
- A non-finite loss or gradient skips the optimizer update (like AMP's GradScaler); so does a step
  with no valid group. `BadStepGuard` counts consecutive steps with a skipped update and stops the
  run after `max_bad_steps` of them, naming the step and the cause.

Preemption (`PreemptionHandler`): SIGTERM (how Slurm and Kubernetes preempt) and SIGINT abandon the
current step if its weights have not started to change yet, or else let it finish its updates; the
trainer then makes sure the last complete step is checkpointed and exits with 128 + the signal number.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType

import torch


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many skipped updates, or a non-finite state); the message says why."""


class Preempted(BaseException):
    """A termination signal arrived; derives from BaseException so that no `except Exception` eats it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signame = signal.Signals(signum).name
        super().__init__(f"received {self.signame}")


def finite_rows(t: torch.Tensor) -> torch.Tensor:
    """(B,) bool: whether every element of row b of `t` (B, ...) is finite."""
    return torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)


def sample_validity(group_size: int, min_valid: int, *rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples a step may learn from.

    Args:
        group_size: samples per prompt group (groups are consecutive runs of rows).
        min_valid: the fewest valid samples a group needs to count (k + 1 for the kNN estimator).
        rows: tensors with one row per sample ((B,), (B, ...)): rewards, images, features, log-probs.

    Returns:
        (finite (B,), valid (B,)): `finite` marks samples whose every value is finite; `valid` is
        `finite` with the samples of groups that keep fewer than `min_valid` finite samples cleared.
    """
    finite = finite_samples(*rows)
    return finite, group_validity(finite, group_size, min_valid)


def finite_samples(*rows: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the samples whose every value in `rows` (tensors with one row per sample) is finite."""
    if not rows:
        raise ValueError("finite_samples needs at least one tensor of per-sample values")
    finite = torch.ones(rows[0].shape[0], dtype=torch.bool, device=rows[0].device)
    for t in rows:
        if t.shape[0] != finite.shape[0]:
            raise ValueError(f"every tensor must have one row per sample ({finite.shape[0]}), got {t.shape[0]}")
        finite &= finite_rows(t).to(finite.device)
    return finite


def group_validity(finite: torch.Tensor, group_size: int, min_valid: int) -> torch.Tensor:
    """(B,) bool: `finite` with every sample of a group (consecutive runs of `group_size`) cleared when
    the group keeps fewer than `min_valid` finite samples."""
    if finite.shape[0] % group_size:
        raise ValueError(f"{finite.shape[0]} samples do not split into groups of group_size={group_size}")
    per_group = finite.reshape(-1, group_size)
    group_ok = per_group.sum(dim=1) >= min_valid
    return (per_group & group_ok[:, None]).reshape(-1)


def zero_invalid(t: torch.Tensor, valid: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """`t` with the slices of invalid samples (along `dim`) and every non-finite value set to 0."""
    shape = [1] * t.dim()
    shape[dim] = -1
    keep = valid.reshape(shape) & torch.isfinite(t)
    return torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))


@dataclass
class BadStepGuard:
    """Counts consecutive training steps whose update was skipped, and says when the run must stop."""

    max_bad_steps: int
    consecutive: int = 0
    total_skipped: int = 0
    history: list[str] = field(default_factory=list)

    def record(self, step: int, causes: list[str]) -> None:
        """Record the skipped updates of `step` (empty `causes`: the step updated normally)."""
        if not causes:
            self.consecutive, self.history = 0, []
            return
        self.consecutive += 1
        self.total_skipped += len(causes)
        self.history.append(f"step {step}: {'; '.join(causes)}")

    @property
    def exhausted(self) -> bool:
        """Whether `max_bad_steps` consecutive steps have skipped their update."""
        return self.consecutive >= self.max_bad_steps

    def message(self, step: int) -> str:
        """Why the run stops at `step`, naming each bad step's cause and what to do."""
        return (f"stopped at step {step}: {self.consecutive} consecutive steps skipped their update "
                f"(--train.max_bad_steps {self.max_bad_steps}): {' | '.join(self.history)}. The weights are "
                f"those of the last good update. Check the reward and encoders for NaN/Inf, or lower "
                f"--train.lr, then resume with --resume")

    def state(self) -> dict[str, object]:
        """Counters to store in a checkpoint, so a resumed run keeps counting."""
        return {"consecutive": self.consecutive, "total_skipped": self.total_skipped, "history": list(self.history)}

    def load_state(self, state: dict[str, object]) -> None:
        """Restore `state()` (an empty dict leaves the counters at zero)."""
        self.consecutive = int(state.get("consecutive", 0))
        self.total_skipped = int(state.get("total_skipped", 0))
        self.history = list(state.get("history", []))


class PreemptionHandler:
    """Turns SIGTERM/SIGINT into a clean stop (see the module docstring).

    While `abandonable()` is active, a signal raises `Preempted` at once (the work in progress is thrown
    away); outside it, the signal is only recorded in `signum`, and the trainer stops at the next step
    boundary. Handlers are installed only in the main thread, and the previous ones come back on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.committed = False  # the step in progress has changed the weights (the trainer resets it)
        self._abandonable = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionHandler:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        if self._abandonable:
            self._abandonable = False
            raise Preempted(signum)

    @contextmanager
    def abandonable(self) -> Iterator[None]:
        """A region whose work may be thrown away: a signal raises `Preempted` inside it."""
        if self.signum is not None:
            raise Preempted(self.signum)
        self._abandonable = True
        try:
            yield
        finally:
            self._abandonable = False

    def commit(self) -> None:
        """Leave the abandonable region for good (the weights are about to change)."""
        self._abandonable = False
        self.committed = True

    def check(self) -> None:
        """Raise `Preempted` when a signal arrived outside an abandonable region."""
        if self.signum is not None:
            raise Preempted(self.signum)
