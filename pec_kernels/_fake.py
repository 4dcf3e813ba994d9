"""Fake (meta) implementations of the torch.ops.pec ops of csrc/, so torch.compile can trace them.

A fake implementation computes only the outputs' shapes, dtypes and devices, from the inputs' metadata
(never their values). torch.library.register_fake also serves them for meta tensors, so they can be
checked on a machine without a GPU once pec_kernels._C is loaded. Registered by
pec_kernels._extension when the extension loads (prebuilt or JIT-built); the ops must exist first.
Each function mirrors the output allocation of its C++ op (csrc/knn_grouped.cu, csrc/sde_step.cu).
"""
from __future__ import annotations

import torch

_registered = False


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _latent(x: torch.Tensor, written: bool) -> torch.Tensor:
    """An output shaped like x when the op writes it, else the empty (0,) placeholder the op returns."""
    return torch.empty_like(x) if written else x.new_empty((0,))


def knn_grouped_select(x: torch.Tensor, k: int, valid: torch.Tensor | None = None,
                       scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx (G, n, k) int64, dist (G, n, k) float32)."""
    shape = (*x.shape[:2], k)
    return x.new_empty(shape, dtype=torch.int64), x.new_empty(shape, dtype=torch.float32)


def knn_grouped_pair_distances(x: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """(G, n, k) float32."""
    return x.new_empty(idx.shape, dtype=torch.float32)


def knn_grouped_pair_grad(x: torch.Tensor, idx: torch.Tensor, coef: torch.Tensor,
                          scale: torch.Tensor | None = None) -> torch.Tensor:
    """(G, n, D) float32."""
    return x.new_empty(x.shape, dtype=torch.float32)


def sde_step_fwd(x: torch.Tensor, vels: list[torch.Tensor], target: torch.Tensor, v_ref: torch.Tensor | None,
                 params: list[torch.Tensor | None], values: list[float], eta: float, kind: int, rollout: bool,
                 norm: float, need_mean: bool) -> tuple[torch.Tensor, ...]:
    """(prev, mean, log_prob, kl, std): prev and mean like x (or empty when not written), the rest (B,)
    in the compute dtype (kl empty without v_ref)."""
    batch = x.shape[0]
    per_sample = _compute_dtype(x)
    return (_latent(x, rollout), _latent(x, need_mean), x.new_empty((batch,), dtype=per_sample),
            x.new_empty((batch if v_ref is not None else 0,), dtype=per_sample),
            x.new_empty((batch,), dtype=per_sample))


def sde_step_bwd(x: torch.Tensor, vels: list[torch.Tensor], prev: torch.Tensor, v_ref: torch.Tensor | None,
                 params: list[torch.Tensor | None], values: list[float], eta: float, kind: int, norm: float,
                 grad_log_prob: torch.Tensor | None, grad_kl: torch.Tensor | None, grad_mean: torch.Tensor | None,
                 grad_prev: torch.Tensor | None, need_dx: bool, need_dv0: bool, need_dv1: bool,
                 need_dv2: bool) -> list[torch.Tensor]:
    """[dx, dv0, dv1, dv2]: like x where needed (and the velocity exists), else empty."""
    nv = len(vels)
    need = (need_dx, need_dv0, need_dv1 and nv >= 2, need_dv2 and nv == 3)
    return [_latent(x, n) for n in need]


FAKES = {fn.__name__: fn for fn in (knn_grouped_select, knn_grouped_pair_distances, knn_grouped_pair_grad,
                                    sde_step_fwd, sde_step_bwd)}


def register() -> None:
    """Register every fake implementation whose op is defined (idempotent)."""
    global _registered
    if _registered:
        return
    for name, fn in FAKES.items():
        if hasattr(torch.ops.pec, name):
            torch.library.register_fake(f"pec::{name}")(fn)
    _registered = True
