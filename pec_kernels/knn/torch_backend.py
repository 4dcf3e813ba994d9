"""Pure-torch kNN backend: the reference implementation and the CPU path.

Works on any device and on float64. Every step is chunked so that no intermediate holds more than
about CHUNK_ELEMENTS elements: selection never materialises an n×m distance matrix for large n.
Inputs follow the backend contract of pec_kernels.knn.backends: x (G, n, D), reference (G, M, D),
(1, M, D) (a bank shared by all groups) or None (self mode), all contiguous.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from pec_kernels._checks import check_index_range
from pec_kernels.knn.estimator import RowScale

#: Upper bound on the elements of any intermediate (distance chunks, gathered rows). Tests lower it.
CHUNK_ELEMENTS = 1 << 26
#: Ranks with the expanded form ‖x‖² + ‖c‖² − 2x·c: knn_entropy centres fp32 inputs first and
#: recomputes the selected distances exactly.
EXACT_SELECT = False


def why_unsupported(x: torch.Tensor, reference: torch.Tensor | None, k: int) -> str | None:
    """None: the torch backend takes every input the public API accepts."""
    return None


def supports(x: torch.Tensor, reference: torch.Tensor | None, k: int) -> bool:
    """True: the torch backend takes every input the public API accepts."""
    return True


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (the reference precision); everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _candidates(x: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
    return x if reference is None else reference


def _scaled(x: torch.Tensor, reference: torch.Tensor | None,
            scale: RowScale | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x and reference with their rows multiplied by `scale` (the cosine metric's normalised copies, in
    the working precision: the reference backend may copy), or both unchanged."""
    if scale is None:
        return x, reference
    dtype = _work_dtype(x)
    x = x.to(dtype) * scale.x[..., None]
    return x, None if reference is None else reference.to(dtype) * scale.reference[..., None]


def _group_of_reference(reference: torch.Tensor, groups: slice) -> torch.Tensor:
    """The reference rows of a slice of groups; a shared (1, M, D) bank serves every group."""
    return reference if reference.shape[0] == 1 else reference[groups]


