"""Triton kernels for the fused SDE pass (contract: torch_backend.py's module docstring).

Forward: grid (chunks, B); each program streams one chunk of one sample's n elements, writes x' and μ,
and one partial sum of residual² (and of (v − v_ref)²); the chunk partials are summed by torch, so
the result is deterministic (a rollout and its re-evaluation give bit-identical log-probs).
Backward: the same grid, elementwise: recompute μ, scale the residual, write the gradients.
Loads upcast to the compute dtype first (fp32, or fp64 for fp64 inputs): the interpreter cannot do
bf16 arithmetic, and fp32 math is the contract anyway.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pec_kernels._triton_utils import interpreting


@triton.jit
def _velocity(v0_ptr, v1_ptr, v2_ptr, offs, mask, gs, gw, NV: tl.constexpr, COMPUTE: tl.constexpr):
    v = tl.load(v0_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    if NV >= 2:
        v = v + gs * (tl.load(v1_ptr + offs, mask=mask, other=0.0).to(COMPUTE) - v)
    if NV == 3:
        v = v + gw * tl.load(v2_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    return v


@triton.jit
def _sde_forward_kernel(x_ptr, v0_ptr, v1_ptr, v2_ptr, target_ptr, vref_ptr, coef_ptr, vscale_ptr,
                        prev_ptr, mean_ptr, part_r_ptr, part_kl_ptr, n, n_chunks,
                        NV: tl.constexpr, ROLLOUT: tl.constexpr, HAS_REF: tl.constexpr,
                        COMPUTE: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr):
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    a = tl.load(coef_ptr + b * 3)
    bv = tl.load(coef_ptr + b * 3 + 1)
    s = tl.load(coef_ptr + b * 3 + 2)
    gs = tl.load(vscale_ptr + b * 2) if NV >= 2 else 0.0
    gw = tl.load(vscale_ptr + b * 2 + 1) if NV >= 2 else 0.0
    row = b.to(tl.int64) * n
    acc_r = tl.zeros([BLOCK], dtype=COMPUTE)
    acc_k = tl.zeros([BLOCK], dtype=COMPUTE)
    for t in range(TILES):
        idx = (chunk * TILES + t) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        offs = row + idx
        v = _velocity(v0_ptr, v1_ptr, v2_ptr, offs, mask, gs, gw, NV, COMPUTE)
        mu = a * tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE) + bv * v
        target = tl.load(target_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        if ROLLOUT:
            prev = (mu + s * target).to(prev_ptr.dtype.element_ty)
            tl.store(prev_ptr + offs, prev, mask=mask)
            r = prev.to(COMPUTE) - mu
        else:
            r = target - mu
        tl.store(mean_ptr + offs, mu.to(mean_ptr.dtype.element_ty), mask=mask)
        acc_r += tl.where(mask, r * r, 0.0)
        if HAS_REF:
            d = v - tl.load(vref_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
            acc_k += tl.where(mask, d * d, 0.0)
    tl.store(part_r_ptr + b * n_chunks + chunk, tl.sum(acc_r, axis=0))
    if HAS_REF:
        tl.store(part_kl_ptr + b * n_chunks + chunk, tl.sum(acc_k, axis=0))


@triton.jit
def _sde_backward_kernel(x_ptr, v0_ptr, v1_ptr, v2_ptr, prev_ptr, vref_ptr, gmean_ptr, gprev_ptr,
                         coef_ptr, vscale_ptr, gscale_ptr, dx_ptr, dv0_ptr, dv1_ptr, dv2_ptr, n,
                         NV: tl.constexpr, HAS_REF: tl.constexpr, HAS_GMEAN: tl.constexpr,
                         HAS_GPREV: tl.constexpr, NEED_DX: tl.constexpr, NEED_DV0: tl.constexpr,
                         NEED_DV1: tl.constexpr, NEED_DV2: tl.constexpr,
                         COMPUTE: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr):
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    a = tl.load(coef_ptr + b * 3)
    bv = tl.load(coef_ptr + b * 3 + 1)
    gr = tl.load(gscale_ptr + b * 2)
    gk = tl.load(gscale_ptr + b * 2 + 1)
    gs = tl.load(vscale_ptr + b * 2) if NV >= 2 else 0.0
    gw = tl.load(vscale_ptr + b * 2 + 1) if NV >= 2 else 0.0
    row = b.to(tl.int64) * n
    for t in range(TILES):
        idx = (chunk * TILES + t) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        offs = row + idx
        v = _velocity(v0_ptr, v1_ptr, v2_ptr, offs, mask, gs, gw, NV, COMPUTE)
        mu = a * tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE) + bv * v
        g_mu = gr * (tl.load(prev_ptr + offs, mask=mask, other=0.0).to(COMPUTE) - mu)
        if HAS_GMEAN:
            g_mu += tl.load(gmean_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        if HAS_GPREV:
            g_mu += tl.load(gprev_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        g_v = bv * g_mu
        if HAS_REF:
            g_v += gk * (v - tl.load(vref_ptr + offs, mask=mask, other=0.0).to(COMPUTE))
        if NEED_DX:
            tl.store(dx_ptr + offs, (a * g_mu).to(dx_ptr.dtype.element_ty), mask=mask)
        if NV == 1:
            if NEED_DV0:
                tl.store(dv0_ptr + offs, g_v.to(dv0_ptr.dtype.element_ty), mask=mask)
        else:
            if NEED_DV0:
                tl.store(dv0_ptr + offs, ((1 - gs) * g_v).to(dv0_ptr.dtype.element_ty), mask=mask)
            if NEED_DV1:
                tl.store(dv1_ptr + offs, (gs * g_v).to(dv1_ptr.dtype.element_ty), mask=mask)
            if NV == 3 and NEED_DV2:
                tl.store(dv2_ptr + offs, (gw * g_v).to(dv2_ptr.dtype.element_ty), mask=mask)


def _launch_shape(n: int) -> tuple[int, int, int]:
    """(BLOCK, TILES, chunks): small fixed tiles under the interpreter, 8 K-element chunks on GPU."""
    block, tiles = (128, 2) if interpreting() else (1024, 8)
    return block, tiles, triton.cdiv(n, block * tiles)


def _compute_type(coef: torch.Tensor) -> tl.dtype:
    return tl.float64 if coef.dtype == torch.float64 else tl.float32


def _padded(vels: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three velocity pointers for the kernel; unused ones point at vels[0] and are never read."""
    return tuple(vels) + (vels[0],) * (3 - len(vels))


