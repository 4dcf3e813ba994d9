"""GRPO-Guard (`--algorithm grpo_guard`): its normalised importance ratio and |dt|-scaled clipped surrogate
(DESIGN.md §2.7), and the algorithm behind the trainer's loop.

GRPO-Guard (arXiv 2510.22319) replaces Flow-GRPO's per-step ratio exp(log p_theta - log p_old), whose
log is biased (its mean under the rollout noise is -mean((mu_theta - mu_old)^2) / (2 s^2), more negative
at steps with small noise) and whose spread differs by orders of magnitude between steps, with
    log rho = s (log p_theta - log p_old + b),   b = mean((mu_theta - mu_old)^2) / (2 s^2),
for a trained step with scalar noise std s (the std the sampler added). With the exact Gaussian
log-probabilities mean-reduced over the non-batch dimensions (DESIGN.md §2.1) and x' = mu_old + s xi,
this is exactly
    log rho = mean((mu_theta - mu_old) xi),   xi = (x' - mu_old) / s,
zero-mean under the rollout noise and comparable across steps. `guard_log_ratio` computes this second
form: the first subtracts two log-probs of order 1 whose difference is of order |mu_theta - mu_old| / s
(losing digits) and is exactly 0 on-policy only if both round alike, while here mu_theta == mu_old gives
log rho = 0, rho = 1 bit for bit. The identity needs the normalised Gaussian
log-prob: Flow-GRPO's unnormalised cps log-prob -mean((x' - mu)^2) breaks it (Flow-Factory restricts
GRPO-Guard to its Gaussian `Flow-SDE`; verl-omni's example uses `sde_type=sde`). `pec_kernels` computes
the normalised Gaussian log-prob for every kind (flow, dance and cps), so all three compose here.
mu_old must be stored at rollout (verl-omni's `old_prev_sample_mean`, Flow-Factory's `next_latents_mean`).

The loss (`guard_surrogate`) is PPO's clipped surrogate on rho (`pec.grpo.clipped_surrogate`, given
log rho as the log-prob and 0 as the old one) divided by |dt| of the step: since mu_theta moves with
dt v_theta, the gradient of log rho scales with |dt|, and the division evens the steps out.

Sources: there is no official code ("code not released"); both re-implementations agree on the ratio
(research notes /work/notes/algorithms.md §4): verl-project/verl-omni @a1139ba
`verl_omni/trainer/diffusion/diffusion_algos.py` (`GRPOGuardLoss.compute_loss`), `docs/algo/grpo_guard.md`,
`examples/grpoguard_trainer/qwen_image/run_qwen_image_ocr_lora.sh`; X-GenGroup/Flow-Factory @a0b2bc5
`src/flow_factory/trainers/grpo.py` (`GRPOGuardTrainer.optimize`).

| setting            | default here    | verl-omni (Qwen-Image example)  | Flow-Factory | DESIGN §2.7               |
|--------------------|-----------------|---------------------------------|--------------|---------------------------|
| |dt| loss scaling  | dt_scaling=True | yes: mean loss / sqrt(-dt)^2    | no           | yes                       |
| clip epsilon       | (config)        | 2e-6                            | -            | 2e-6..4e-6 (4e-6 unsourced) |
| KL                 | (config)        | off                             | -            | none                      |
| SDE kind           | (config)        | sde (Flow-GRPO's Gaussian)      | Flow-SDE     | -                         |
| adv. clip, lr      | (config)        | 5, 3e-4                         | -            | -                         |
The |dt| division follows verl-omni (and the paper's summaries: "1/dt reweighting"); Flow-Factory leaves it
out, hence the option. verl-omni takes s as the batch mean of each factor, one scalar per step; here s may
also be one value per sample (a batch mixing steps), each row divided by its own s.

The algorithm, `GRPOGuard`, is Flow-GRPO (`pec.algorithms.flow_grpo`: the same SDE steps, `--sampling.sde_window`
and trained steps) whose rollout records each step's mean (mu_old, `RolloutPlan.record_means`) and whose
piece loss (`GRPOGuard.piece_loss`) is `guard_surrogate` of `guard_log_ratio(mu_theta, mu_old, x', s_t)`,
mu_theta the re-evaluated step's mean (`pec.sampling.step_log_prob(..., return_mean=True)`), x' the rollout's
sample of the step and s_t its noise std; with `--grpo_guard.dt_scaling` (default on) each step's surrogate
is divided by its |dt|. The first update's ratio is exactly 1: mu_theta == mu_old bit for bit on-policy.

The regularisers act on the log-ratio that enters the clip, here log rho, with 0 as the old value:
Clip-Cov detaches log rho on its selected entries (they add nothing to the gradient, as under Flow-GRPO),
KL-Cov adds kl_coef * |log rho| on its entries, the magnitude of the ratio the surrogate clips (under
Flow-GRPO, |log pi_old - log pi|); with dt_scaling the penalty is divided by |dt| like the surrogate, so
that it keeps its weight against the surrogate at every step. Their selection (the covariance of the
stored log pi, or of the perceptual log-density, with A) is unchanged. The KL to the reference and the
entropy bonus are Flow-GRPO's.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch

from pec.algorithms.base import RolloutPlan
from pec.algorithms.flow_grpo import FlowGRPO
from pec.algorithms.registry import ALGORITHMS
from pec.grpo import SurrogateStats, clipped_surrogate
from pec.sampling import Rollout, step_log_prob
from pec_kernels import SdeStep, check_tensor

if TYPE_CHECKING:
    from pec.methods.base import LossTerms


def _check_number(name: str, value: object, *, positive: bool = False) -> float:
    """`value` as a float if it is a finite nonzero number (> 0 when `positive`), else a one-line ValueError."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value == 0
            or (positive and value < 0)):
        raise ValueError(f"{name} must be a finite {'positive' if positive else 'nonzero'} number or a tensor, "
                         f"got {value!r}")
    return float(value)


