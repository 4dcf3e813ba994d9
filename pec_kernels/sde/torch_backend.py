"""The fused SDE pass in plain torch: the reference the Triton and CUDA kernels are tested against,
and the CPU path.

Every backend implements the same two functions on flattened (B, n) contiguous tensors:

forward(x, vels, vscale, target, rollout, v_ref, coef, out_dtype)
    -> (prev | None, mean, sum_r2 (B,), sum_kl (B,) | None)
  v = vels[0] (one velocity) or v_u + gs·(v_c − v_u) [+ gw·guidance] (vels = (v_u, v_c[, guidance]),
  vscale = (B, 2) [gs, gw]); μ = a·x + b·v with coef = (B, 3) [a, b, s] in the compute dtype.
  Rollout (target = noise): x' = μ + s·ε is rounded to out_dtype and the residual is taken against
  that rounded x', which is what a later re-evaluation sees. Re-evaluation (target = x'): residual
  x' − μ. sum_r2 = Σ residual², sum_kl = Σ (v − v_ref)², both per sample in the compute dtype.

backward(x, vels, vscale, prev, v_ref, coef, gscale, grad_mean, grad_prev, needs)
    -> (dx | None, (dv_k | None for each velocity))
  g_μ = gr·(x' − μ) + grad_mean + grad_prev, g_v = b·g_μ + gk·(v − v_ref), dx = a·g_μ, and g_v
  split over the velocities by their CFG weights; gscale = (B, 2) [gr, gk]; needs = one bool per
  gradient (x, then each velocity). Gradients come back in each input's dtype.
"""
from __future__ import annotations

import torch


def _velocity(vels: tuple[torch.Tensor, ...], vscale: torch.Tensor | None, cd: torch.dtype) -> torch.Tensor:
    v = vels[0].to(cd)
    if len(vels) >= 2:
        v = v + vscale[:, 0:1] * (vels[1].to(cd) - v)
    if len(vels) == 3:
        v = v + vscale[:, 1:2] * vels[2].to(cd)
    return v


def _velocity_weights(vscale: torch.Tensor | None, count: int) -> tuple[torch.Tensor | float, ...]:
    """d v / d vels[k] per sample: 1 for a plain velocity; (1 − gs, gs[, gw]) for the guided one."""
    if count == 1:
        return (1.0,)
    gs, gw = vscale[:, 0:1], vscale[:, 1:2]
    return (1 - gs, gs, gw)[:count]


def forward(x: torch.Tensor, vels: tuple[torch.Tensor, ...], vscale: torch.Tensor | None, target: torch.Tensor,
            rollout: bool, v_ref: torch.Tensor | None, coef: torch.Tensor, out_dtype: torch.dtype):
    cd = coef.dtype
    a, b, s = coef[:, 0:1], coef[:, 1:2], coef[:, 2:3]
    v = _velocity(vels, vscale, cd)
    mu = a * x.to(cd) + b * v
    prev = None
    if rollout:
        prev = (mu + s * target.to(cd)).to(out_dtype)
        r = prev.to(cd) - mu
    else:
        r = target.to(cd) - mu
    sum_r2 = (r * r).sum(dim=1)
    sum_kl = None
    if v_ref is not None:
        d = v - v_ref.to(cd)
        sum_kl = (d * d).sum(dim=1)
    return prev, mu.to(out_dtype), sum_r2, sum_kl


def backward(x: torch.Tensor, vels: tuple[torch.Tensor, ...], vscale: torch.Tensor | None, prev: torch.Tensor,
             v_ref: torch.Tensor | None, coef: torch.Tensor, gscale: torch.Tensor,
             grad_mean: torch.Tensor | None, grad_prev: torch.Tensor | None, needs: tuple[bool, ...]):
    cd = coef.dtype
    a, b = coef[:, 0:1], coef[:, 1:2]
    v = _velocity(vels, vscale, cd)
    mu = a * x.to(cd) + b * v
    g_mu = gscale[:, 0:1] * (prev.to(cd) - mu)
    for g in (grad_mean, grad_prev):
        if g is not None:
            g_mu = g_mu + g.to(cd)
    g_v = b * g_mu
    if v_ref is not None:
        g_v = g_v + gscale[:, 1:2] * (v - v_ref.to(cd))
    dx = (a * g_mu).to(x.dtype) if needs[0] else None
    dvs = tuple((w * g_v).to(vk.dtype) if need else None
                for w, vk, need in zip(_velocity_weights(vscale, len(vels)), vels, needs[1:]))
    return dx, dvs
