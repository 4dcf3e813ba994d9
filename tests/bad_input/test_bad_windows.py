"""Bad input to the window algorithms' math (MixGRPO's schedule and Flash grid, Flow-GRPO-Fast's draw,
GRPO-Guard's ratio and loss): each is refused with one line that names the setting."""
from __future__ import annotations

import pytest
import torch

from pec.algorithms.flow_grpo_fast import fast_window
from pec.algorithms.grpo_guard import guard_log_ratio, guard_surrogate
from pec.algorithms.mixgrpo import WindowSchedule, flash_sigmas


def _one_line(err: pytest.ExceptionInfo, *words: str) -> None:
    message = str(err.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("window_size,window_range,num_steps,words", [
    (3, (0, 2), 10, ("flow_grpo_fast.window_range [0, 2) holds no window of flow_grpo_fast.window_size 3",)),
    (3, (3, 3), 10, ("flow_grpo_fast.window_range must be two integers r0 < r1 within [0, num_steps=10]",)),
    (2, (-1, 4), 10, ("flow_grpo_fast.window_range", "got (-1, 4)")),
    (2, (0, 11), 10, ("flow_grpo_fast.window_range", "num_steps=10")),
    (2, (0.0, 4), 10, ("flow_grpo_fast.window_range",)),
    (2, (0, 4, 6), 10, ("flow_grpo_fast.window_range",)),
    (0, (0, 4), 10, ("flow_grpo_fast.window_size must be an integer in [1, 10], got 0",)),
    (11, (0, 10), 10, ("flow_grpo_fast.window_size",)),
])
def test_fast_bad_ranges(window_size, window_range, num_steps, words):
    with pytest.raises(ValueError) as err:
        fast_window(0, 0, window_size, window_range, num_steps)
    _one_line(err, *words)


@pytest.mark.parametrize("seed,step,word", [(-1, 0, "seed"), (0, -3, "step"), (0, 1.5, "step")])
def test_fast_bad_seed_or_step(seed, step, word):
    with pytest.raises(ValueError) as err:
        fast_window(seed, step, 3, (0, 5), 10)
    _one_line(err, f"{word} must be an integer >= 0")


@pytest.mark.parametrize("kwargs,words", [
    ({"num_steps": 0}, ("mixgrpo.num_steps must be an integer >= 1",)),
    ({"num_steps": 2}, ("mixgrpo.limit (default num_steps - 2) must be an integer in [1, 2], got 0",)),
    ({"num_steps": 25, "limit": 26}, ("mixgrpo.limit must be an integer in [1, 25], got 26",)),
    ({"num_steps": 25, "window_size": 0}, ("mixgrpo.window_size",)),
    ({"num_steps": 25, "shift_interval": 0}, ("mixgrpo.shift_interval must be an integer >= 1",)),
    ({"num_steps": 25, "stride": -1}, ("mixgrpo.stride must be an integer >= 0",)),
    ({"num_steps": 25, "strategy": "sideways"}, ("mixgrpo.strategy", "sideways")),
    ({"num_steps": 25, "strategy": "random", "window_size": 5, "limit": 4},
     ("mixgrpo.window_size 5 is larger than mixgrpo.limit 4",)),
    ({"num_steps": 25, "tau_min": 5, "tau_max": 3}, ("mixgrpo.tau_max must be an integer >= 5, got 3",)),
    ({"num_steps": 25, "exp_rate": float("nan")}, ("mixgrpo.exp_rate must be a finite number >= 0",)),
    ({"num_steps": 25, "seed": -1}, ("mixgrpo.seed",)),
])
def test_mixgrpo_bad_settings(kwargs, words):
    with pytest.raises(ValueError) as err:
        WindowSchedule(**kwargs)
    _one_line(err, *words)


def test_mixgrpo_bad_iteration_and_state():
    sched = WindowSchedule(25)
    with pytest.raises(ValueError) as err:
        sched.window(-1)
    _one_line(err, "iteration must be an integer >= 0, got -1")
    with pytest.raises(ValueError) as err:
        sched.load_state_dict({"iteration": 3, "start": 0})
    _one_line(err, "the MixGRPO window state must hold the ints ['iteration', 'start', 'end']")


def _sigmas() -> torch.Tensor:
    return torch.linspace(1, 0, 11, dtype=torch.float64)


@pytest.mark.parametrize("sigmas,window,ratio,shift,words", [
    (_sigmas(), (0, 4), 0.0, 3.0, ("ratio must be a number in (0, 1], got 0.0",)),
    (_sigmas(), (0, 4), 1.5, 3.0, ("ratio must be a number in (0, 1]",)),
    (_sigmas(), (0, 4), 0.4, 0.0, ("shift must be a finite number > 0",)),
    (_sigmas(), (4, 4), 0.4, 3.0, ("window end must be an integer in [5, 10], got 4",)),
    (_sigmas(), (0, 11), 0.4, 3.0, ("window end",)),
    (_sigmas(), 4, 0.4, 3.0, ("window must be (start, end), got 4",)),
    (torch.linspace(1, 0.1, 11), (0, 4), 0.4, 3.0,
     ("sigmas must decrease strictly to a terminal 0, got 11 values ending at 0.1",)),
    (torch.tensor([1.0, 0.5, 0.5, 0.0]), (0, 1), 0.4, 3.0, ("not decreasing after index 1",)),
    (torch.ones(3, 3), (0, 1), 0.4, 3.0, ("sigmas must have 1 dimensions",)),
])
def test_flash_bad_input(sigmas, window, ratio, shift, words):
    with pytest.raises(ValueError) as err:
        flash_sigmas(sigmas, window, ratio, shift)
    _one_line(err, *words)


def test_guard_bad_input():
    mu, x = torch.zeros(2, 3), torch.ones(2, 3)
    for std, words in ((0.0, ("std must be a finite positive number",)), (-0.5, ("std",)), (float("inf"), ("std",)),
                       (torch.ones(3), ("std must be a scalar or hold one value per sample",))):
        with pytest.raises(ValueError) as err:
            guard_log_ratio(mu, mu, x, std)
        _one_line(err, *words)
    with pytest.raises(ValueError) as err:
        guard_log_ratio(mu, torch.zeros(2, 4), x, 0.5)
    _one_line(err, "mu_old must have the shape of mu_theta, (2, 3), got (2, 4)")
    with pytest.raises(ValueError) as err:
        guard_log_ratio(torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.5)
    _one_line(err, "mu_theta must be (B, ...) with at least one non-batch dimension")
    log_ratio, adv = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError) as err:
        guard_surrogate(log_ratio, adv, 1e-4, 0.0)
    _one_line(err, "dt must be a finite nonzero number")
    with pytest.raises(ValueError) as err:
        guard_surrogate(log_ratio, adv, 1e-4, torch.ones(3))
    _one_line(err, "dt must broadcast to the shape of log_ratio, (4,), got (3,)")