def forward(x: torch.Tensor, vels: tuple[torch.Tensor, ...], vscale: torch.Tensor | None, target: torch.Tensor,
            rollout: bool, v_ref: torch.Tensor | None, coef: torch.Tensor, out_dtype: torch.dtype):
    """See torch_backend.forward."""
    batch, n = x.shape
    block, tiles, chunks = _launch_shape(n)
    prev = torch.empty(x.shape, dtype=out_dtype, device=x.device) if rollout else None
    mean = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    part_r = torch.empty((batch, chunks), dtype=coef.dtype, device=x.device)
    part_kl = torch.empty((batch, chunks), dtype=coef.dtype, device=x.device) if v_ref is not None else None
    _sde_forward_kernel[(chunks, batch)](
        x, *_padded(vels), target, x if v_ref is None else v_ref, coef, coef if vscale is None else vscale,
        mean if prev is None else prev, mean, part_r, part_r if part_kl is None else part_kl, n, chunks,
        NV=len(vels), ROLLOUT=rollout, HAS_REF=v_ref is not None, COMPUTE=_compute_type(coef),
        BLOCK=block, TILES=tiles, num_warps=4)
    return prev, mean, part_r.sum(dim=1), None if part_kl is None else part_kl.sum(dim=1)


def backward(x: torch.Tensor, vels: tuple[torch.Tensor, ...], vscale: torch.Tensor | None, prev: torch.Tensor,
             v_ref: torch.Tensor | None, coef: torch.Tensor, gscale: torch.Tensor,
             grad_mean: torch.Tensor | None, grad_prev: torch.Tensor | None, needs: tuple[bool, ...]):
    """See torch_backend.backward."""
    batch, n = x.shape
    block, tiles, chunks = _launch_shape(n)
    grad_mean = None if grad_mean is None else grad_mean.contiguous()
    grad_prev = None if grad_prev is None else grad_prev.contiguous()
    dx = torch.empty_like(x) if needs[0] else None
    dvs = tuple(torch.empty_like(v) if need else None for v, need in zip(vels, needs[1:]))
    need_v = tuple(d is not None for d in dvs) + (False,) * (3 - len(vels))
    _sde_backward_kernel[(chunks, batch)](
        x, *_padded(vels), prev, x if v_ref is None else v_ref, x if grad_mean is None else grad_mean,
        x if grad_prev is None else grad_prev, coef, coef if vscale is None else vscale, gscale.contiguous(),
        x if dx is None else dx, *(x if d is None else d for d in dvs + (None,) * (3 - len(vels))), n,
        NV=len(vels), HAS_REF=v_ref is not None, HAS_GMEAN=grad_mean is not None, HAS_GPREV=grad_prev is not None,
        NEED_DX=dx is not None, NEED_DV0=need_v[0], NEED_DV1=need_v[1], NEED_DV2=need_v[2],
        COMPUTE=_compute_type(coef), BLOCK=block, TILES=tiles, num_warps=4)
    return dx, dvs
