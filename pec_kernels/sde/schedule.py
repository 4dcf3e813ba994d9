"""Per-sample σ lookup from a flow-matching schedule, on the device, without host synchronisation.

Flow-GRPO finds each sample's σ with `scheduler.index_for_timestep(t)` in a Python loop over the
batch (one `nonzero()` and one `.item()` per sample). Recording the step index with each rollout
step instead, and indexing the schedule with it, is one gather on the device.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class StepSigmas(NamedTuple):
    """sigma, sigma_next: per-sample σ and σ' (shape of step_index); sigma_max: 0-d, the largest
    schedule value below 1 (Flow-GRPO's stand-in for σ in 1 − σ at σ = 1)."""

    sigma: torch.Tensor
    sigma_next: torch.Tensor
    sigma_max: torch.Tensor


def _schedule_tensor(scheduler_or_sigmas: object) -> torch.Tensor:
    sigmas = getattr(scheduler_or_sigmas, "sigmas", scheduler_or_sigmas)
    if not isinstance(sigmas, torch.Tensor):
        raise ValueError("scheduler_or_sigmas must be a 1-D sigmas tensor or an object with a `.sigmas` "
                         f"tensor (e.g. diffusers' FlowMatchEulerDiscreteScheduler), got "
                         f"{type(scheduler_or_sigmas).__name__}")
    if sigmas.dim() != 1 or sigmas.shape[0] < 2 or not sigmas.is_floating_point():
        raise ValueError("the schedule's sigmas must be a 1-D floating-point tensor of length >= 2 "
                         f"(σ_0 … σ_N), got shape {tuple(sigmas.shape)} and dtype {sigmas.dtype}")
    return sigmas


def step_sigmas(scheduler_or_sigmas: object, step_index: torch.Tensor | int) -> StepSigmas:
    """(σ, σ', sigma_max) for per-sample step indices: σ = sigmas[i], σ' = sigmas[i + 1].

    scheduler_or_sigmas: a 1-D tensor of the schedule (σ_0 = 1 … σ_N = 0 for diffusers'
    FlowMatchEulerDiscreteScheduler, whose `.sigmas` carries the terminal 0), or anything with a
    `.sigmas` tensor. step_index: (B,) integer tensor (or an int, giving 0-d results), each in
    [0, N − 1]; out-of-range indices are not checked on the host (that would synchronise) and fail
    as a device-side indexing error.
    The results live on step_index's device. diffusers keeps `.sigmas` on the CPU: move the schedule
    to the device once (`sigmas.to(device)`), otherwise it is copied here on every call with a
    non-blocking copy, which CUDA-graph capture does not allow.
    """
    sigmas = _schedule_tensor(scheduler_or_sigmas)
    if isinstance(step_index, bool) or not isinstance(step_index, (int, torch.Tensor)):
        raise ValueError(f"step_index must be an int or an integer tensor, got {type(step_index).__name__}")
    if isinstance(step_index, int):
        step_index = torch.tensor(step_index, device=sigmas.device)
    if step_index.is_floating_point() or step_index.is_complex() or step_index.dtype == torch.bool:
        raise ValueError(f"step_index must have an integer dtype, got {step_index.dtype}")
    if step_index.dim() > 1:
        raise ValueError(f"step_index must have shape () or (B,), got {tuple(step_index.shape)}")
    if sigmas.device != step_index.device:
        sigmas = sigmas.to(step_index.device, non_blocking=True)
    index = step_index.long()
    below_one = torch.where(sigmas < 1, sigmas, torch.full_like(sigmas, float("-inf")))
    return StepSigmas(torch.take(sigmas, index), torch.take(sigmas, index + 1), below_one.max())
