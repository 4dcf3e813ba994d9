"""Flow-GRPO-Fast's window draw: once per training step from the run's seed, uniform over [r0, r1 - w]."""
from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from pec.algorithms.flow_grpo_fast import DEFAULT_WINDOW_SIZE, default_window_range, fast_window


def _chi_square(counts: Counter, values: range, draws: int) -> float:
    expected = draws / len(values)
    return sum((counts[v] - expected) ** 2 / expected for v in values)


def test_reproducible_from_the_seed_alone():
    """The same (seed, step) draws the same window whatever the process's RNG states (every rank, a
    resumed run); these values are pinned because changing the draw would change resumed runs' windows."""
    first = [fast_window(0, step, 3, (0, 5), 10) for step in range(16)]
    random.seed(99)
    torch.manual_seed(99)
    assert [fast_window(0, step, 3, (0, 5), 10) for step in reversed(range(16))][::-1] == first
    assert [start for start, _ in first] == [1, 0, 2, 1, 1, 0, 0, 0, 2, 1, 0, 1, 2, 0, 1, 1]
    assert all(end - start == 3 for start, end in first)
    assert [fast_window(1, step, 3, (0, 5), 10)[0] for step in range(16)] != [start for start, _ in first]


@pytest.mark.parametrize("window_size,window_range,num_steps,draws", [(3, (0, 5), 10, 6000), (4, (0, 25), 25, 6600),
                                                                      (2, (3, 7), 8, 3000)])
def test_uniform_over_the_inclusive_range(window_size, window_range, num_steps, draws):
    """Chi-square over many steps below its 0.1% critical value (df 2: 13.8, df 21: 46.8), every start
    from r0 to r1 - w (both ends) drawn."""
    values = range(window_range[0], window_range[1] - window_size + 1)
    counts = Counter(fast_window(5, step, window_size, window_range, num_steps)[0] for step in range(draws))
    assert set(counts) == set(values)
    critical = {2: 13.82, 21: 46.80}[len(values) - 1]
    assert _chi_square(counts, values, draws) < critical


def test_presets():
    """SD3.5 (T = 10): range (0, 5), starts 0..2; FLUX (T = 6): range (0, 3) with w = 3, always start 0."""
    assert DEFAULT_WINDOW_SIZE == 3
    assert default_window_range(10) == (0, 5)
    assert {fast_window(0, step, 3, default_window_range(10), 10)[0] for step in range(200)} == {0, 1, 2}
    assert default_window_range(6) == (0, 3)
    assert {fast_window(seed, step, 3, default_window_range(6), 6) for seed in (0, 1) for step in range(200)} \
        == {(0, 3)}
