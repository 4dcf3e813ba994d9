"""The CUDA backend of the fused SDE pass: torch.ops.pec.sde_step_fwd / sde_step_bwd (csrc/sde_step.cu).

Same contract as torch_backend.py. The kernels are compiled per dtype, so every latent-shaped input
must share x's dtype (backends.resolve checks this before picking this module).
"""
from __future__ import annotations

import torch


def _second_third(vels: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return (vels + (None, None))[1:3]


def forward(x: torch.Tensor, vels: tuple[torch.Tensor, ...], vscale: torch.Tensor | None, target: torch.Tensor,
            rollout: bool, v_ref: torch.Tensor | None, coef: torch.Tensor, out_dtype: torch.dtype):
    """See torch_backend.forward."""
    v1, v2 = _second_third(vels)
    prev, mean, sum_r2, sum_kl = torch.ops.pec.sde_step_fwd(x, vels[0], v1, v2, target, v_ref, coef, vscale, rollout)
    return (prev if rollout else None), mean, sum_r2, (sum_kl if v_ref is not None else None)


def backward(x: torch.Tensor, vels: tuple[torch.Tensor, ...], vscale: torch.Tensor | None, prev: torch.Tensor,
             v_ref: torch.Tensor | None, coef: torch.Tensor, gscale: torch.Tensor,
             grad_mean: torch.Tensor | None, grad_prev: torch.Tensor | None, needs: tuple[bool, ...]):
    """See torch_backend.backward."""
    v1, v2 = _second_third(vels)
    need = tuple(needs) + (False,) * (4 - len(needs))
    grad_mean = None if grad_mean is None else grad_mean.to(x.dtype).contiguous()
    grad_prev = None if grad_prev is None else grad_prev.to(x.dtype).contiguous()
    dx, *dvs = torch.ops.pec.sde_step_bwd(x, vels[0], v1, v2, prev, v_ref, coef, vscale, gscale.contiguous(),
                                          grad_mean, grad_prev, *need)
    return (dx if need[0] else None), tuple(d if k else None for d, k in zip(dvs[:len(vels)], need[1:]))
