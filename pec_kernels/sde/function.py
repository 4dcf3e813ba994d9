"""The autograd Function around the fused SDE pass, shared by all backends.

The backend (a module with `forward` and `backward`, see torch_backend.py for the contract) does all
the work, log-prob and KL included; this Function only routes tensors and upstream gradients.

Gradients: log_prob and kl are differentiable in x and the velocities; `mean` and, in rollout mode,
`prev_sample` too (x' = μ + s·ε, straight through the rounding to the output dtype). The log-prob
treats x' as data even in rollout mode (as Flow-GRPO's `prev_sample.detach()`), so that it has the
same gradient as in re-evaluation. noise, prev_sample (input), v_ref and the schedule are data.
"""
from __future__ import annotations

import torch

from pec_kernels._fallback import Chain
from pec_kernels._fallback import run as run_with_fallback
from pec_kernels.sde.backends import module_of
from pec_kernels.sde.coefficients import StepParams


class SdeStepFunction(torch.autograd.Function):
    """forward(chain, params, rollout, norm, want_mean, x, target, v_ref, *vels)
    -> (prev, mean, log_prob, kl, std).

    chain: the names of the backends (pec_kernels._fallback) from the one to run on; its head
    (pec_kernels.sde.backends.module_of) computes the forward, and the backward falls back along it.
    x, target, v_ref, vels: (B, n) contiguous; norm: n for reduce="mean", 1 for "sum"; prev is None in
    re-evaluation mode, mean is None unless want_mean, kl is None without v_ref.
    """

    @staticmethod
    def forward(ctx, chain: Chain, params: StepParams, rollout: bool, norm: int, want_mean: bool, x: torch.Tensor,
                target: torch.Tensor, v_ref: torch.Tensor | None, *vels: torch.Tensor):
        prev, mean, log_prob, kl, std = module_of(chain[0]).forward(x, vels, target, v_ref, params, rollout, norm,
                                                                    want_mean)
        ctx.chain, ctx.params, ctx.norm, ctx.rollout = chain, params, norm, rollout
        ctx.save_for_backward(x, prev if rollout else target, v_ref, *vels)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(std)
        return prev, mean, log_prob, kl, std

    @staticmethod
    def backward(ctx, grad_prev, grad_mean, grad_log_prob, grad_kl, _grad_std):
        x, prev, v_ref, *vels = ctx.saved_tensors
        needs = (ctx.needs_input_grad[5],) + tuple(ctx.needs_input_grad[8:])
        dx, dvs = run_with_fallback(
            "sde_step", ctx.chain,
            lambda chain: module_of(chain[0]).backward(x, tuple(vels), prev, v_ref, ctx.params, ctx.norm,
                                                       grad_log_prob, grad_kl, grad_mean,
                                                       grad_prev if ctx.rollout else None, needs))
        return (None, None, None, None, None, dx, None, None, *dvs)
