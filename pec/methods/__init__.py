"""The regularisers (`--method`): none, PEC, PCGS and the paper's baselines, each a `Method` (see
`pec.methods.base` for the hooks). Importing this package registers them all in `METHODS`."""
from __future__ import annotations

from pec.config import Config
from pec.methods import bonuses, covariance, diverse_grpo, gardo, pcgs  # noqa: F401  (each registers its methods)
from pec.methods.base import Method
from pec.methods.registry import METHODS

__all__ = ["METHODS", "VARIANTS", "Method", "build_method"]


def build_method(cfg: Config) -> Method:
    """The regulariser `cfg.method` names; ValueError naming --method when there is none."""
    if cfg.method not in METHODS.names():
        raise ValueError(f"method must be one of {METHODS.names()}, got {cfg.method!r}")
    return METHODS.build(cfg.method, cfg=cfg)


# The readings of every regulariser a user can pick (the columns of the algorithm x regulariser table in
# the README, `pec.algorithms.composition_table`): a label and the options that select it.
VARIANTS: dict[str, dict] = {
    "none": {"method": "none"},
    "pec": {"method": "pec"},
    "pcgs reward (policy)": {"method": "pcgs"},
    "pcgs reward (latent_group)": {"method": "pcgs", "pcgs": {"generation_density": "latent_group"}},
    "pcgs guided": {"method": "pcgs", "pcgs": {"form": "guided"}},
    "entropy_bonus": {"method": "entropy_bonus"},
    "entropy_sample": {"method": "entropy_sample"},
    "perc_entropy_bonus": {"method": "perc_entropy_bonus"},
    "clip_cov (perceptual)": {"method": "clip_cov", "cov": {"variant": "perceptual"}, "train": {"minibatches": 2}},
    "clip_cov (native)": {"method": "clip_cov", "cov": {"variant": "native"}, "train": {"minibatches": 2}},
    "kl_cov (perceptual)": {"method": "kl_cov", "cov": {"variant": "perceptual"}, "train": {"minibatches": 2}},
    "kl_cov (native)": {"method": "kl_cov", "cov": {"variant": "native"}, "train": {"minibatches": 2}},
    "Clip-Higher": {"method": "none", "train": {"minibatches": 2, "clip_range_high": 1.4e-3}},
    "KL to the reference": {"method": "none", "train": {"kl_beta": 0.04}},
    "gardo": {"method": "gardo"},
    "gardo + gated KL": {"method": "gardo", "gardo": {"kl_coef": 0.04, "aux_rewards": ["contrast", "smoothness"]}},
    "diverse_grpo": {"method": "diverse_grpo"},
    "diverse_grpo (bonus only)": {"method": "diverse_grpo", "diverse_grpo": {"reg_coef": 0.0}},
}