def guard_log_ratio(mu_theta: torch.Tensor, mu_old: torch.Tensor, next_latent: torch.Tensor,
                    std: float | torch.Tensor) -> torch.Tensor:
    """GRPO-Guard's log rho = mean((mu_theta - mu_old) xi), xi = (x' - mu_old) / s, per sample.

    Args:
        mu_theta: (B, ...) the step's Gaussian mean under the current policy (differentiable).
        mu_old: (B, ...) the mean at rollout (a constant).
        next_latent: (B, ...) x', the rollout's sample of the step (a constant).
        std: s > 0, the step's noise std: a float, a 0-dim tensor or one value per sample (B,). A step
            with s = 0 (an ODE step) has no ratio and must not reach here: its xi would be inf.

    Returns:
        (B,) log rho, differentiable in mu_theta, in float32 (float64 for float64 inputs); exactly 0
        where mu_theta == mu_old.
    """
    check_tensor("mu_theta", mu_theta)
    if mu_theta.dim() < 2:
        raise ValueError(f"mu_theta must be (B, ...) with at least one non-batch dimension, "
                         f"got shape {tuple(mu_theta.shape)}")
    for name, value in (("mu_old", mu_old), ("next_latent", next_latent)):
        check_tensor(name, value)
        if value.shape != mu_theta.shape:
            raise ValueError(f"{name} must have the shape of mu_theta, {tuple(mu_theta.shape)}, "
                             f"got {tuple(value.shape)}")
    dtype = torch.promote_types(mu_theta.dtype, torch.float32)
    if isinstance(std, torch.Tensor):  # its values are not read on the host: that would synchronise
        check_tensor("std", std, ndims=(0, 1))
        if std.dim() == 1 and std.shape[0] != mu_theta.shape[0]:
            raise ValueError(f"std must be a scalar or hold one value per sample ({mu_theta.shape[0]}), "
                             f"got shape {tuple(std.shape)}")
        s = std.detach().to(dtype).reshape(-1, *([1] * (mu_theta.dim() - 1)))
    else:
        s = _check_number("std", std, positive=True)
    old = mu_old.detach().to(dtype)
    xi = (next_latent.detach().to(dtype) - old) / s
    return ((mu_theta.to(dtype) - old) * xi).flatten(1).mean(dim=1)


