"""Seeds of a run's random streams, derived from (run seed, step, stream) so that a resumed run, or a run on
another number of processes, draws exactly what the uninterrupted one-process run draws.

One scheme for every draw: `step_seed` mixes (seed, step, stream) into a seed; a torch generator seeded with
it draws the values (the rollout noise, the prompts, the minibatch shuffle, and the window algorithms'
per-step integers through `step_randint`). No process-local RNG state is read, so every rank draws the same.
"""
from __future__ import annotations

import torch


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, step, stream). Streams: 0 the step's prompts, 1 the
    rollout noise, 2 the minibatch shuffle, 3 the sample grids, 4 Clip-Cov's draw, 5 MixGRPO's random window,
    6 Flow-GRPO-Fast's window (higher streams are free for new draws; reusing one would tie two draws
    together)."""
    return (seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**63 - 1)


def step_randint(seed: int, step: int, stream: int, low: int, high: int) -> int:
    """A uniform integer in [low, high] (both inclusive), fixed by (seed, step, stream): the same on every rank
    and after a resume (a torch generator seeded by `step_seed`; the process's RNG states are not touched).

    Args:
        seed: the run's seed (>= 0).
        step: the training step (iteration) the draw belongs to (>= 0).
        stream: which use of (seed, step) this is (see `step_seed`).
        low, high: the inclusive range; high >= low.
    """
    for name, value in (("seed", seed), ("step", step)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if high < low:
        raise ValueError(f"step_randint needs low <= high, got [{low}, {high}]")
    generator = torch.Generator().manual_seed(step_seed(seed, step, stream))
    return low + int(torch.randint(high - low + 1, (), generator=generator))