def _chunks(num_groups: int, num_rows: int, per_row: int) -> Iterator[tuple[slice, slice]]:
    """(group slice, row slice) blocks such that groups × rows × per_row ≲ CHUNK_ELEMENTS."""
    rows = max(1, min(num_rows, CHUNK_ELEMENTS // max(per_row, 1)))
    groups = max(1, min(num_groups, CHUNK_ELEMENTS // max(rows * per_row, 1)))
    for g0 in range(0, num_groups, groups):
        for r0 in range(0, num_rows, rows):
            yield slice(g0, g0 + groups), slice(r0, r0 + rows)


def select(x: torch.Tensor, reference: torch.Tensor | None, k: int, shift: torch.Tensor | None = None, *,
           valid: torch.Tensor | None = None, scale: RowScale | None = None) -> torch.Tensor:
    """Indices (G, n, k) int64 of each row's k nearest candidates, nearest first.

    Ranks with the expanded form ‖x‖² + ‖c‖² − 2x·c per chunk (in float32, or float64 for float64
    inputs); the caller recomputes the exact distances of the selected pairs and re-sorts them, which
    also orders exact ties by index (torch.topk does not). Self is excluded by index. shift: (G|1, 1, D)
    subtracted from x and the candidates first (distances do not change; precision improves).
    valid: (G|1, m) bool, the candidates that may be chosen (the others rank last, at +inf; a row with
    fewer than k of them gets in-range indices of masked ones, which the caller discards). scale: the
    rows' multipliers (cosine), applied first.
    """
    dtype = _work_dtype(x)
    x, reference = _scaled(x, reference, scale)
    if shift is not None:
        x = (x - shift).contiguous()
        reference = None if reference is None else (reference - shift).contiguous()
    cand = _candidates(x, reference)
    num_groups, n, _ = x.shape
    m = cand.shape[1]
    x_sq = x.to(dtype).square().sum(-1)
    c_sq = cand.to(dtype).square().sum(-1)
    index = torch.empty((num_groups, n, k), dtype=torch.int64, device=x.device)
    for groups, rows in _chunks(num_groups, n, m):
        xc = x[groups, rows].to(dtype)
        cc = cand[groups] if reference is None else _group_of_reference(cand, groups)
        cn = c_sq[groups] if reference is None else _group_of_reference(c_sq, groups)
        sq = torch.baddbmm(x_sq[groups, rows, None] + cn[:, None, :], xc,
                           cc.to(dtype).expand(xc.shape[0], -1, -1).transpose(1, 2), alpha=-2.0)
        if reference is None:
            own = torch.arange(rows.start, rows.start + xc.shape[1], device=x.device)
            sq[:, torch.arange(xc.shape[1], device=x.device), own] = float("inf")
        if valid is not None:
            ok = valid[groups] if reference is None else _group_of_reference(valid, groups)
            sq = sq.masked_fill(~ok[:, None, :], float("inf"))
        index[groups, rows] = torch.topk(sq, k, dim=-1, largest=False, sorted=True).indices
    return index


def pair_distances(x: torch.Tensor, reference: torch.Tensor | None, index: torch.Tensor, *,
                   check_index: bool = True, scale: RowScale | None = None) -> torch.Tensor:
    """Exact ‖x_i − c_j‖ (G, n, k) of the selected pairs, by direct differences (float32 or float64).
    check_index: check that index holds candidate numbers (one host synchronisation). scale: the rows'
    multipliers (cosine), applied first."""
    dtype = _work_dtype(x)
    x, reference = _scaled(x, reference, scale)
    cand = _candidates(x, reference)
    if check_index:
        check_index_range("index", index, cand.shape[1], "m")
    num_groups, n, k = index.shape
    out = torch.empty((num_groups, n, k), dtype=dtype, device=x.device)
    for groups, rows in _chunks(num_groups, n, k * x.shape[-1]):
        neighbours = _gather_rows(cand, groups, index[groups, rows]).to(dtype)
        diff = x[groups, rows, None, :].to(dtype) - neighbours
        out[groups, rows] = diff.square().sum(-1).sqrt()
    return out


def pair_grad(x: torch.Tensor, reference: torch.Tensor | None, index: torch.Tensor, coef: torch.Tensor, *,
              check_index: bool = True, scale: RowScale | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scatter the selected pairs' gradients: grad_x_i += Σ_j coef_ij (x_i − c_j), grad_c_j −= the same.

    In self mode both go to grad_x. Returns (grad_x, grad_reference or None) in float32 (float64 for
    float64 inputs); a shared bank gets one (1, M, D) gradient summed over all groups.
    check_index: check that index holds candidate numbers (one host synchronisation). scale: the rows'
    multipliers (cosine), applied first: the gradients are then in the scaled rows.
    """
    dtype = _work_dtype(x)
    x, reference = _scaled(x, reference, scale)
    cand = _candidates(x, reference)
    if check_index:
        check_index_range("index", index, cand.shape[1], "m")
    num_groups, n, k = index.shape
    dim = x.shape[-1]
    grad_x = torch.zeros((num_groups, n, dim), dtype=dtype, device=x.device)
    grad_c = grad_x if reference is None else torch.zeros(cand.shape, dtype=dtype, device=x.device)
    flat_grad_c = grad_c.view(-1, dim)
    for groups, rows in _chunks(num_groups, n, k * dim):
        idx = index[groups, rows]
        weighted = coef[groups, rows, :, None].to(dtype) * (
            x[groups, rows, None, :].to(dtype) - _gather_rows(cand, groups, idx).to(dtype))
        grad_x[groups, rows] += weighted.sum(-2)
        flat_grad_c.index_add_(0, _flat_rows(grad_c, groups, idx).reshape(-1), -weighted.reshape(-1, dim))
    return grad_x, (None if reference is None else grad_c)


def _flat_rows(cand: torch.Tensor, groups: slice, idx: torch.Tensor) -> torch.Tensor:
    """Row numbers into cand.view(-1, D) of the candidates idx (g, r, k) of a slice of groups."""
    if cand.shape[0] == 1:
        return idx
    first = torch.arange(groups.start, groups.start + idx.shape[0], device=idx.device) * cand.shape[1]
    return idx + first[:, None, None]


def _gather_rows(cand: torch.Tensor, groups: slice, idx: torch.Tensor) -> torch.Tensor:
    """The candidate vectors (g, r, k, D) named by idx (g, r, k) for a slice of groups."""
    return cand.reshape(-1, cand.shape[-1])[_flat_rows(cand, groups, idx)]
