"""The autograd Function around the fused SDE pass, shared by all backends.

The backend (a module with `forward` and `backward`, see torch_backend.py for the contract) does the
latent-sized work; this Function turns its per-sample sums into log_prob and KL and maps the (B,)
upstream gradients onto the per-sample scalings of one residual that the backward kernel applies.

Gradients: log_prob and kl are differentiable in x and the velocities; `mean` and, in rollout mode,
`prev_sample` too (x' = μ + s·ε, straight through the rounding to the output dtype). The log-prob
treats x' as data even in rollout mode (as Flow-GRPO's `prev_sample.detach()`), so that it has the
same gradient as in re-evaluation. noise, prev_sample (input), v_ref and the schedule are data.
"""
from __future__ import annotations

from types import ModuleType

import torch

from pec_kernels.sde.coefficients import StepCoefficients


class SdeStepFunction(torch.autograd.Function):
    """forward(backend, rollout, norm, coefs, vscale, x, target, v_ref, *vels) -> (prev, mean, log_prob, kl).

    x, target, v_ref, vels: (B, n) contiguous; norm: n for reduce="mean", 1 for "sum";
    prev is None in re-evaluation mode, kl is None without v_ref.
    """

    @staticmethod
    def forward(ctx, backend: ModuleType, rollout: bool, norm: int, coefs: StepCoefficients,
                vscale: torch.Tensor | None, x: torch.Tensor, target: torch.Tensor, v_ref: torch.Tensor | None,
                *vels: torch.Tensor):
        coef = torch.stack((coefs.a, coefs.b, coefs.s), dim=1)
        prev, mean, sum_r2, sum_kl = backend.forward(x, vels, vscale, target, rollout, v_ref, coef, x.dtype)
        n_over_norm = x.shape[1] / norm
        log_prob = coefs.log_norm * n_over_norm - coefs.inv_two_var * sum_r2 / norm
        kl = None if sum_kl is None else coefs.inv_two_var * coefs.b * coefs.b * sum_kl / norm
        ctx.backend, ctx.norm, ctx.rollout = backend, norm, rollout
        ctx.save_for_backward(x, prev if rollout else target, v_ref, coef, coefs.inv_two_var, vscale, *vels)
        ctx.set_materialize_grads(False)
        return prev, mean, log_prob, kl

    @staticmethod
    def backward(ctx, grad_prev, grad_mean, grad_log_prob, grad_kl):
        x, prev, v_ref, coef, inv_two_var, vscale, *vels = ctx.saved_tensors
        two_w_over_norm = 2 * inv_two_var / ctx.norm
        gr = two_w_over_norm * grad_log_prob if grad_log_prob is not None else torch.zeros_like(inv_two_var)
        gk = torch.zeros_like(gr)
        if grad_kl is not None and v_ref is not None:
            gk = two_w_over_norm * coef[:, 1] * coef[:, 1] * grad_kl
        needs = (ctx.needs_input_grad[5],) + tuple(ctx.needs_input_grad[8:])
        dx, dvs = ctx.backend.backward(x, tuple(vels), vscale, prev, v_ref, coef, torch.stack((gr, gk), dim=1),
                                       grad_mean, grad_prev if ctx.rollout else None, needs)
        return (None, None, None, None, None, dx, None, None, *dvs)

