"""A KL to the reference policy on chosen (sample, trained step) pieces of a policy-gradient loss: GARDO's gated
KL (the gated samples, every trained step) and DiverseGRPO's early-step regulariser (every valid sample, the
first denoising steps).

The KL is the one the algorithm fuses into each re-evaluated step (`pec_kernels.SdeStep.kl`:
||mu_theta - mu_ref||^2 / (2 s^2) per sample, mean-reduced, in `--train.kl_units`), evaluated only for the
pieces whose `wants_reference` says so. Each such piece adds coef times the mean of KL x weight over its
micro-batch (the convention of `--train.kl_beta`, a coefficient per trained step's piece), or with
`over_weighted` the mean over the micro-batch's samples of weight > 0 (0 when it has none: GARDO's authors
average their KL over the gated samples).
"""
from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch

from pec.methods.base import LossTerms


class ReferenceKLTerms(LossTerms):
    """coef * mean(KL * weight[rows]) added to the pieces of the trained-step columns `columns`.

    weight: (B_local,) float per-sample weights of this rank (0 = no KL: masked or ungated samples);
    gather: the step's all-gather of per-sample rows (`StepContext.gather`), for the logged global mean;
    key: the metrics key of that mean (the KL over the pieces with weight > 0, 0 when there are none);
    over_weighted: average each piece's KL over its samples of weight > 0 instead of all its samples.
    """

    def __init__(self, coef: float, weight: torch.Tensor, columns: Collection[int],
                 gather: Callable[[torch.Tensor], torch.Tensor], key: str, *, over_weighted: bool = False) -> None:
        self.coef, self.weight, self.columns, self.gather, self.key = coef, weight, frozenset(columns), gather, key
        self.over_weighted = over_weighted
        # Per sample of this rank: the KL summed over its weighted pieces, and how many there were.
        self.kl_sum = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
        self.pieces = torch.zeros_like(self.kl_sum)

    def wants_reference(self, col: int) -> bool:
        return col in self.columns

    def piece_loss(self, col: int, loss: torch.Tensor, step: Any, idx: torch.Tensor) -> torch.Tensor | None:
        if col not in self.columns or step.kl is None:
            return None
        w = self.weight[idx]
        kl = step.kl.float() * w
        with torch.no_grad():
            self.kl_sum.index_add_(0, idx, kl.detach().double())
            self.pieces.index_add_(0, idx, (w > 0).double())
        mean = kl.sum() / (w > 0).sum().clamp_min(1) if self.over_weighted else kl.mean()
        return (self.coef * mean).to(loss.dtype)

    def mean_kl(self) -> torch.Tensor:
        """The KL averaged over the step's weighted pieces on every process (0-dim float64; a collective)."""
        both = self.gather(torch.stack([self.kl_sum, self.pieces], dim=1))
        return both[:, 0].sum() / both[:, 1].sum().clamp_min(1)

    def counts(self) -> dict[str, torch.Tensor]:
        return {self.key: self.mean_kl()}
