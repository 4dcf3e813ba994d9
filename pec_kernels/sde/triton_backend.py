"""Triton kernels for the fused SDE pass (contract: torch_backend.py's module docstring).

Three launches per forward+backward, nothing else on the host but allocations:
- forward, grid (B·chunks,): each program evaluates its sample's step coefficients, streams one chunk
  of n, writes x' (and μ when asked for) and one partial sum of residual² (and of (v − v_ref)²);
- finalize, grid (B,): sums the chunk partials in a fixed order (deterministic, so a rollout and its
  re-evaluation give bit-identical log-probs) and writes log_prob, kl and std;
- backward, grid (B·chunks,): elementwise; recomputes μ (cheaper than storing the residual) and
  applies the per-sample scalings of the residual to write the gradients.
The (sample, chunk) grid is flattened onto axis 0, whose limit is 2³¹ − 1 programs (axes 1 and 2 stop
at 65,535, which would cap the batch), so any batch that fits in memory runs.
A per-sample parameter (σ, σ', sigma_max, guidance scale/weight) arrives either as a float or as a
0-d / (B,) tensor (pointer + stride); the PTRS bit mask says which. Loads upcast to the compute dtype
first (fp32, fp64 for fp64 inputs): the interpreter cannot do bf16 arithmetic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pec_kernels._triton_utils import interpreting
from pec_kernels.sde.coefficients import KIND_IDS, StepParams


@triton.jit
def _param(ptr, stride, value, b, IS_PTR: tl.constexpr, COMPUTE: tl.constexpr):
    if IS_PTR:
        return tl.load(ptr + b * stride).to(COMPUTE)
    return tl.full([], value, dtype=COMPUTE)


@triton.jit
def _coefficients(sigma, sigma_next, eta, sigma_max, KIND: tl.constexpr, EPS: tl.constexpr, TINY: tl.constexpr):
    """(a, b, s, inv_two_var, log_norm): coefficients.step_coefficients for one sample."""
    dt = sigma_next - sigma
    if KIND == 0:  # flow
        one_minus = tl.maximum(1.0 - tl.where(sigma >= 1.0, sigma_max, sigma), EPS)
        half_k = eta * eta / (2.0 * one_minus)
        a = 1.0 + half_k * dt
        b = (1.0 + half_k * (1.0 - sigma)) * dt
        s = eta * tl.sqrt(tl.maximum(sigma, 0.0) / one_minus) * tl.sqrt(tl.maximum(-dt, 0.0))
    elif KIND == 1:  # dance
        half_k = eta * eta / (2.0 * tl.maximum(sigma, EPS))
        a = 1.0 + half_k * dt
        b = dt + half_k * dt * (1.0 - sigma)
        s = eta * tl.sqrt(tl.maximum(-dt, 0.0))
    else:  # cps
        s_signed = sigma_next * tl.sin(eta * 1.5707963267948966)
        c = tl.sqrt(tl.maximum(sigma_next * sigma_next - s_signed * s_signed, 0.0))
        a = (1.0 - sigma_next) + c
        b = c * (1.0 - sigma) - sigma * (1.0 - sigma_next)
        s = tl.abs(s_signed)
    var = s * s
    stochastic = var > TINY
    safe_var = tl.where(stochastic, var, 1.0)
    inv_two_var = tl.where(stochastic, 0.5 / safe_var, 0.0)
    log_norm = tl.where(stochastic, -0.5 * tl.log(safe_var) - 0.9189385332046727, 0.0)
    return a, b, tl.where(stochastic, s, 0.0), inv_two_var, log_norm


@triton.jit
def _step(sig_ptr, sig_stride, sig_val, nxt_ptr, nxt_stride, nxt_val, max_ptr, max_stride, max_val, eta, b,
          PTRS: tl.constexpr, KIND: tl.constexpr, COMPUTE: tl.constexpr, EPS: tl.constexpr, TINY: tl.constexpr):
    sigma = _param(sig_ptr, sig_stride, sig_val, b, PTRS & 1, COMPUTE)
    sigma_next = _param(nxt_ptr, nxt_stride, nxt_val, b, PTRS & 2, COMPUTE)
    sigma_max = _param(max_ptr, max_stride, max_val, b, PTRS & 4, COMPUTE)
    return _coefficients(sigma, sigma_next, tl.full([], eta, dtype=COMPUTE), sigma_max, KIND, EPS, TINY)


@triton.jit
def _velocity(v0_ptr, v1_ptr, v2_ptr, offs, mask, gs, gw, NV: tl.constexpr, COMPUTE: tl.constexpr):
    v = tl.load(v0_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    if NV >= 2:
        v = v + gs * (tl.load(v1_ptr + offs, mask=mask, other=0.0).to(COMPUTE) - v)
    if NV == 3:
        v = v + gw * tl.load(v2_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    return v


@triton.jit
def _sde_forward_kernel(x_ptr, v0_ptr, v1_ptr, v2_ptr, target_ptr, vref_ptr, prev_ptr, mean_ptr, part_r_ptr,
                        part_kl_ptr, sig_ptr, sig_stride, sig_val, nxt_ptr, nxt_stride, nxt_val, max_ptr, max_stride,
                        max_val, gs_ptr, gs_stride, gs_val, gw_ptr, gw_stride, gw_val, eta, n, n_chunks,
                        NV: tl.constexpr, ROLLOUT: tl.constexpr, HAS_REF: tl.constexpr, STORE_MEAN: tl.constexpr,
                        PTRS: tl.constexpr, KIND: tl.constexpr, COMPUTE: tl.constexpr, EPS: tl.constexpr,
                        TINY: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr):
    chunk = tl.program_id(0) % n_chunks
    b = tl.program_id(0) // n_chunks
    a, bv, s, _, _ = _step(sig_ptr, sig_stride, sig_val, nxt_ptr, nxt_stride, nxt_val, max_ptr, max_stride, max_val,
                           eta, b, PTRS, KIND, COMPUTE, EPS, TINY)
    gs = _param(gs_ptr, gs_stride, gs_val, b, PTRS & 8, COMPUTE)
    gw = _param(gw_ptr, gw_stride, gw_val, b, PTRS & 16, COMPUTE)
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
        if STORE_MEAN:
            tl.store(mean_ptr + offs, mu.to(mean_ptr.dtype.element_ty), mask=mask)
        acc_r += tl.where(mask, r * r, 0.0)
        if HAS_REF:
            d = v - tl.load(vref_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
            acc_k += tl.where(mask, d * d, 0.0)
    tl.store(part_r_ptr + b * n_chunks + chunk, tl.sum(acc_r, axis=0))
    if HAS_REF:
        tl.store(part_kl_ptr + b * n_chunks + chunk, tl.sum(acc_k, axis=0))


@triton.jit
def _sde_finalize_kernel(part_r_ptr, part_kl_ptr, out_ptr, sig_ptr, sig_stride, sig_val, nxt_ptr, nxt_stride,
                         nxt_val, max_ptr, max_stride, max_val, eta, n_chunks, batch, inv_norm, n_over_norm,
                         HAS_REF: tl.constexpr, PTRS: tl.constexpr, KIND: tl.constexpr, COMPUTE: tl.constexpr,
                         EPS: tl.constexpr, TINY: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = (3, B): log_prob, kl, std."""
    b = tl.program_id(0)
    _, bv, s, inv_two_var, log_norm = _step(sig_ptr, sig_stride, sig_val, nxt_ptr, nxt_stride, nxt_val, max_ptr,
                                            max_stride, max_val, eta, b, PTRS, KIND, COMPUTE, EPS, TINY)
    acc_r = tl.zeros([BLOCK_C], dtype=COMPUTE)
    acc_k = tl.zeros([BLOCK_C], dtype=COMPUTE)
    for c0 in range(0, n_chunks, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        acc_r += tl.load(part_r_ptr + b * n_chunks + c, mask=c < n_chunks, other=0.0)
        if HAS_REF:
            acc_k += tl.load(part_kl_ptr + b * n_chunks + c, mask=c < n_chunks, other=0.0)
    tl.store(out_ptr + b, log_norm * n_over_norm - inv_two_var * tl.sum(acc_r, axis=0) * inv_norm)
    if HAS_REF:
        tl.store(out_ptr + batch + b, inv_two_var * bv * bv * tl.sum(acc_k, axis=0) * inv_norm)
    tl.store(out_ptr + 2 * batch + b, s)


@triton.jit
def _sde_backward_kernel(x_ptr, v0_ptr, v1_ptr, v2_ptr, prev_ptr, vref_ptr, glp_ptr, gkl_ptr, gmean_ptr, gprev_ptr,
                         dx_ptr, dv0_ptr, dv1_ptr, dv2_ptr, sig_ptr, sig_stride, sig_val, nxt_ptr, nxt_stride,
                         nxt_val, max_ptr, max_stride, max_val, gs_ptr, gs_stride, gs_val, gw_ptr, gw_stride, gw_val,
                         eta, n, n_chunks, inv_norm,
                         NV: tl.constexpr, HAS_GLP: tl.constexpr, HAS_GKL: tl.constexpr, HAS_GMEAN: tl.constexpr,
                         HAS_GPREV: tl.constexpr, NEED_DX: tl.constexpr, NEED_DV0: tl.constexpr,
                         NEED_DV1: tl.constexpr, NEED_DV2: tl.constexpr, PTRS: tl.constexpr, KIND: tl.constexpr,
                         COMPUTE: tl.constexpr, EPS: tl.constexpr, TINY: tl.constexpr,
                         BLOCK: tl.constexpr, TILES: tl.constexpr):
    chunk = tl.program_id(0) % n_chunks
    b = tl.program_id(0) // n_chunks
    a, bv, _, inv_two_var, _ = _step(sig_ptr, sig_stride, sig_val, nxt_ptr, nxt_stride, nxt_val, max_ptr, max_stride,
                                     max_val, eta, b, PTRS, KIND, COMPUTE, EPS, TINY)
    gs = _param(gs_ptr, gs_stride, gs_val, b, PTRS & 8, COMPUTE)
    gw = _param(gw_ptr, gw_stride, gw_val, b, PTRS & 16, COMPUTE)
    gr = tl.full([], 0.0, dtype=COMPUTE)
    if HAS_GLP:
        gr = 2.0 * inv_two_var * inv_norm * tl.load(glp_ptr + b).to(COMPUTE)
    gk = tl.full([], 0.0, dtype=COMPUTE)
    if HAS_GKL:
        gk = 2.0 * inv_two_var * bv * bv * inv_norm * tl.load(gkl_ptr + b).to(COMPUTE)
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
        if HAS_GKL:
            g_v += gk * (v - tl.load(vref_ptr + offs, mask=mask, other=0.0).to(COMPUTE))
        if NEED_DX:
            tl.store(dx_ptr + offs, (a * g_mu).to(dx_ptr.dtype.element_ty), mask=mask)
        if NV == 1:
            if NEED_DV0:
                tl.store(dv0_ptr + offs, g_v.to(dv0_ptr.dtype.element_ty), mask=mask)
        else:
            if NEED_DV0:
                tl.store(dv0_ptr + offs, ((1.0 - gs) * g_v).to(dv0_ptr.dtype.element_ty), mask=mask)
            if NEED_DV1:
                tl.store(dv1_ptr + offs, (gs * g_v).to(dv1_ptr.dtype.element_ty), mask=mask)
            if NV == 3 and NEED_DV2:
                tl.store(dv2_ptr + offs, (gw * g_v).to(dv2_ptr.dtype.element_ty), mask=mask)


#: Programs of one launch: grid axis 0 takes up to 2³¹ − 1.
MAX_PROGRAMS = 2**31 - 1


def _launch_shape(batch: int, n: int) -> tuple[int, int, int]:
    """(BLOCK, TILES, chunks): small fixed tiles under the interpreter, 4 K-element chunks on GPU."""
    block, tiles = (128, 2) if interpreting() else (1024, 4)
    chunks = triton.cdiv(n, block * tiles)
    if batch * chunks > MAX_PROGRAMS:
        raise ValueError(f"x is too large for one Triton launch: {batch} samples x {chunks} chunks of "
                         f"{block * tiles} elements > {MAX_PROGRAMS} programs; split the batch")
    return block, tiles, chunks


def _step_args(params: StepParams, dummy: torch.Tensor) -> tuple[list, dict]:
    """Kernel arguments for the per-sample parameters: (ptr, stride, value) per parameter, then eta;
    and the constexprs PTRS (which parameters are tensors), KIND, COMPUTE, EPS, TINY."""
    args, ptrs = [], 0
    for bit, value in enumerate((params.sigma, params.sigma_next, params.sigma_max, params.guidance_scale,
                                 params.guidance_weight)):
        if isinstance(value, torch.Tensor):
            args += [value, 1 if value.dim() == 1 else 0, 0.0]
            ptrs |= 1 << bit
        else:
            args += [dummy, 0, value]
    info = torch.finfo(params.dtype)
    const = dict(PTRS=ptrs, KIND=KIND_IDS[params.kind], COMPUTE=tl.float64 if params.dtype == torch.float64
                 else tl.float32, EPS=info.eps, TINY=info.tiny)
    return args + [params.eta], const


def forward(x: torch.Tensor, vels: tuple[torch.Tensor, ...], target: torch.Tensor, v_ref: torch.Tensor | None,
            params: StepParams, rollout: bool, norm: int, want_mean: bool):
    """See torch_backend.forward."""
    batch, n = x.shape
    block, tiles, chunks = _launch_shape(batch, n)
    prev = torch.empty_like(x) if rollout else None
    mean = torch.empty_like(x) if want_mean else None
    part = torch.empty((2 if v_ref is not None else 1, batch, chunks), dtype=params.dtype, device=x.device)
    out = torch.empty((3, batch), dtype=params.dtype, device=x.device)
    step, const = _step_args(params, x)
    sig, nxt, smax, gs, gw, eta = step[0:3], step[3:6], step[6:9], step[9:12], step[12:15], step[15]
    v1, v2 = (tuple(vels[1:]) + (x, x))[:2]
    _sde_forward_kernel[(batch * chunks,)](
        x, vels[0], v1, v2, target, x if v_ref is None else v_ref, x if prev is None else prev,
        x if mean is None else mean, part[0], part[-1], *sig, *nxt, *smax, *gs, *gw, eta, n, chunks,
        NV=len(vels), ROLLOUT=rollout, HAS_REF=v_ref is not None, STORE_MEAN=want_mean, BLOCK=block, TILES=tiles,
        num_warps=4, **const)
    _sde_finalize_kernel[(batch,)](
        part[0], part[-1], out, *sig, *nxt, *smax, eta, chunks, batch, 1.0 / norm, n / norm,
        HAS_REF=v_ref is not None, BLOCK_C=min(triton.next_power_of_2(chunks), 256), num_warps=1, **const)
    return prev, mean, out[0], (out[1] if v_ref is not None else None), out[2]


def backward(x: torch.Tensor, vels: tuple[torch.Tensor, ...], prev: torch.Tensor, v_ref: torch.Tensor | None,
             params: StepParams, norm: int, grad_log_prob: torch.Tensor | None, grad_kl: torch.Tensor | None,
             grad_mean: torch.Tensor | None, grad_prev: torch.Tensor | None, needs: tuple[bool, ...]):
    """See torch_backend.backward."""
    batch, n = x.shape
    block, tiles, chunks = _launch_shape(batch, n)
    grad_kl = grad_kl if v_ref is not None else None
    grads = [None if g is None else g.contiguous() for g in (grad_log_prob, grad_kl, grad_mean, grad_prev)]
    dx = torch.empty_like(x) if needs[0] else None
    dvs = tuple(torch.empty_like(v) if need else None for v, need in zip(vels, needs[1:]))
    outs = (dx,) + dvs + (None,) * (3 - len(vels))
    step, const = _step_args(params, x)
    v1, v2 = (tuple(vels[1:]) + (x, x))[:2]
    _sde_backward_kernel[(batch * chunks,)](
        x, vels[0], v1, v2, prev, x if v_ref is None else v_ref, *(x if g is None else g for g in grads),
        *(x if o is None else o for o in outs), *step, n, chunks, 1.0 / norm,
        NV=len(vels), HAS_GLP=grads[0] is not None, HAS_GKL=grads[1] is not None, HAS_GMEAN=grads[2] is not None,
        HAS_GPREV=grads[3] is not None, NEED_DX=outs[0] is not None, NEED_DV0=outs[1] is not None,
        NEED_DV1=outs[2] is not None, NEED_DV2=outs[3] is not None, BLOCK=block, TILES=tiles, num_warps=4,
        **const)
    return dx, dvs
