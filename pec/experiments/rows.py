"""The paper table's rows and modes, shared by `pec.experiments.paper_table` (which trains and evaluates
them) and `pec.experiments.paper_report` (which turns the evaluations into tables and verdicts)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Row -> training options. Lambdas: the paper's (PEC 0.05 / 0.10, PCGS 0.03 / 0.10) are relative to
# PickScore/26, whose within-group std is ~0.02. Here the digit reward's within-group std is ~0.2 and
# the per-dimension kNN surprisal's ~0.16, so the lambdas keep the paper's ratios with the larger one
# at 0.5 (bonus spread ~1/3 of the reward's). GRPO + KL quotes Flow-GRPO's beta 0.04 in its units
# (|dt| x the exact KL per step, pec.sampling.kl_in_units). Clip-Higher: DAPO's 1.4 x clip_range.
ROWS: dict[str, list[str]] = {
    "grpo": ["--method", "grpo"],
    "grpo_kl": ["--method", "grpo", "--train.kl_beta", "0.04", "--train.kl_units", "flow_grpo"],
    "entropy_sample": ["--method", "entropy_sample"],
    "pec_lambda0.25": ["--method", "pec", "--pec.lambda", "0.25"],
    "pec_lambda0.5": ["--method", "pec", "--pec.lambda", "0.5"],
    "pcgs_policy": ["--method", "pcgs", "--pcgs.lambda", "0.5"],
    "pcgs_latent": ["--method", "pcgs", "--pcgs.lambda", "0.5", "--pcgs.generation_density", "latent_group"],
    "pcgs_guided_w0.05": ["--method", "pcgs", "--pcgs.form", "guided", "--pcgs.guidance_weight", "0.05"],
    "pcgs_guided_w0.1": ["--method", "pcgs", "--pcgs.form", "guided", "--pcgs.guidance_weight", "0.1"],
    "clip_higher": ["--method", "grpo", "--train.clip_range_high", "1.4e-3"],
    "clip_cov": ["--method", "clip_cov", "--cov.variant", "perceptual"],
    "clip_cov_native": ["--method", "clip_cov", "--cov.variant", "native"],
    "kl_cov": ["--method", "kl_cov", "--cov.variant", "perceptual"],
    "kl_cov_native": ["--method", "kl_cov", "--cov.variant", "native"],
}
COMMON = ["--train.minibatches", "2"]
ALIASES = {"entropy_bonus": "grpo"}  # table row -> the run it is by construction
GUIDANCE_SUFFIX = "+guidance"
MILESTONES = 5  # evaluated checkpoints per run: every 20% of it


def guided(row: str) -> bool:
    """Whether `row` is a PCGS guided run (evaluated twice: alone and with its guidance)."""
    return "--pcgs.form" in ROWS[row] and ROWS[row][ROWS[row].index("--pcgs.form") + 1] == "guided"


@dataclass(frozen=True)
class Mode:
    """What one mode trains: seeds, steps per run, rows, and its time budget on 2 CPU cores."""

    seeds: tuple[int, ...]
    steps: int
    rows: tuple[str, ...]
    budget_min: float


MODES = {"quick": Mode(seeds=(0, 1), steps=100, rows=tuple(ROWS), budget_min=45),
         "full": Mode(seeds=(0, 1, 2), steps=250, rows=tuple(ROWS), budget_min=100)}


def milestone_steps(steps: int) -> list[int]:
    """The evaluated steps of a run of `steps`: every `steps // MILESTONES` (at least 1) and the last."""
    every = max(1, steps // MILESTONES)
    return sorted(set(range(every, steps + 1, every)) | {steps})


def seed_dir(out: Path, seed: int) -> Path:
    """The folder of one seed's runs."""
    return out / f"seed{seed}"
