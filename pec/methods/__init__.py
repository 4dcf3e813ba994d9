"""The regularisers (`--method`): none, PEC, PCGS and the paper's baselines, each a `Method` (see
`pec.methods.base` for the hooks). Importing this package registers them all in `METHODS`."""
from __future__ import annotations

from pec.config import Config
from pec.methods import bonuses, covariance, pcgs  # noqa: F401  (each module registers its methods)
from pec.methods.base import Method
from pec.methods.registry import METHODS

__all__ = ["METHODS", "Method", "build_method"]


def build_method(cfg: Config) -> Method:
    """The regulariser `cfg.method` names; ValueError naming --method when there is none."""
    if cfg.method not in METHODS.names():
        raise ValueError(f"method must be one of {METHODS.names()}, got {cfg.method!r}")
    return METHODS.build(cfg.method, cfg=cfg)
