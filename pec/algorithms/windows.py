"""The checks shared by the window algorithms (MixGRPO, Flow-GRPO-Fast): their integer settings and the
configurations they refuse, each a one-line ValueError naming the setting. A window is (start, end), end
exclusive, as `sampling.sde_window`. Their per-step draws are `pec.seeding.step_randint` (the run's one
seeding scheme)."""
from __future__ import annotations

from pec.config import Config, trainable_steps


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """`value` as an int if it is an integer in [low, high] (high None = no upper bound), else a one-line
    ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        expected = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def check_window_algorithm(cfg: Config, latest_start: int, setting: str, fix: str) -> None:
    """What every window algorithm (`cfg.algorithm`, which places its own SDE window) refuses, as a one-line
    ValueError: a fixed `sampling.sde_window`, and a window that may start at `latest_start` (as `setting`
    allows) where no step can train under the one rule (`pec.config.trainable_steps`), so that its step would
    train nothing; `fix` says what to change then."""
    s, t = cfg.sampling, cfg.train
    if s.sde_window is not None:
        raise ValueError(f"sampling.sde_window fixes Flow-GRPO's SDE steps, but --algorithm {cfg.algorithm} places "
                         f"its own window (--{cfg.algorithm}.*): leave sampling.sde_window empty")
    n = trainable_steps(s, t)
    if latest_start >= n:
        cps = ", less the last step, whose noise std is 0 with kind cps" if s.kind == "cps" else ""
        raise ValueError(f"{setting} lets the window start at step {latest_start}, but only steps before {n} can "
                         f"train (train.timestep_fraction {t.timestep_fraction} keeps the first "
                         f"int({s.num_steps} x {t.timestep_fraction}) steps{cps}), so that window would train "
                         f"nothing: {fix}")
