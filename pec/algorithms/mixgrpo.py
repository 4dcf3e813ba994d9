"""MixGRPO (`--algorithm mixgrpo`): its sliding SDE window over training iterations, the algorithm behind
the trainer's loop, and MixGRPO-Flash's post-window grid.

MixGRPO (arXiv 2507.21802) samples with SDE steps inside a window of consecutive steps and ODE steps
elsewhere, trains only the window, and moves the window as training goes on (DESIGN.md §2.7). The schedule's
math is `WindowSchedule`; the algorithm, `MixGRPO`, is Flow-GRPO (`pec.algorithms.flow_grpo`) with this
rollout plan at training step s (iteration s - 1):
- the window of `WindowSchedule` (settings: `--mixgrpo.*`) holds the SDE steps, with `--sampling.eta`
  (the authors' flow SDE, eta 0.7); every other step is an Euler ODE step;
- every sample of a prompt group starts from the same initial noise (the authors' --init_same_noise), drawn
  from (seed, step, group), so a group diverges only inside the window, on whichever processes it lives;
- the trained steps follow the one rule (`Rollout.train_steps`): the window's steps among the first
  int(T * train.timestep_fraction). A window that would train nothing is refused before any model loads
  (`MixGRPO.check`: `WindowSchedule.latest_start` must lie below the first untrainable step); MixGRPO trains
  its whole window, so its configs use timestep_fraction 1.0 (the scripts' 0.6 is read only by their
  DanceGRPO mode; fed to the one rule it would cut the window off from step 15 on);
- the checkpoint holds the window position (`WindowSchedule.state_dict`: plain ints); the window is a pure
  function of the iteration, so a resumed run trains the windows of the uninterrupted one, and resuming
  under settings that would move the window is refused.
The update, the regularisers' hooks and the diagnostics are Flow-GRPO's. A fixed `--sampling.sde_window` is
refused: the schedule places the window.

MixGRPO-Flash is not built: `flash_sigmas` gives its grid, but its rollout has fewer steps than
`--sampling.num_steps` after the window (7 instead of 21 at T = 25), and the trainer sizes its per-step
noise draw and the regularisers' per-step guidance weights by `sampling.num_steps`; a schedule override in
the rollout plan would have to carry its own step count through those, and the authors' re-gridding
undoes a static shift 3 that FLUX's dynamic-shift schedule here does not have. MixGRPO samples the whole
grid (Euler outside the window).

Authors' code (Tencent-Hunyuan/MixGRPO @e5cdd6a; research notes /work/notes/algorithms.md §2):
`fastvideo/utils/grpo_states.py` (`GRPOTrainingStates`: the window position and its strategies),
`fastvideo/train_grpo_flux.py` (`main`: how the state is built, argparse defaults),
`fastvideo/utils/sampling_utils.py` (`run_sample_step`: Flash's re-gridding) and
`scripts/finetune/finetune_flux_grpo_MixGRPO{,_Flash,_Flash*}.sh` (the published settings).

| setting (here)          | default     | authors (name: value)                              | from                |
|-------------------------|-------------|----------------------------------------------------|---------------------|
| num_steps T             | -           | sampling_steps: 25                                 | scripts             |
| window_size w           | 4           | group_size: 4                                      | argparse, scripts   |
| shift_interval tau      | 25          | iters_per_group: 25 (MixGRPO), 20 (Flash, Flash*)  | argparse, scripts   |
| stride                  | 1           | prog_overlap_step: 1 (MixGRPO, Flash), 0 (Flash*)  | scripts             |
| limit M                 | T - 2       | max_timesteps = sampling_steps - 2                 | train_grpo_flux.main |
| strategy                | progressive | sample_strategy: progressive                       | argparse, scripts   |
| roll_back               | True        | --roll_back (argparse default False)               | scripts             |
| tau_max, tau_min        | 10, 1       | max_iters_per_group 10, min_iters_per_group 1      | argparse, scripts   |
| exp_threshold, exp_rate | 13, 0.1     | exp_decay_thre_timestep 13, exp_decay_k 0.1        | GRPOTrainingStates  |
| Flash ratio             | 0.4         | dpm_post_compress_ratio: 0.4 (Flash), 0.2 (Flash*) | scripts             |
| Flash shift             | 3.0         | --shift 3 (static: sigma = 3t / (1 + 2t))          | scripts             |
(The scripts pass --prog_overlap, which makes prog_overlap_step the stride; without it the stride is w.)

The window at iteration i is [l, min(l + w, M)): windows near the limit shrink, as the authors'. The start
l of the progressive strategies begins at 0 and stays interval(l) iterations at each position, then
moves by `stride`:
- `progressive`: interval tau;
- `decay`: interval max(tau_min, int(tau_max (1 - l/M) + tau_min l/M)) (the authors' linear decay);
- `exp_decay`: interval ceil(tau exp(-k max(0, l - threshold))), at least 1 (the authors' check moves
  the window after one iteration when their formula gives less);
- past the last start below M, `roll_back` returns to 0 (a cycle), else the start stays at M - 1;
- `random`: l uniform in [0, M - w] (full windows), drawn anew every iteration;
- `frozen`: l = 0 always; the authors reach it with stride 0 (Flash*), which gives the same here.

Where we differ from the authors, and why:
- Empty windows never happen. The authors' start may reach M itself, where their window [M, M) trains
  nothing for a whole interval, and their clamp (no roll back) parks the window there for good. Here the
  starts stop below M: roll back happens as soon as the next start would be >= M, and the clamp stays at
  M - 1, the last start with a non-empty window. Where the authors' starts land on M exactly (M a multiple
  of the stride, as with stride 1), a roll-back cycle is one position shorter than theirs (23 x 25
  iterations at T = 25, not 24 x 25); otherwise the sequences are the same (checked against their
  `GRPOTrainingStates` for T in {10, 13, 25}, strides 1 to 5, tau in {1, 3, 25}, with and without roll
  back: equal once their empty windows are dropped). The published 300-step runs reach start 11 (tau 25)
  or 14 (tau 20) and never see the difference.
- `random` is seeded: l = `pec.seeding.step_randint(seed, iteration, 5, 0, M - w)`, the same on every
  rank and after a resume (the authors draw from an unseeded numpy generator on each rank, so their ranks
  train different windows). It draws at iteration 0 too (the authors' iteration 0 uses start 0).
- The schedule is a pure function of the iteration (resume needs only the iteration); the authors keep a
  counter that moves once per iteration.
- `decay`'s interval is computed in exact integer arithmetic, floor((tau_max (M - l) + tau_min l) / M);
  the authors' floats could round an exact integer down by one (never at their T = 25, tau 10 to 1).

MixGRPO-Flash (`flash_sigmas`): after the window, the rest of the trajectory is re-gridded to
n = int(max((T - e) ratio, 1)) points (e the window's last step) evenly spaced in unshifted time from the
point after the window down to 0, then shifted again, and solved by a 2nd-order multistep DPM-Solver++
(not built here: this module gives the grid). The authors' n = 1 (e > T - 2 / ratio, e.g. e >= 21 at T = 25,
ratio 0.4) leaves their grid ending above sigma = 0, an image that is never fully denoised; here n is at
least 2 whenever the window ends before the last step, so the grid always ends at 0 (one step from the
window's end straight to 0), and a window that ends at the last step leaves the grid unchanged.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch

from pec.algorithms.base import Learner, RolloutPlan
from pec.algorithms.flow_grpo import FlowGRPO
from pec.algorithms.registry import ALGORITHMS
from pec.algorithms.windows import check_int, check_window_algorithm
from pec.config import MIXGRPO_STRATEGIES, Config
from pec.seeding import step_randint
from pec_kernels import check_choice, check_tensor

STRATEGIES = MIXGRPO_STRATEGIES
RANDOM_STREAM = 5  # `pec.seeding.step_seed`'s stream of the random strategy's draws
STATE_KEYS = ("iteration", "start", "end")


class WindowSchedule:
    """MixGRPO's window (start, end) of SDE steps for each training iteration (see the module docstring).

    `window(iteration)` is a pure function of the iteration and the settings; `state_dict()` records the
    last window served (plain ints, for a `weights_only=True` checkpoint) so that `load_state_dict` can
    refuse to resume under settings that would move the window.
    """

    def __init__(self, num_steps: int, window_size: int = 4, shift_interval: int = 25, stride: int = 1,
                 limit: int | None = None, strategy: str = "progressive", roll_back: bool = True,
                 tau_max: int = 10, tau_min: int = 1, exp_threshold: int = 13, exp_rate: float = 0.1,
                 seed: int = 0) -> None:
        """Check and store the settings; every bad one is a one-line ValueError naming it.

        Args:
            num_steps: T, the sampler's steps.
            window_size: w, SDE steps per window.
            shift_interval: tau, iterations per position (`progressive`; `exp_decay`'s starting value).
            stride: steps the start moves at each shift (0: the window never moves).
            limit: M, windows end at or before step M; None = T - 2, the authors' value.
            strategy: one of STRATEGIES.
            roll_back: past the last start, return to 0 (else stay at M - 1).
            tau_max, tau_min: `decay`'s interval at start 0 and its floor.
            exp_threshold, exp_rate: `exp_decay`'s start where the decay begins and its rate k.
            seed: the run's seed (`random`).
        """
        self.num_steps = check_int("mixgrpo.num_steps", num_steps, 1)
        self.limit = check_int("mixgrpo.limit (default num_steps - 2)" if limit is None else "mixgrpo.limit",
                               num_steps - 2 if limit is None else limit, 1, num_steps)
        self.window_size = check_int("mixgrpo.window_size", window_size, 1, num_steps)
        self.shift_interval = check_int("mixgrpo.shift_interval", shift_interval, 1)
        self.stride = check_int("mixgrpo.stride", stride, 0)
        check_choice("mixgrpo.strategy", strategy, STRATEGIES)
        self.strategy = strategy
        self.roll_back = bool(roll_back)
        self.tau_min = check_int("mixgrpo.tau_min", tau_min, 1)
        self.tau_max = check_int("mixgrpo.tau_max", tau_max, self.tau_min)
        self.exp_threshold = check_int("mixgrpo.exp_threshold", exp_threshold, 0)
        if not (isinstance(exp_rate, (int, float)) and math.isfinite(exp_rate) and exp_rate >= 0):
            raise ValueError(f"mixgrpo.exp_rate must be a finite number >= 0, got {exp_rate!r}")
        self.exp_rate = float(exp_rate)
        self.seed = check_int("mixgrpo.seed", seed, 0)
        if strategy == "random" and self.window_size > self.limit:
            raise ValueError(f"mixgrpo.window_size {window_size} is larger than mixgrpo.limit {self.limit}: the "
                             f"random strategy draws full windows inside [0, limit)")
        self.last_iteration: int | None = None

    def interval(self, start: int) -> int:
        """Iterations the window stays at `start` (the progressive strategies)."""
        if self.strategy == "decay":  # int(tau_max (1 - l/M) + tau_min l/M) in exact integer arithmetic
            return max(self.tau_min, (self.tau_max * (self.limit - start) + self.tau_min * start) // self.limit)
        if self.strategy == "exp_decay":
            decay = math.exp(-self.exp_rate * max(0, start - self.exp_threshold))
            return max(1, math.ceil(self.shift_interval * decay))
        return self.shift_interval

    @property
    def latest_start(self) -> int:
        """The latest window start any iteration reaches."""
        if self.strategy == "random":
            return self.limit - self.window_size
        if self.strategy == "frozen" or self.stride == 0:
            return 0
        if not self.roll_back:
            return self.limit - 1  # the clamp, once past the last start
        return (self.limit - 1) // self.stride * self.stride

    def start(self, iteration: int) -> int:
        """The window's first step at training iteration `iteration` (0-based)."""
        check_int("iteration", iteration, 0)
        if self.strategy == "random":
            return step_randint(self.seed, iteration, RANDOM_STREAM, 0, self.limit - self.window_size)
        if self.strategy == "frozen" or self.stride == 0:
            return 0
        starts = range(0, self.limit, self.stride)  # one pass; every start < limit has a non-empty window
        if self.roll_back:
            iteration %= sum(self.interval(start) for start in starts)
        for start in starts:
            if iteration < self.interval(start):
                return start
            iteration -= self.interval(start)
        return self.limit - 1  # clamped: past the last start, for good

    def _window(self, iteration: int) -> tuple[int, int]:
        start = self.start(iteration)
        return start, min(start + self.window_size, self.limit)

    def window(self, iteration: int) -> tuple[int, int]:
        """(start, end), end exclusive, of the SDE steps at `iteration`; remembered for `state_dict`."""
        window = self._window(iteration)
        self.last_iteration = iteration
        return window

    def state_dict(self) -> dict[str, int]:
        """{"iteration", "start", "end"} of the last window served (all -1 before the first)."""
        if self.last_iteration is None:
            return dict.fromkeys(STATE_KEYS, -1)
        start, end = self._window(self.last_iteration)
        return {"iteration": self.last_iteration, "start": start, "end": end}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume from `state_dict()`'s output; a ValueError if these settings give another window there."""
        if set(state) != set(STATE_KEYS) or not all(type(state[k]) is int for k in STATE_KEYS):
            raise ValueError(f"the MixGRPO window state must hold the ints {list(STATE_KEYS)}, got {dict(state)!r}")
        if state["iteration"] < 0:
            self.last_iteration = None
            return
        expected = (state["start"], state["end"])
        got = self._window(state["iteration"])
        if got != expected:
            raise ValueError(f"the checkpoint's MixGRPO window at iteration {state['iteration']} was {list(expected)} "
                             f"but these mixgrpo settings give {list(got)}: resume with the run's window settings")
        self.last_iteration = state["iteration"]


class FlashGrid(NamedTuple):
    """MixGRPO-Flash's schedule: `sigmas` (T' + 1,), the SDE `window` (start, end) (the same step indices
    as on the original grid) and the `post` steps (window end, T') that the post-window solver takes."""

    sigmas: torch.Tensor
    window: tuple[int, int]
    post: tuple[int, int]


def flash_sigmas(sigmas: torch.Tensor, window: tuple[int, int], ratio: float = 0.4, shift: float = 3.0
                 ) -> FlashGrid:
    """MixGRPO-Flash's re-gridded schedule: the steps up to the window's end as they are, the rest
    compressed (module docstring).

    Args:
        sigmas: (T + 1,) the original schedule, decreasing to 0 (a host tensor: it is read on the host).
        window: (start, end) of the SDE steps, 0 <= start < end <= T, as `WindowSchedule.window` gives.
        ratio: the authors' dpm_post_compress_ratio, in (0, 1].
        shift: the static time shift sigma = shift t / (1 + (shift - 1) t) of the schedule, undone to
            space the new points evenly in t and applied again.

    Returns:
        FlashGrid, its sigmas in the dtype and device of `sigmas`, computed in float64. The point right
        after the window is kept bit for bit (only the later points are new).
    """
    check_tensor("sigmas", sigmas, ndims=(1,))
    num_steps = sigmas.shape[0] - 1
    check_int("sigmas length - 1 (steps)", num_steps, 1)
    if not (isinstance(window, (tuple, list)) and len(window) == 2):
        raise ValueError(f"window must be (start, end), got {window!r}")
    start = check_int("window start", window[0], 0, num_steps - 1)
    end = check_int("window end", window[1], start + 1, num_steps)
    if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
    sig = sigmas.detach().to("cpu", torch.float64)
    rises = (sig[1:] >= sig[:-1]).nonzero()
    if sig[-1] != 0 or rises.numel():
        where = f"ending at {sig[-1].item()}" if sig[-1] != 0 else f"not decreasing after index {rises[0].item()}"
        raise ValueError(f"sigmas must decrease strictly to a terminal 0, got {num_steps + 1} values {where}")
    n = int(max((num_steps - (end - 1)) * ratio, 1))
    if end < num_steps:
        n = max(n, 2)  # the authors' n = 1 would end the grid at sigma[end] > 0
    first = sig[end]
    t_first = first / (shift - (shift - 1) * first)
    t = torch.linspace(float(t_first), 0.0, n, dtype=torch.float64)
    post = shift * t / (1 + (shift - 1) * t)
    post[0] = first
    new = torch.cat([sig[:end], post]).to(sigmas.device, sigmas.dtype)
    return FlashGrid(new, (start, end), (end, new.shape[0] - 1))


def window_schedule(cfg: Config) -> WindowSchedule:
    """The `WindowSchedule` of `--mixgrpo.*` for `cfg`'s sampler steps and seed (ValueError naming the setting)."""
    m = cfg.mixgrpo
    return WindowSchedule(cfg.sampling.num_steps, m.window_size, m.shift_interval, m.stride, m.limit, m.strategy,
                          m.roll_back, m.tau_max, m.tau_min, m.exp_threshold, m.exp_rate, cfg.seed)


@ALGORITHMS.register("mixgrpo")
class MixGRPO(FlowGRPO):
    """MixGRPO: Flow-GRPO on a sliding window of SDE steps with shared initial noise per group (see the
    module docstring)."""

    name = "mixgrpo"

    def __init__(self, cfg: Config, learner: Learner) -> None:
        super().__init__(cfg, learner)
        self.schedule = window_schedule(cfg)

    @classmethod
    def check(cls, cfg: Config) -> None:
        schedule = window_schedule(cfg)
        check_window_algorithm(cfg, schedule.latest_start,
                               f"mixgrpo (strategy {schedule.strategy}, limit {schedule.limit})",
                               "lower --mixgrpo.limit or raise --train.timestep_fraction (MixGRPO trains its "
                               "whole window: 1.0)")

    def plan(self, step: int) -> RolloutPlan:
        return RolloutPlan(sde_window=self.schedule.window(step - 1), shared_noise=True)

    def state_dict(self) -> dict[str, dict[str, int]]:
        return {"window": self.schedule.state_dict()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, int]]) -> None:
        if "window" in state:
            self.schedule.load_state_dict(state["window"])
