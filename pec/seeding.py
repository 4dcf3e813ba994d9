"""Seeds of a run's random streams, derived from (run seed, step, stream) so that a resumed run, or a run on
another number of processes, draws exactly what the uninterrupted one-process run draws."""
from __future__ import annotations


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, step, stream). Streams: 0 the step's prompts, 1 the
    rollout noise, 2 the minibatch shuffle, 3 the sample grids, 4 Clip-Cov's draw (higher streams are free
    for algorithms, e.g. a window draw)."""
    return (seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**63 - 1)