def guard_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float,
                    dt: float | torch.Tensor, *, dt_scaling: bool = True, valid: torch.Tensor | None = None,
                    clip_range_high: float | None = None) -> tuple[torch.Tensor, SurrogateStats]:
    """GRPO-Guard's loss: -mean min(rho A, clip(rho, 1 - eps, 1 + eps_high) A), divided by |dt| when
    `dt_scaling` (verl-omni; Flow-Factory: no division).

    Args:
        log_ratio: log rho from `guard_log_ratio`, any shape ((B,) for one step, (B, T) for several).
        advantages: same shape.
        clip_range, clip_range_high, valid: as `pec.grpo.clipped_surrogate` (Clip-Higher composes).
        dt: the step's sigma_next - sigma (< 0): a float, or a tensor that broadcasts to `log_ratio`
            (one value per element where a batch mixes steps; not read on the host).
        dt_scaling: divide by |dt| (default, as verl-omni).

    Returns:
        (loss, stats) as `clipped_surrogate`; the stats describe rho and are the same either way.
    """
    if dt_scaling:
        # max(-A rho, -A clip(rho)) / |dt| == max(-(A / |dt|) rho, -(A / |dt|) clip(rho)) as |dt| > 0, so the
        # division also works per element, where a batch mixes steps with different dt.
        if isinstance(dt, torch.Tensor):  # not read on the host: that would synchronise
            check_tensor("dt", dt)
            try:
                shape = torch.broadcast_shapes(dt.shape, log_ratio.shape)
            except RuntimeError:
                shape = None
            if shape != log_ratio.shape:
                raise ValueError(f"dt must broadcast to the shape of log_ratio, {tuple(log_ratio.shape)}, "
                                 f"got {tuple(dt.shape)}")
            advantages = advantages / dt.detach().abs().to(advantages.dtype)
        else:
            advantages = advantages / abs(_check_number("dt", dt))
    return clipped_surrogate(log_ratio, torch.zeros_like(log_ratio), advantages, clip_range, valid,
                             clip_range_high=clip_range_high)


@ALGORITHMS.register("grpo_guard")
class GRPOGuard(FlowGRPO):
    """GRPO-Guard: Flow-GRPO with the normalised per-step ratio (see the module docstring)."""

    name = "grpo_guard"

    def plan(self, step: int) -> RolloutPlan:
        return dataclasses.replace(super().plan(step), record_means=True)

    def piece_loss(self, rollout: Rollout, t_index: int, col: int, idx: torch.Tensor, adv: torch.Tensor,
                   keep: torch.Tensor, v_ref: torch.Tensor | None, terms: LossTerms | None
                   ) -> tuple[torch.Tensor, SurrogateStats, SdeStep]:
        """`guard_surrogate` of the piece's log rho (see the module docstring for the regularisers' terms)."""
        cfg = self.cfg
        out = step_log_prob(self.learner.policy.model, rollout, t_index, idx, v_ref=v_ref,
                            kl_units=cfg.train.kl_units, return_mean=True)
        # s_t from the host-side schedule (a CPU tensor: no device read); dt stays on the device.
        log_ratio = guard_log_ratio(out.mean, rollout.means[t_index, idx], rollout.latents[t_index + 1, idx],
                                    rollout.step_std.tolist()[t_index])
        penalty = None
        if terms is not None:
            log_ratio, penalty = terms.ratio_inputs(idx, col, log_ratio, torch.zeros_like(log_ratio))
        dt = rollout.sigmas[t_index + 1] - rollout.sigmas[t_index]
        dt_scaling = cfg.grpo_guard.dt_scaling
        loss, stats = guard_surrogate(log_ratio, adv, cfg.train.clip_range, dt, dt_scaling=dt_scaling, valid=keep,
                                      clip_range_high=cfg.train.clip_range_high)
        if penalty is not None:
            loss = loss + (penalty / dt.abs() if dt_scaling else penalty)
        return loss, stats, out
