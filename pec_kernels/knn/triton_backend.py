"""Triton kNN backend: launches the kernels of triton_kernels.py (the GPU workhorse).

Follows the backend contract of pec_kernels.knn.backends: x (G, n, D), reference (G, M, D), (1, M, D)
(a bank shared by all groups) or None (self mode), all contiguous. Runs on CUDA tensors, and on CPU
tensors under TRITON_INTERPRET=1 (fixed small blocks, 16-bit inputs upcast to float32 in the kernel:
the interpreter computes bf16 arithmetic wrongly).
"""
from __future__ import annotations

import contextlib

import torch
import triton

from pec_kernels._checks import check_index_range
from pec_kernels._triton_utils import interpreting, triton_usable_on
from pec_kernels.knn import triton_kernels as kernels
from pec_kernels.knn.estimator import RowScale

#: tl.dot precision for ranking float32 inputs on GPU: "tf32" (fast), "tf32x3" or "ieee" (slower, fewer
#: near-tie swaps). Exact distances are recomputed in float32 either way. The interpreter uses "ieee".
INPUT_PRECISION = "tf32"
#: Ranks with the expanded form ‖x‖² + ‖c‖² − 2x·c: knn_entropy centres fp32 inputs first and
#: recomputes the selected distances exactly.
EXACT_SELECT = False

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_K = 64


def why_unsupported(x: torch.Tensor, reference: torch.Tensor | None, k: int) -> str | None:
    """The reason this backend cannot take these inputs, or None when it can."""
    if not triton_usable_on(x.device):
        return (f"Triton cannot run on {x.device} here (it needs a CUDA device, or a CPU tensor under "
                "TRITON_INTERPRET=1)")
    if x.dtype not in _DTYPES:
        return f"it supports float32/float16/bfloat16, got {x.dtype}"
    if k > _MAX_K:
        return f"it supports k <= {_MAX_K}, got {k}"
    return None


def supports(x: torch.Tensor, reference: torch.Tensor | None, k: int) -> bool:
    """True when this backend can take these inputs."""
    return why_unsupported(x, reference, k) is None


def _on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on t's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _candidates(x: torch.Tensor, reference: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """The candidate tensor and its group stride (0 for a bank shared by all groups)."""
    cand = x if reference is None else reference
    return cand, (cand.stride(0) if cand.shape[0] > 1 else 0)


