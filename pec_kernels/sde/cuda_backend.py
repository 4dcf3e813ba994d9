"""The CUDA backend of the fused SDE pass: torch.ops.pec.sde_step_fwd / sde_step_bwd (csrc/sde_step.cu).

Same contract as torch_backend.py. The kernels are compiled per dtype, so every latent-shaped input
must share x's dtype (backends.resolve checks this before picking this module).
"""
from __future__ import annotations

import torch

from pec_kernels.sde.coefficients import KIND_IDS, StepParams


def _op(name: str):
    """torch.ops.pec.<name>, looked up at call time (an extension that loaded without it raises here)."""
    return getattr(torch.ops.pec, name)


def _param_lists(params: StepParams) -> tuple[list[torch.Tensor | None], list[float]]:
    """σ, σ', sigma_max, guidance scale, guidance weight as (tensor or None, number) pairs."""
    tensors, values = [], []
    for value in (params.sigma, params.sigma_next, params.sigma_max, params.guidance_scale, params.guidance_weight):
        is_tensor = isinstance(value, torch.Tensor)
        tensors.append(value.contiguous() if is_tensor else None)
        values.append(0.0 if is_tensor else value)
    return tensors, values


def forward(x: torch.Tensor, vels: tuple[torch.Tensor, ...], target: torch.Tensor, v_ref: torch.Tensor | None,
            params: StepParams, rollout: bool, norm: int, want_mean: bool):
    """See torch_backend.forward."""
    tensors, values = _param_lists(params)
    prev, mean, log_prob, kl, std = _op("sde_step_fwd")(
        x, list(vels), target, v_ref, tensors, values, params.eta, KIND_IDS[params.kind], rollout, float(norm),
        want_mean)
    return ((prev if rollout else None), (mean if want_mean else None), log_prob,
            (kl if v_ref is not None else None), std)


def backward(x: torch.Tensor, vels: tuple[torch.Tensor, ...], prev: torch.Tensor, v_ref: torch.Tensor | None,
             params: StepParams, norm: int, grad_log_prob: torch.Tensor | None, grad_kl: torch.Tensor | None,
             grad_mean: torch.Tensor | None, grad_prev: torch.Tensor | None, needs: tuple[bool, ...]):
    """See torch_backend.backward."""
    tensors, values = _param_lists(params)
    need = tuple(needs) + (False,) * (4 - len(needs))
    grad_kl = grad_kl if v_ref is not None else None
    grad_mean, grad_prev = (None if g is None else g.to(x.dtype).contiguous() for g in (grad_mean, grad_prev))
    dx, *dvs = _op("sde_step_bwd")(
        x, list(vels), prev, v_ref, tensors, values, params.eta, KIND_IDS[params.kind], float(norm), grad_log_prob,
        grad_kl, grad_mean, grad_prev, *need)
    return (dx if need[0] else None), tuple(d if k else None for d, k in zip(dvs[:len(vels)], need[1:]))
