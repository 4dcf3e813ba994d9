"""MixGRPO's window schedule over training iterations and MixGRPO-Flash's re-gridded schedule, against
re-derivations: a closed-form table, a step-by-step counter (the authors' way of moving the window), hand
values of the interval formulas and exact fractions for the Flash grid."""
from __future__ import annotations

import io
import math
from fractions import Fraction

import pytest
import torch

from pec.algorithms.mixgrpo import STRATEGIES, WindowSchedule, flash_sigmas
from pec.seeding import step_randint


def test_published_schedule_table():
    """T = 25, w = 4, tau = 25, stride 1, M = T - 2 = 23: start k for iterations 25k .. 25k + 24, windows
    shrinking at the limit, start 22 the last (its window [22, 23)), then back to 0."""
    sched = WindowSchedule(25)
    table = {0: (0, 4), 24: (0, 4), 25: (1, 5), 49: (1, 5), 50: (2, 6), 19 * 25: (19, 23),
             20 * 25: (20, 23), 21 * 25 + 3: (21, 23), 22 * 25: (22, 23), 22 * 25 + 24: (22, 23),
             23 * 25: (0, 4), 23 * 25 + 25: (1, 5), 300: (12, 16)}
    assert {i: sched.window(i) for i in table} == table
    for i in range(3 * 23 * 25):
        k = (i // 25) % 23
        assert sched.window(i) == (k, min(k + 4, 23)), i


def _interval_formula(strategy: str, start: int, limit: int, tau: int, tau_max: int, tau_min: int) -> int:
    """The authors' interval formulas, evaluated exactly (fractions) for `decay`."""
    if strategy == "decay":
        return max(tau_min, math.floor(tau_max * (1 - Fraction(start, limit)) + tau_min * Fraction(start, limit)))
    if strategy == "exp_decay":
        return max(1, math.ceil(tau * math.exp(-0.1 * max(0, start - 13))))
    return tau


@pytest.mark.parametrize("strategy", ["progressive", "decay", "exp_decay"])
@pytest.mark.parametrize("num_steps,window_size,tau,stride,limit,roll_back", [
    (25, 4, 25, 1, None, True), (25, 4, 3, 1, None, True), (25, 4, 2, 3, None, True), (25, 4, 2, 4, None, False),
    (10, 3, 2, 1, 8, False), (10, 2, 1, 2, 10, True), (6, 6, 1, 1, 1, True)])
def test_schedule_equals_a_counter(strategy, num_steps, window_size, tau, stride, limit, roll_back):
    """Moving the window one iteration at a time, as the authors do (a counter per position, a shift by
    the stride, roll back or clamp past the last start), gives the pure function's windows."""
    sched = WindowSchedule(num_steps, window_size, tau, stride, limit, strategy, roll_back, tau_max=7, tau_min=2)
    m = sched.limit
    start, at = 0, 0
    for i in range(600):
        assert sched.window(i) == (start, min(start + window_size, m)), i
        at += 1
        if at >= _interval_formula(strategy, start, m, tau, 7, 2):
            at, start = 0, start + stride
            if start >= m:
                start = 0 if roll_back else m - 1


def test_interval_hand_values():
    """decay (tau_max 10, tau_min 1, M = 23) and exp_decay (tau 25, threshold 13, k 0.1), by hand."""
    decay = WindowSchedule(25, strategy="decay")
    assert [decay.interval(p) for p in (0, 1, 11, 22)] == [10, 9, 5, 1]  # int(221/23), int(131/23), int(32/23)
    exp = WindowSchedule(25, strategy="exp_decay")
    assert [exp.interval(p) for p in (0, 13, 14, 22)] == [25, 25, 23, 11]  # ceil(22.62), ceil(10.16)
    assert WindowSchedule(25, shift_interval=7).interval(20) == 7


def test_clamp_stays_at_the_last_non_empty_start():
    sched = WindowSchedule(10, window_size=3, shift_interval=2, stride=3, roll_back=False)  # M = 8: starts 0, 3, 6
    assert [sched.window(i) for i in range(0, 12, 2)] == [(0, 3), (3, 6), (6, 8), (7, 8), (7, 8), (7, 8)]
    assert sched.window(10 ** 6) == (7, 8)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("num_steps,window_size,stride,limit", [(25, 4, 1, None), (7, 5, 2, 5), (4, 1, 3, 4)])
def test_windows_are_never_empty(strategy, num_steps, window_size, stride, limit):
    sched = WindowSchedule(num_steps, window_size, 2, stride, limit, strategy, seed=3)
    for i in range(400):
        start, end = sched.window(i)
        assert 0 <= start < end <= sched.limit and end - start <= window_size


def test_frozen_and_stride_zero():
    frozen = WindowSchedule(25, strategy="frozen", stride=1)
    still = WindowSchedule(25, shift_interval=20, stride=0)  # the authors' Flash*
    assert {frozen.window(i) for i in range(2000)} == {still.window(i) for i in range(2000)} == {(0, 4)}


def test_random_is_seeded_per_iteration_and_full_width():
    a = WindowSchedule(25, strategy="random", seed=7)
    b = WindowSchedule(25, strategy="random", seed=7)
    starts = [a.start(i) for i in range(2000)]
    assert starts == [b.start(i) for i in reversed(range(2000))][::-1]  # pure: the order of calls is irrelevant
    assert starts == [step_randint(7, i, 5, 0, 23 - 4) for i in range(2000)]
    assert set(starts) == set(range(20))  # [0, M - w], both ends
    assert all(end - start == 4 for start, end in map(a.window, range(2000)))
    assert starts != [WindowSchedule(25, strategy="random", seed=8).start(i) for i in range(2000)]
    assert starts == [WindowSchedule(25, strategy="random", seed=7, stride=0).start(i) for i in range(2000)]


def test_pure_function_of_the_iteration():
    sched = WindowSchedule(25, strategy="decay")
    forward = [sched.window(i) for i in range(500)]
    again = WindowSchedule(25, strategy="decay")
    assert [again.window(i) for i in reversed(range(500))][::-1] == forward


def test_state_round_trips_through_a_weights_only_checkpoint():
    sched = WindowSchedule(25)
    assert sched.state_dict() == {"iteration": -1, "start": -1, "end": -1}
    sched.window(560)
    buffer = io.BytesIO()
    torch.save({"mixgrpo": sched.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["mixgrpo"]
    assert state == {"iteration": 560, "start": 22, "end": 23}
    resumed = WindowSchedule(25)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state and resumed.window(561) == sched.window(561)


def test_state_from_other_settings_is_refused():
    sched = WindowSchedule(25)
    sched.window(100)
    other = WindowSchedule(25, shift_interval=20)
    with pytest.raises(ValueError, match=r"window at iteration 100 was \[4, 8\] but these mixgrpo settings give "
                                         r"\[5, 9\]") as err:
        other.load_state_dict(sched.state_dict())
    assert "\n" not in str(err.value)
    assert other.state_dict() == {"iteration": -1, "start": -1, "end": -1}  # nothing loaded


def _shifted(t: Fraction, shift: int = 3) -> Fraction:
    return shift * t / (1 + (shift - 1) * t)


def _grid(num_steps: int = 25) -> torch.Tensor:
    return torch.tensor([float(_shifted(Fraction(num_steps - i, num_steps))) for i in range(num_steps + 1)],
                        dtype=torch.float64)


@pytest.mark.parametrize("window,ratio,post_t", [
    # T - e = 22 after the window [0, 4): n = int(8.8) = 8 points from t = 21/25 down to 0, 7 steps.
    ((0, 4), 0.4, [Fraction(12 * (7 - j), 100) for j in range(8)]),
    # Flash*: n = int(4.4) = 4.
    ((0, 4), 0.2, [Fraction(28 * (3 - j), 100) for j in range(4)]),
    # a window mid-way: e = 13, n = int(12 x 0.4) = 4 points from t = 11/25.
    ((10, 14), 0.4, [Fraction(11, 25) * Fraction(3 - j, 3) for j in range(4)]),
])
def test_flash_grid_hand_values(window, ratio, post_t):
    sigmas = _grid()
    grid = flash_sigmas(sigmas, window, ratio, 3.0)
    end = window[1]
    expected = [float(_shifted(t)) for t in post_t]
    assert torch.equal(grid.sigmas[:end + 1], sigmas[:end + 1])  # up to the point after the window, bit for bit
    torch.testing.assert_close(grid.sigmas[end:], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)
    assert grid.window == window and grid.post == (end, end + len(post_t) - 1)
    assert grid.sigmas.shape[0] == end + len(post_t)


def test_flash_single_point_edge_ends_at_zero():
    """e = 22: the authors' n = int(max(3 x 0.4, 1)) = 1 would end the grid at sigma_23 > 0; here one
    step goes from sigma_23 to 0."""
    sigmas = _grid()
    grid = flash_sigmas(sigmas, (20, 23), 0.4, 3.0)
    assert torch.equal(grid.sigmas, torch.cat([sigmas[:24], torch.zeros(1, dtype=torch.float64)]))
    assert grid.post == (23, 24)


def test_flash_window_at_the_end_keeps_the_grid():
    sigmas = _grid().float()
    grid = flash_sigmas(sigmas, (21, 25), 0.4, 3.0)
    assert torch.equal(grid.sigmas, sigmas) and grid.sigmas.dtype == torch.float32
    assert grid.window == (21, 25) and grid.post == (25, 25)


@pytest.mark.parametrize("kwargs", [{}, {"roll_back": False}, {"stride": 3}, {"stride": 3, "roll_back": False},
                                    {"stride": 0}, {"strategy": "frozen"}, {"strategy": "random", "window_size": 5},
                                    {"strategy": "decay", "stride": 2}, {"strategy": "exp_decay", "limit": 25}])
def test_latest_start_is_the_latest_start_any_iteration_reaches(kwargs):
    """What MixGRPO's check compares with the first untrainable step (refusing windows that train nothing)."""
    sched = WindowSchedule(25, shift_interval=3, **kwargs)
    assert max(sched.start(i) for i in range(3000)) == sched.latest_start