def _row_scales(x: torch.Tensor, reference: torch.Tensor | None, scale: RowScale | None, placeholder: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' (x, candidate) row-multiplier arguments, contiguous float32: scale's, or `placeholder`
    twice without one (HAS_SCALE=False: never read)."""
    if scale is None:
        return placeholder, placeholder
    x_scale = scale.x.to(torch.float32).contiguous()
    return x_scale, x_scale if reference is None else scale.reference.to(torch.float32).contiguous()


def _slots(k: int) -> int:
    """KP: the per-row slots of the running top-k, the power of 2 ≥ k (tensor shapes are powers of 2)."""
    return triton.next_power_of_2(k)


#: Largest D whose query tile stays on chip across candidate tiles (16-bit inputs only: 64 rows x 512
#: bf16 = 64 KiB); larger D, and float32, stream D in BLOCK_D blocks for every candidate tile.
MAX_RESIDENT_D = 512


def _resident_d(dtype: torch.dtype, dim: int, shifted: bool) -> int:
    """RESIDENT_D of knn_select_kernel: D padded to a power of 2 when the query tile is kept on chip, else 0."""
    if dtype not in (torch.float16, torch.bfloat16) or shifted or dim > MAX_RESIDENT_D:
        return 0
    return max(16, triton.next_power_of_2(dim))


def _select_config(dtype: torch.dtype, kp: int, dim: int, shifted: bool) -> dict:
    """Fixed blocks: autotuning needs a GPU, and these few shapes cover the cases."""
    resident = _resident_d(dtype, dim, shifted)
    if interpreting():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=16, RESIDENT_D=resident, UPCAST=True, INPUT_PRECISION="ieee")
    # Checked with ptxas for sm_90: no register spills at 8 warps, except 32 bytes for float32 at k > 32.
    # The running best (BLOCK_M × KP int64) lives in registers: halve the row block for k > 32.
    # Resident query tile (Triton 3.8, ptxas for sm_90a): bf16, D = 512, k = 5: 249 registers (216 when
    # streaming: one block per SM either way at 8 warps), 128 KiB of shared memory, no spills.
    return dict(BLOCK_M=64 if kp <= 32 else 32, BLOCK_N=64, BLOCK_D=32 if dtype == torch.float32 else 64,
                RESIDENT_D=resident, UPCAST=False, INPUT_PRECISION=INPUT_PRECISION, num_warps=8)


def _row_norm_blocks() -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D) of row_sq_norm_kernel."""
    return (32, 16) if interpreting() else (64, 128)


def _pair_distance_blocks() -> tuple[int, int]:
    """(BLOCK_P, BLOCK_D) of pair_distance_kernel."""
    return (64, 16) if interpreting() else (32, 128)


def _pair_grad_blocks() -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D) of pair_grad_kernel."""
    return (32, 16) if interpreting() else (32, 128)


def select(x: torch.Tensor, reference: torch.Tensor | None, k: int, shift: torch.Tensor | None = None, *,
           valid: torch.Tensor | None = None, scale: RowScale | None = None) -> torch.Tensor:
    """Indices (G, n, k) int64 of each row's k nearest candidates (ascending, ties to smaller index),
    ranked with tl.dot in the input precision (TF32 for float32 on GPU); self excluded by index.

    shift (float32 inputs): (G|1, 1, D), subtracted from x and the candidates inside the kernels. The
    squared norms are computed by a Triton kernel too, so the only allocations are O(G·n + G·m) norms
    and the (G, n, k) keys: no O(N·D) temporary. valid: (G|1, m) bool, the candidates that may be
    chosen (a row with fewer than k of them gets in-range indices of others, which the caller
    discards). scale: the rows' multipliers (cosine), applied as the kernels load the rows.
    """
    cand, stride_cg = _candidates(x, reference)
    num_groups, n, dim = x.shape
    m = cand.shape[1]
    if shift is not None:
        shift = shift.to(torch.float32).contiguous()
    stride_shift_g = 0 if shift is None or shift.shape[0] == 1 else shift.stride(0)
    x_scale, c_scale = _row_scales(x, reference, scale, placeholder=x.new_empty((1,), dtype=torch.float32))
    x_sq = _row_sq_norms(x, shift, stride_shift_g, None if scale is None else x_scale)
    c_sq = x_sq if reference is None else _row_sq_norms(cand, shift, stride_shift_g,
                                                         None if scale is None else c_scale)
    keys = torch.empty((num_groups, n, k), dtype=torch.int64, device=x.device)
    kp = _slots(k)
    config = _select_config(x.dtype, kp, dim, shift is not None)
    grid = (num_groups * triton.cdiv(n, config["BLOCK_M"]),)
    with _on_device(x):
        kernels.knn_select_kernel[grid](
            x, cand, x_sq, c_sq, x_sq if shift is None else shift, x_scale, c_scale,
            x_sq if valid is None else valid.contiguous(), keys, n, m, dim,
            x.stride(0), x.stride(1), stride_cg, cand.stride(1), x_sq.stride(0),
            c_sq.stride(0) if stride_cg else 0, stride_shift_g,
            K=k, KP=kp, SELF=reference is None, HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None,
            HAS_VALID=valid is not None, **config)
    # Keys are (d² bits << 32 | column): sorting them orders by distance, ties by smaller column.
    return torch.sort(keys, dim=-1).values & 0x7FFFFFFF


def _row_sq_norms(t: torch.Tensor, shift: torch.Tensor | None, stride_shift_g: int,
                  scale: torch.Tensor | None = None) -> torch.Tensor:
    """(G, rows) float32 ‖s_r·t_r − shift‖² of a contiguous (G, rows, D) tensor (s = scale, or 1),
    computed in a kernel."""
    num_groups, rows, dim = t.shape
    out = torch.empty((num_groups, rows), dtype=torch.float32, device=t.device)
    block_r, block_d = _row_norm_blocks()
    with _on_device(t):
        kernels.row_sq_norm_kernel[(triton.cdiv(out.numel(), block_r),)](
            t, out if shift is None else shift, out if scale is None else scale, out, out.numel(), rows, dim,
            stride_shift_g, HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None, BLOCK_R=block_r,
            BLOCK_D=block_d)
    return out


def pair_distances(x: torch.Tensor, reference: torch.Tensor | None, index: torch.Tensor, *,
                   check_index: bool = True, scale: RowScale | None = None) -> torch.Tensor:
    """Exact ‖x_i − c_j‖ (G, n, k) float32 of the selected pairs, reduced in float32.
    check_index: check that index holds candidate numbers (one host synchronisation; the kernel does
    not bounds-check them). scale: the rows' multipliers (cosine), applied as they are loaded."""
    cand, stride_cg = _candidates(x, reference)
    if check_index:
        check_index_range("index", index, cand.shape[1], "m")
    num_groups, n, k = index.shape
    out = torch.empty((num_groups, n, k), dtype=torch.float32, device=x.device)
    x_scale, c_scale = _row_scales(x, reference, scale, placeholder=out)
    block_p, block_d = _pair_distance_blocks()
    grid = (triton.cdiv(out.numel(), block_p),)
    with _on_device(x):
        kernels.pair_distance_kernel[grid](
            x, cand, index, x_scale, c_scale, out, n, x.shape[-1], out.numel(),
            x.stride(0), x.stride(1), stride_cg, cand.stride(1), cand.shape[1] if stride_cg else 0,
            K=k, HAS_SCALE=scale is not None, BLOCK_P=block_p, BLOCK_D=block_d)
    return out


