"""Clip-Cov and KL-Cov (Cui et al. 2025) as regularisers: the step's (sample, trained step) entries with the
highest covariance of log pi (native) or of the perceptual log-density (perceptual) with the advantage
get their gradient detached (Clip-Cov) or a penalty |log pi_old - log pi| (KL-Cov). The math is
`pec.covariance`; the selection is made once per step over the global batch, seeded by (seed, step).
"""
from __future__ import annotations

import torch

from pec.covariance import CovSelection, select_entries
from pec.methods.base import LossTerms, Method, StepContext, TermsInputs
from pec.methods.registry import METHODS
from pec.seeding import step_seed


class _CovTerms(LossTerms):
    """This process's rows of the step's selection."""

    def __init__(self, selection: CovSelection) -> None:
        self.selection = selection

    def ratio_inputs(self, idx: torch.Tensor, col: int, log_prob: torch.Tensor, old: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.selection.apply(idx, col, log_prob, old)

    def counts(self) -> dict[str, torch.Tensor]:
        return self.selection.counts()


class _Covariance(Method):
    """The shared selection of Clip-Cov and KL-Cov."""

    def requirements(self) -> dict[str, str]:
        needs = {"ratio": f"{self.name} acts on the entries of a clipped policy-gradient loss"}
        if self.cfg.cov.variant == "native" or self.name == "kl_cov":
            needs["log_probs"] = ("its covariance is of each trained step's log pi" if self.cfg.cov.variant == "native"
                                  else "its penalty is |log pi_old - log pi| of each trained step")
        return needs

    def loss_terms(self, inputs: TermsInputs, ctx: StepContext) -> LossTerms:
        cov = self.cfg.cov
        density = inputs.log_probs if cov.variant == "native" else -inputs.surprisal
        fraction = cov.detach_fraction if self.name == "clip_cov" else cov.kl_fraction
        selection = select_entries(self.name, ctx.gather(density), inputs.advantages, inputs.valid,
                                   band=cov.band, fraction=fraction, kl_coef=cov.kl_coef,
                                   generator=torch.Generator().manual_seed(step_seed(self.cfg.seed, ctx.step,
                                                                                     stream=4)))
        return _CovTerms(selection.rows(ctx.index))


@METHODS.register("clip_cov")
class ClipCov(_Covariance):
    """Clip-Cov: detach the gradient of a random part of the high-covariance band."""

    name = "clip_cov"


@METHODS.register("kl_cov")
class KLCov(_Covariance):
    """KL-Cov: penalise |log pi_old - log pi| on the top-covariance entries."""

    name = "kl_cov"
