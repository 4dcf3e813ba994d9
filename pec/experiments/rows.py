"""The paper table's rows and modes, shared by `pec.experiments.paper_table` (which trains and evaluates
them) and `pec.experiments.paper_report` (which turns the evaluations into tables and verdicts)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# DiverseGRPO's open choices (its bonus weight beta on this world's reward scale, and the cluster count), swept once at
# --quick's seeds and steps
# by `--sweep` (docs/paper_table/sweep/sweep.md); the setting it chose is ROWS["diverse_grpo"].
# The bonus's weight beta is swept on the reward's scale, as PEC's lambda is: the digit reward's within-group std
# is ~0.2, and with k = 3 clusters of a group of 8 the bonus sqrt(N / n_c) spreads by ~0.6, so beta 0.1-1 puts
# it from a third of the reward's spread to three times it; the paper's beta 3 with the eigengap's cluster count
# is swept too (here the eigengap finds 1-1.5 clusters a group, so that bonus acts on few groups).
SWEEP: dict[str, list[str]] = {
    f"diverse_grpo_b{beta}_k{k}": ["--method", "diverse_grpo", "--diverse_grpo.beta", beta,
                                   "--diverse_grpo.clusters", k]
    for beta, k in (("0.1", "3"), ("0.3", "3"), ("1", "3"), ("0.3", "0"), ("3", "0"))}
DIVERSE_GRPO_CHOICE = "diverse_grpo_b1_k3"  # sweep.md's "Chosen:" (tests check the two agree)


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
    # PEC with lambda falling linearly to 0: the bonus keeps diversity early, and the reward can climb as far
    # as GRPO's by the end, so the frontier is read at GRPO's high-reward end too.
    "pec_decay": ["--method", "pec", "--pec.lambda", "0.5", "--pec.lambda_end", "0"],
    # The field's diversity methods (claim 4), in PEC's regulariser space (perceptual.space's default). GARDO: its
    # diversity-aware advantage alone (the gated KL and reference reset are built, pec.methods.gardo, but take
    # auxiliary rewards the paper's setting has and this world lacks a counterpart of). DiverseGRPO: the
    # setting `--sweep` chose (sweep.md), with its early-step regulariser at the method's defaults.
    "gardo": ["--method", "gardo"],
    "diverse_grpo": SWEEP[DIVERSE_GRPO_CHOICE],
    # The other RL algorithms alone and with PEC at pec_lambda0.5's lambda (claim 5).
    "nft": ["--algorithm", "nft", "--method", "none"],
    "nft_pec": ["--algorithm", "nft", "--method", "pec", "--pec.lambda", "0.5"],
    "mixgrpo": ["--algorithm", "mixgrpo", "--method", "none"],
    "mixgrpo_pec": ["--algorithm", "mixgrpo", "--method", "pec", "--pec.lambda", "0.5"],
}
COMMON = ["--train.minibatches", "2"]
ALIASES = {"entropy_bonus": "grpo"}  # table row -> the run it is by construction
GUIDANCE_SUFFIX = "+guidance"
MILESTONES = 5  # evaluated checkpoints per run: every 20% of it


def guided(row: str) -> bool:
    """Whether `row` is a PCGS guided run (evaluated twice: alone and with its guidance)."""
    options = options_of(row)
    return "--pcgs.form" in options and options[options.index("--pcgs.form") + 1] == "guided"


@dataclass(frozen=True)
class Mode:
    """What one mode trains: seeds, steps per run, rows, and its time budget on 2 CPU cores."""

    seeds: tuple[int, ...]
    steps: int
    rows: tuple[str, ...]
    budget_min: float


# --quick: the rows each claim needs at least once (GRPO and GRPO + KL, one PEC and one PCGS row, the field's
# methods, the other algorithms with and without PEC); --full: every row. Budgets are on 2 idle cores; the
# modes are sized to take at most ~2/3 of them on this project's machine, since another 2-core machine took
# 1.5x as long.
def options_of(row: str) -> list[str]:
    """The training options of a table or sweep row."""
    return ROWS[row] if row in ROWS else SWEEP[row]


QUICK_ROWS = ("grpo", "grpo_kl", "pec_lambda0.5", "pcgs_policy", "gardo", "diverse_grpo", "nft", "nft_pec", "mixgrpo",
              "mixgrpo_pec")
MODES = {"quick": Mode(seeds=(0, 1), steps=100, rows=QUICK_ROWS, budget_min=45),
         "full": Mode(seeds=(0, 1, 2), steps=250, rows=tuple(ROWS), budget_min=150),
         "sweep": Mode(seeds=(0, 1), steps=100, rows=("grpo", *SWEEP), budget_min=45)}
HEADROOM = 1.5  # slower machine / this machine, measured: a mode's time here must stay under budget / HEADROOM


def milestone_steps(steps: int) -> list[int]:
    """The evaluated steps of a run of `steps`: every `steps // MILESTONES` (at least 1) and the last."""
    every = max(1, steps // MILESTONES)
    return sorted(set(range(every, steps + 1, every)) | {steps})


def seed_dir(out: Path, seed: int) -> Path:
    """The folder of one seed's runs."""
    return out / f"seed{seed}"