def pair_grad(x: torch.Tensor, reference: torch.Tensor | None, index: torch.Tensor, coef: torch.Tensor, *,
              check_index: bool = True, scale: RowScale | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """grad_x_i += Σ_j coef_ij (x_i − c_j), grad_c_j −= coef_ij (x_i − c_j), in float32.

    Returns (grad_x (G, n, D), grad_reference (G|1, M, D) or None in self mode, where both sides land in
    grad_x). Candidate-side sums use float32 atomics, so the last bits vary from run to run.
    check_index: check that index holds candidate numbers (one host synchronisation). scale: the rows'
    multipliers (cosine), applied as they are loaded: the gradients are in the scaled rows.
    """
    cand, stride_cg = _candidates(x, reference)
    if check_index:
        check_index_range("index", index, cand.shape[1], "m")
    num_groups, n, dim = x.shape
    if reference is None:
        grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        grad_c = grad_x
    else:
        grad_x = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        grad_c = torch.zeros(cand.shape, dtype=torch.float32, device=x.device)
    x_scale, c_scale = _row_scales(x, reference, scale, placeholder=grad_x)
    block_r, block_d = _pair_grad_blocks()
    grid = (num_groups * triton.cdiv(n, block_r), triton.cdiv(dim, block_d))
    with _on_device(x):
        kernels.pair_grad_kernel[grid](
            x, cand, index, coef.to(torch.float32).contiguous(), x_scale, c_scale, grad_x, grad_c, n, dim,
            x.stride(0), x.stride(1), stride_cg, cand.stride(1), grad_c.stride(0) if stride_cg else 0,
            cand.shape[1] if stride_cg else 0,
            K=index.shape[-1], SELF=reference is None, HAS_SCALE=scale is not None, BLOCK_R=block_r,
            BLOCK_D=block_d)
    return grad_x, (None if reference is None else grad_c)
