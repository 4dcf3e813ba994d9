"""GRPO pieces (DESIGN.md 2.3): group-normalised advantages and the clipped surrogate.

The KL to the reference comes fused with the step log-prob (`pec_kernels` SdeStep.kl).

Everything here is plain tensor math with no model in sight, so it is unit-tested on its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pec_kernels import check_tensor


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, global_std: bool = False,
                     eps: float = 1e-4, clip: float | None = None, valid: torch.Tensor | None = None,
                     num_groups: int | None = None) -> torch.Tensor:
    """Advantages A = (R - mean_group) / (std + eps), computed independently for every column.

    Args:
        rewards: (B,) or (B, T) rewards; a (B, T) array holds one (possibly shaped) reward per trained
            step, and each column is normalised on its own (DESIGN.md 2.4).
        group_ids: (B,) integer id of each sample's prompt group (any integers; need not be contiguous).
        global_std: divide by the std of the whole column instead of the group's (Flow-GRPO's
            `global_std`); the mean is always the group's.
        eps: added to the std, so a group of identical rewards gets advantage 0, not NaN.
        clip: clamp the advantages to [-clip, clip] when given.
        valid: (B,) bool mask of the samples to learn from (`pec.run_safety.sample_validity`). Invalid
            rows get advantage 0 and are left out of every mean and std; their rewards may be NaN.
        num_groups: when the ids are known to be 0 .. num_groups - 1 (the trainer's), they index the
            groups directly; otherwise `torch.unique` finds the groups, at a host synchronisation.

    Returns:
        float32 advantages with the shape of `rewards`. The std is the population std (ddof 0).
    """
    check_tensor("rewards", rewards, ndims=(1, 2))
    check_tensor("group_ids", group_ids, ndims=(1,), dtypes=(torch.int32, torch.int64))
    if group_ids.shape[0] != rewards.shape[0]:
        raise ValueError(f"group_ids must have one entry per reward row ({rewards.shape[0]}), "
                         f"got {group_ids.shape[0]}")
    squeeze = rewards.dim() == 1
    r = rewards.float().reshape(rewards.shape[0], -1)
    if valid is None:
        valid = torch.ones(r.shape[0], dtype=torch.bool, device=r.device)
    check_tensor("valid", valid, ndims=(1,), dtypes=(torch.bool,))
    if valid.shape[0] != r.shape[0]:
        raise ValueError(f"valid must have one entry per reward row ({r.shape[0]}), got {valid.shape[0]}")
    w = valid.to(r.dtype)[:, None]
    zero = torch.zeros((), dtype=r.dtype, device=r.device)
    r = torch.where(valid[:, None], r, zero)
    if num_groups is None:
        unique, inverse = torch.unique(group_ids, return_inverse=True)
        n_groups = unique.shape[0]
    else:
        inverse, n_groups = group_ids.long(), num_groups
    counts = torch.zeros(n_groups, 1, dtype=r.dtype, device=r.device).index_add_(0, inverse, w).clamp_min(1)
    mean = torch.zeros(n_groups, r.shape[1], dtype=r.dtype, device=r.device).index_add_(0, inverse, r) / counts
    centred = (r - mean[inverse]) * w
    if global_std:
        n_valid = w.sum().clamp_min(1)
        col_mean = r.sum(dim=0) / n_valid
        std = (((r - col_mean) * w).square().sum(dim=0) / n_valid).sqrt().expand_as(r)
    else:
        var = torch.zeros_like(mean).index_add_(0, inverse, centred.square()) / counts
        std = var.sqrt()[inverse]
    adv = centred / (std + eps)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv[:, 0] if squeeze else adv


@dataclass
class SurrogateStats:
    """Diagnostics of one clipped-surrogate evaluation (0-dim tensors, detached)."""

    ratio_mean: torch.Tensor
    ratio_min: torch.Tensor
    ratio_max: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor


def clipped_surrogate(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                      clip_range: float, valid: torch.Tensor | None = None, *, clip_range_high: float | None = None
                      ) -> tuple[torch.Tensor, SurrogateStats]:
    """PPO's clipped surrogate loss, -mean min(rho A, clip(rho, 1-eps_low, 1+eps_high) A), rho = exp(logp - logp_old).

    Clip-Higher (DAPO, arXiv 2503.14476) is the asymmetric case eps_high > eps_low: a ratio may rise
    further than it may fall, so low-probability transitions with a positive advantage can gain more
    before their gradient is cut (DAPO uses 0.28 against 0.2, i.e. eps_high = 1.4 eps_low).

    Args:
        log_prob: log-probabilities under the current policy (differentiable), any shape.
        old_log_prob: the behaviour policy's log-probabilities (same shape; treated as constants).
        advantages: same shape.
        clip_range: eps_low (and eps_high unless `clip_range_high` is given).
        clip_range_high: eps_high; None = `clip_range` (the symmetric clip, bit for bit).
        valid: optional bool mask (same shape): masked elements count as ratio 1 and advantage 0, so
            they add nothing to the loss and a NaN in their log-probs cannot reach the gradient.

    Returns:
        (loss, stats): the mean loss over all elements and detached diagnostics; `approx_kl` is
        1/2 mean((logp - logp_old)^2), as Flow-GRPO logs it.
    """
    if not (log_prob.shape == old_log_prob.shape == advantages.shape):
        raise ValueError(f"log_prob, old_log_prob and advantages must have one shape, got {tuple(log_prob.shape)}, "
                         f"{tuple(old_log_prob.shape)} and {tuple(advantages.shape)}")
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    high = clip_range if clip_range_high is None else clip_range_high
    if high <= 0:
        raise ValueError(f"clip_range_high must be > 0, got {clip_range_high}")
    delta = log_prob - old_log_prob.detach()
    if valid is not None:
        delta = torch.where(valid, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
        advantages = torch.where(valid, advantages, torch.zeros((), dtype=advantages.dtype,
                                                                device=advantages.device))
    ratio = torch.exp(delta)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + high)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = SurrogateStats(ratio_mean=ratio.mean(), ratio_min=ratio.min(), ratio_max=ratio.max(),
                               clip_fraction=((ratio - 1.0 > high) | (1.0 - ratio > clip_range)).float().mean(),
                               approx_kl=0.5 * delta.square().mean())
    return loss, stats
