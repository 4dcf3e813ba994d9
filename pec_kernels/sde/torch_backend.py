"""The fused SDE pass in plain torch: the reference the Triton and CUDA kernels are tested against,
and the CPU path.

Every backend implements the same two functions on flattened (B, n) contiguous tensors, with the
step described by a `StepParams` (coefficients.py) and norm = n for reduce="mean", 1 for "sum":

forward(x, vels, target, v_ref, params, rollout, norm, want_mean)
    -> (prev | None, mean | None, log_prob, kl | None, std)
  v = vels[0] (one velocity) or v_u + gs·(v_c − v_u) [+ gw·guidance] (vels = (v_u, v_c[, guidance]));
  μ = a·x + b·v. Rollout (target = noise): x' = μ + s·ε is rounded to x's dtype and the residual is
  taken against that rounded x', which is what a later re-evaluation sees. Re-evaluation
  (target = x'): residual x' − μ. log_prob = (n·log_norm − inv_two_var·Σ residual²)/norm,
  kl = inv_two_var·b²·Σ(v − v_ref)²/norm (μ − μref = b·(v − v_ref)); log_prob, kl, std are (B,) in
  the compute dtype, prev and mean in x's dtype; mean is written only with want_mean (it is a full
  latent-sized write that neither sampling nor re-evaluation needs). Per-sample sums are deterministic.

backward(x, vels, prev, v_ref, params, norm, grad_log_prob, grad_kl, grad_mean, grad_prev, needs)
    -> (dx | None, (dv_k | None for each velocity))
  g_μ = (2·inv_two_var/norm)·grad_log_prob·(x' − μ) + grad_mean + grad_prev,
  g_v = b·g_μ + (2·inv_two_var·b²/norm)·grad_kl·(v − v_ref), dx = a·g_μ, and g_v split over the
  velocities by their CFG weights (1 − gs, gs, gw). Any grad_* may be None (zero); needs = one bool
  per gradient (x, then each velocity). Gradients come back in each input's dtype.
"""
from __future__ import annotations

import torch

from pec_kernels.sde.coefficients import StepParams


def _velocity(vels: tuple[torch.Tensor, ...], params: StepParams, cd: torch.dtype) -> torch.Tensor:
    v = vels[0].to(cd)
    if len(vels) >= 2:
        v = v + params.expanded(params.guidance_scale)[:, None] * (vels[1].to(cd) - v)
    if len(vels) == 3:
        v = v + params.expanded(params.guidance_weight)[:, None] * vels[2].to(cd)
    return v


def forward(x: torch.Tensor, vels: tuple[torch.Tensor, ...], target: torch.Tensor, v_ref: torch.Tensor | None,
            params: StepParams, rollout: bool, norm: int, want_mean: bool):
    cd = params.dtype
    coefs = params.coefficients()
    a, b, s = coefs.a[:, None], coefs.b[:, None], coefs.s[:, None]
    v = _velocity(vels, params, cd)
    mu = a * x.to(cd) + b * v
    prev = None
    if rollout:
        prev = (mu + s * target.to(cd)).to(x.dtype)
        r = prev.to(cd) - mu
    else:
        r = target.to(cd) - mu
    log_prob = coefs.log_norm * (x.shape[1] / norm) - coefs.inv_two_var * (r * r).sum(dim=1) / norm
    kl = None
    if v_ref is not None:
        d = v - v_ref.to(cd)
        kl = coefs.inv_two_var * coefs.b * coefs.b * (d * d).sum(dim=1) / norm
    return prev, (mu.to(x.dtype) if want_mean else None), log_prob, kl, coefs.s


def backward(x: torch.Tensor, vels: tuple[torch.Tensor, ...], prev: torch.Tensor, v_ref: torch.Tensor | None,
             params: StepParams, norm: int, grad_log_prob: torch.Tensor | None, grad_kl: torch.Tensor | None,
             grad_mean: torch.Tensor | None, grad_prev: torch.Tensor | None, needs: tuple[bool, ...]):
    cd = params.dtype
    coefs = params.coefficients()
    a, b = coefs.a[:, None], coefs.b[:, None]
    v = _velocity(vels, params, cd)
    mu = a * x.to(cd) + b * v
    g_mu = torch.zeros_like(mu)
    if grad_log_prob is not None:
        g_mu = g_mu + (2 * coefs.inv_two_var / norm * grad_log_prob)[:, None] * (prev.to(cd) - mu)
    for g in (grad_mean, grad_prev):
        if g is not None:
            g_mu = g_mu + g.to(cd)
    g_v = b * g_mu
    if v_ref is not None and grad_kl is not None:
        g_v = g_v + (2 * coefs.inv_two_var * coefs.b * coefs.b / norm * grad_kl)[:, None] * (v - v_ref.to(cd))
    dx = (a * g_mu).to(x.dtype) if needs[0] else None
    if len(vels) == 1:
        weights = (1.0,)
    else:
        gs = params.expanded(params.guidance_scale)[:, None]
        weights = (1 - gs, gs, params.expanded(params.guidance_weight)[:, None])
    dvs = tuple((w * g_v).to(vk.dtype) if need else None for w, vk, need in zip(weights, vels, needs[1:]))
    return dx, dvs
