"""Flow-GRPO-Fast's random SDE window: w consecutive SDE (trained) steps starting at a random l, ODE
steps elsewhere (DESIGN.md §2.3, §2.7).

Authors' code (yifan123/flow_grpo; research notes /work/notes/algorithms.md §3): `scripts/train_sd3_fast.py`
@74db691 (`main`), `config/grpo.py` @31c71b9 (the `*_fast*` presets), and the fast pipeline
`flow_grpo/diffusers_patch/sd3_pipeline_with_logprob_fast.py`, read from the fork zhtmike/flow_grpo
@3d02fd9 (the upstream file is not in the index). The draw there is Python's `random.randint(r0, r1 - w)`,
both ends inclusive, and the window is [l, l + w).

| setting               | default here        | SD3.5 `*_sd3_fast_nocfg` | FLUX `*_flux_fast` | from           |
|-----------------------|---------------------|--------------------------|--------------------|----------------|
| window_size w         | 3                   | 3                        | 3                  | config/grpo.py |
| window_range (r0, r1) | (0, num_steps // 2) | (0, 5) at T = 10         | (0, 3) at T = 6    | config/grpo.py |
| kind, eta             | (config)            | cps, 0.8                 | cps, 0.8           | config/grpo.py |
| clip, KL              | (config)            | 1e-5, beta 0             | 1e-5, beta 0       | config/grpo.py |
With the FLUX preset's range (0, 3) and w = 3 the start is always 0: the window is fixed at steps 0-2.

Where we differ from the authors, and why: the issue asks for the start to be drawn once per training step
from the run's seed, the same on every rank: l = `step_randint(seed, step, "flow_grpo_fast.window", r0,
r1 - w)`. The authors draw once per pipeline call, i.e. per sampling batch, on each rank's own stream
(`set_seed(seed, device_specific=True)` seeds `random` with seed + rank), so the members of one group,
spread over batches and ranks, are sampled with different windows. Here every sample of a step shares one
window: a group differs only by its noise, its advantages compare like with like, the step's trained
steps are the same on every rank (which FSDP/DDP's equal work per rank needs), and a resumed or
re-sharded run draws the same windows. Still uniform over the same range; only the granularity differs.
A window size of 0 (the authors' "no window": every step but the last) is plain Flow-GRPO, not this.
"""
from __future__ import annotations

from pec.algorithms.windows import check_int, step_randint

STREAM = "flow_grpo_fast.window"
DEFAULT_WINDOW_SIZE = 3


def default_window_range(num_steps: int) -> tuple[int, int]:
    """The authors' presets' range (0, T // 2): (0, 5) for SD3.5's 10 steps, (0, 3) for FLUX's 6."""
    return 0, check_int("sampling.num_steps", num_steps, 1) // 2


def check_fast_window(window_size: int, window_range: tuple[int, int], num_steps: int) -> tuple[int, int]:
    """The range (r0, r1) as ints if a window of `window_size` steps fits in it within [0, num_steps];
    else a one-line ValueError naming the setting."""
    num_steps = check_int("sampling.num_steps", num_steps, 1)
    check_int("flow_grpo_fast.window_size", window_size, 1, num_steps)
    if (not isinstance(window_range, (tuple, list)) or len(window_range) != 2
            or not all(isinstance(r, int) and not isinstance(r, bool) for r in window_range)
            or not 0 <= window_range[0] < window_range[1] <= num_steps):
        raise ValueError(f"flow_grpo_fast.window_range must be two integers r0 < r1 within [0, num_steps="
                         f"{num_steps}], got {window_range!r}")
    r0, r1 = window_range
    if r1 - r0 < window_size:
        raise ValueError(f"flow_grpo_fast.window_range [{r0}, {r1}) holds no window of flow_grpo_fast.window_size "
                         f"{window_size} steps: widen the range to r1 - r0 >= {window_size} or shrink the window")
    return r0, r1


def fast_window(seed: int, step: int, window_size: int, window_range: tuple[int, int], num_steps: int
                ) -> tuple[int, int]:
    """The SDE window (l, l + w), end exclusive, of training step `step`: l uniform in [r0, r1 - w], both
    inclusive, a pure function of (seed, step), the same on every rank.

    Args:
        seed: the run's seed.
        step: the training step (0-based).
        window_size: w, the window's steps.
        window_range: (r0, r1): the window lies inside steps [r0, r1).
        num_steps: T, the sampler's steps (the range must lie within them).
    """
    r0, r1 = check_fast_window(window_size, window_range, num_steps)
    start = step_randint(seed, step, STREAM, r0, r1 - window_size)
    return start, start + window_size
