"""Helpers shared by the window algorithms (MixGRPO, Flow-GRPO-Fast): seeded per-step draws and the
integer checks of their settings. A window is (start, end), end exclusive, as `sampling.sde_window`.

Draws are a pure function of (run seed, training step, stream name). MixGRPO's `random` strategy and
Flow-GRPO-Fast's window start draw one integer per training step that every rank must agree on and that a
resumed run must draw again identically. A process-local RNG (the authors' choice: unseeded numpy in
MixGRPO, `random.randint` seeded with seed + rank in Flow-GRPO-Fast) gives neither. Here the draw hashes
(stream, seed, step): no state, no communication, the same on every rank, machine and library version
(BLAKE2b is fixed; no torch or numpy RNG stream whose algorithm could change underneath).
"""
from __future__ import annotations

import hashlib

# 128 hash bits: reducing modulo a range of n values biases each value by at most n / 2^128.
_DIGEST_BYTES = 16


def step_randint(seed: int, step: int, stream: str, low: int, high: int) -> int:
    """A uniform integer in [low, high] (both inclusive), fixed by (seed, step, stream).

    Args:
        seed: the run's seed.
        step: the training step (iteration) the draw belongs to.
        stream: a name that separates independent uses of the same (seed, step), e.g. "mixgrpo.window".
        low, high: the inclusive range; high >= low.
    """
    check_int("seed", seed, 0)
    check_int("step", step, 0)
    if high < low:
        raise ValueError(f"step_randint needs low <= high, got [{low}, {high}]")
    digest = hashlib.blake2b(f"{stream}:{seed}:{step}".encode(), digest_size=_DIGEST_BYTES).digest()
    return low + int.from_bytes(digest, "little") % (high - low + 1)


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """`value` as an int if it is an integer in [low, high] (high None = no upper bound), else a one-line
    ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        expected = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value
