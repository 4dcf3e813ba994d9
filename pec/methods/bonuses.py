"""The reward-bonus regularisers: none (plain RL), PEC, and the entropy baselines of the paper.

- `none` (also spelled `grpo`, its name before algorithms other than Flow-GRPO existed): the reward
  itself in every column.
- `pec` (DESIGN.md 2.4): R~_t = R + lambda * omega_t * surprisal (`pec.regularizers.pec_reward`); lambda
  constant, or linear over the run to `pec.lambda_end`.
- `entropy_bonus`: the analytic policy entropy in the loss, -coef * H(pi_t) per trained step. H depends on
  the schedule only, so the term is a constant with no gradient: the run equals plain RL (the paper's
  diagnosis). Needs Gaussian SDE steps.
- `entropy_sample`: the per-sample reading, R_t - sample_coef * log pi_t(x'|x) of each trained transition
  (GRPO plus zero-mean noise). Needs per-step log-probs.
- `perc_entropy_bonus`: the perceptual entropy, analytic reading: R + coef * the batch's mean surprisal,
  one number for every sample of every process, which group normalisation removes.
"""
from __future__ import annotations

import torch

from pec.methods.base import LossTerms, Method, ShapingInputs, StepContext, TermsInputs
from pec.methods.registry import METHODS
from pec.regularizers import omega_weights, pec_reward


@METHODS.register("none")
@METHODS.register("grpo")
class NoRegulariser(Method):
    """Plain RL: the reward in every column."""

    name = "none"


@METHODS.register("pec")
class PEC(Method):
    """PEC's perceptual-surprisal bonus."""

    name = "pec"

    def lam(self, step: int) -> float:
        """lambda at training step `step` (1-based): pec.lambda, or its linear schedule to pec.lambda_end."""
        start, end, steps = self.cfg.pec.lambda_, self.cfg.pec.lambda_end, self.cfg.train.steps
        if end is None or steps <= 1:
            return start
        return start + (end - start) * (min(step, steps) - 1) / (steps - 1)

    def shape(self, inputs: ShapingInputs, ctx: StepContext) -> torch.Tensor:
        omega = omega_weights(self.cfg.pec.omega, inputs.columns, device=inputs.rewards.device)
        return pec_reward(inputs.rewards, inputs.surprisal, self.lam(ctx.step), omega)


class _EntropyBonusTerms(LossTerms):
    """-coef * H_t added to every piece of trained step t (H_t host floats)."""

    def __init__(self, coef: float, step_entropy: list[float]) -> None:
        self.coef, self.step_entropy = coef, step_entropy

    def piece_loss(self, col: int, loss: torch.Tensor, step: object, idx: torch.Tensor) -> torch.Tensor:
        # The analytic policy entropy depends on the schedule only: this term adds a constant to the loss
        # and nothing to the gradient.
        return -(self.coef * loss.new_full((), self.step_entropy[col]))


@METHODS.register("entropy_bonus")
class EntropyBonus(Method):
    """The analytic policy-entropy bonus in the loss."""

    name = "entropy_bonus"
    needs = {"policy_entropy": "its bonus is the entropy of each trained step's Gaussian policy"}

    def loss_terms(self, inputs: TermsInputs, ctx: StepContext) -> LossTerms:
        return _EntropyBonusTerms(self.cfg.entropy_bonus.coef, inputs.step_entropy)


@METHODS.register("entropy_sample")
class EntropySample(Method):
    """The per-sample policy-entropy bonus -log pi of each trained transition."""

    name = "entropy_sample"
    needs = {"log_probs": "its bonus is -log pi of each trained transition"}

    def shape(self, inputs: ShapingInputs, ctx: StepContext) -> torch.Tensor:
        # 1/2 mean(eps^2) + a per-step constant: its policy gradient is zero in expectation (an odd moment
        # of eps), so this is GRPO plus noise, as the paper's Table 3 "PEC with H" suggests.
        return inputs.rewards.float()[:, None] - self.cfg.entropy_bonus.sample_coef * inputs.log_probs.detach().float()


@METHODS.register("perc_entropy_bonus")
class PerceptualEntropyBonus(Method):
    """The batch's perceptual entropy as a reward bonus (the same for every sample)."""

    name = "perc_entropy_bonus"

    def shape(self, inputs: ShapingInputs, ctx: StepContext) -> torch.Tensor:
        bonus = self.cfg.entropy_bonus.coef * ctx.gather(inputs.surprisal.detach().float()).mean()
        return inputs.rewards.float()[:, None].expand(-1, inputs.columns) + bonus
