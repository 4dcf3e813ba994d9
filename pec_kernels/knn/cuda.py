"""CUDA kNN backend for small groups: wrappers over the kernels of csrc/knn_grouped.cu.

Follows the backend contract of pec_kernels.knn.backends, for self mode only (reference is None) on
x (G, n, D) CUDA tensors with 2 ≤ n ≤ 256 points per group, 1 ≤ k ≤ min(64, n − 1), float32, float16
or bfloat16. One thread block per group (or per 32 query rows) computes the exact fp32 distances
Σ_d (x_i − x_j)² and selects the k nearest in registers; the backward gathers each row's pairs in
shared memory and writes its gradient once. The ops are torch.ops.pec.knn_grouped_{select,
pair_distances, pair_grad}, registered by pec_kernels._C. knn_entropy's `valid` mask and the cosine
metric's row multipliers go to the kernels (no masked or normalised copy is made here).
"""
from __future__ import annotations

import torch

from pec_kernels._checks import check_index_range, check_mask, check_same_device, check_tensor
from pec_kernels._extension import cuda_ops_available, require_cuda_ops
from pec_kernels.knn.estimator import RowScale

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_GROUP = 256
MAX_K = 64
#: select_with_distances ranks by the exact fp32 Σ(x_i − x_j)² and returns those distances, so
#: knn_entropy neither centres the inputs nor recomputes the distances in a second pass.
EXACT_SELECT = True


def why_unsupported(x: torch.Tensor, reference: torch.Tensor | None, k: int) -> str | None:
    """The reason this backend cannot take these inputs, or None when it can."""
    if reference is not None:
        return "it handles self mode only (reference=None)"
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.numel() == 0:
        return "it needs a non-empty x of shape (G, n, D)"
    if not x.is_cuda:
        return f"it needs CUDA tensors, got x on {x.device}"
    if x.dtype not in DTYPES:
        return f"it supports float32/float16/bfloat16, got {x.dtype}"
    n = x.shape[1]
    if not 2 <= n <= MAX_GROUP:
        return f"it supports groups of 2 to {MAX_GROUP} points, got n={n}"
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(MAX_K, n - 1):
        return f"it supports 1 <= k <= min({MAX_K}, n - 1) = {min(MAX_K, n - 1)}, got k={k!r}"
    if not cuda_ops_available():
        return "the CUDA extension pec_kernels._C is not available"
    return None


def supports(x: torch.Tensor, reference: torch.Tensor | None, k: int) -> bool:
    """True when this backend can take these inputs (never raises)."""
    return why_unsupported(x, reference, k) is None


def select(x: torch.Tensor, reference: torch.Tensor | None, k: int, *, valid: torch.Tensor | None = None,
           scale: RowScale | None = None) -> torch.Tensor:
    """Indices (G, n, k) int64 of each point's k nearest other points of its group.

    Self is excluded by index (a duplicate is a neighbour at distance 0); ascending by the exact fp32
    distance, equal distances by smaller index. valid, scale: see select_with_distances.
    """
    return select_with_distances(x, reference, k, valid=valid, scale=scale)[0]


def select_with_distances(x: torch.Tensor, reference: torch.Tensor | None, k: int, *,
                          valid: torch.Tensor | None = None,
                          scale: RowScale | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """select() and the distances of the selected pairs, (G, n, k) int64 and (G, n, k) float32, in one
    kernel: the distances are the exact fp32 ‖x_i − x_j‖ that pair_distances() would recompute.

    valid: (G, n) bool, the points that may be neighbours; a masked one ranks after every valid one,
    at distance +inf (a row with fewer than k valid candidates gets some: the caller discards it).
    scale: the rows' multipliers (cosine), applied as the kernel stages the rows.
    """
    x = _checked_features(x, reference)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(MAX_K, x.shape[1] - 1):
        raise ValueError(f"k must be an int with 1 <= k <= min({MAX_K}, n - 1) = {min(MAX_K, x.shape[1] - 1)}, "
                         f"got {k!r}")
    if valid is not None:
        check_mask("valid", valid, x, "x")
    _check_cuda("x", x)
    index, distance = _op("knn_grouped_select")(x, k, None if valid is None else valid.contiguous(),
                                                 _checked_scale(scale, x))
    return index, distance


def pair_distances(x: torch.Tensor, reference: torch.Tensor | None, idx: torch.Tensor, *,
                   check_index: bool = True, scale: RowScale | None = None) -> torch.Tensor:
    """Exact ‖x_i − x_idx[i,s]‖ (G, n, k) in float32 for the pairs named by idx (G, n, k) int64.
    check_index=False skips the range check of idx (and its host synchronisation). scale: the rows'
    multipliers (cosine), applied as the kernel stages the rows."""
    x = _checked_features(x, reference)
    idx = _checked_index(idx, x, check_index)
    _check_cuda("x", x)
    return _op("knn_grouped_pair_distances")(x, idx, _checked_scale(scale, x))


def pair_grad(x: torch.Tensor, reference: torch.Tensor | None, idx: torch.Tensor, coef: torch.Tensor, *,
              check_index: bool = True, scale: RowScale | None = None) -> tuple[torch.Tensor, None]:
    """(grad_x (G, n, D) float32, None): grad_x_i += Σ_s coef[i,s]·(x_i − x_j) and
    grad_x_j −= coef[i,s]·(x_i − x_j) with j = idx[i,s]; deterministic, no atomics on global memory.
    check_index=False skips the range check of idx (and its host synchronisation). scale: the rows'
    multipliers (cosine), applied as the kernel stages the rows: the gradient is in the scaled rows."""
    x = _checked_features(x, reference)
    idx = _checked_index(idx, x, check_index)
    check_tensor("coef", coef, ndims=(3,), dtypes=(torch.float32,))
    if coef.shape != idx.shape:
        raise ValueError(f"coef must have the shape of idx {tuple(idx.shape)}, got {tuple(coef.shape)}")
    check_same_device(x=x, coef=coef)
    _check_cuda("x", x)
    return _op("knn_grouped_pair_grad")(x, idx, coef.contiguous(), _checked_scale(scale, x)), None


def _checked_features(x: object, reference: object) -> torch.Tensor:
    """x as a contiguous (G, n, D) tensor this backend takes; ValueError naming the argument otherwise."""
    if reference is not None:
        raise ValueError("reference must be None: the CUDA kNN backend handles self mode only")
    check_tensor("x", x, ndims=(3,), dtypes=DTYPES)
    if not 2 <= x.shape[1] <= MAX_GROUP:
        raise ValueError(f"x must have 2 to {MAX_GROUP} points per group (shape (G, n, D)), "
                         f"got shape {tuple(x.shape)}")
    return x.contiguous()


def _checked_scale(scale: RowScale | None, x: torch.Tensor) -> torch.Tensor | None:
    """The kernels' `scale` argument: scale.x as a contiguous (G, n) float32 tensor, or None."""
    if scale is None:
        return None
    check_tensor("scale", scale.x, ndims=(2,), dtypes=(torch.float32,))
    if scale.x.shape != x.shape[:2]:
        raise ValueError(f"scale must have shape (G, n) = {tuple(x.shape[:2])}, got {tuple(scale.x.shape)}")
    return scale.x.contiguous()


def _checked_index(idx: object, x: torch.Tensor, check_range: bool) -> torch.Tensor:
    """idx as a contiguous (G, n, k) int64 tensor of row numbers of x's groups.

    With check_range, values outside [0, n) raise (one host synchronisation; knn_entropy passes
    indices its own select produced and skips it). The kernels never dereference an out-of-range
    index either way: it gives a NaN distance and no gradient.
    """
    check_tensor("idx", idx, ndims=(3,), dtypes=(torch.int64,))
    num_groups, n, _ = x.shape
    if idx.shape[:2] != (num_groups, n) or not 1 <= idx.shape[2] <= MAX_K:
        raise ValueError(f"idx must have shape (G, n, k) = ({num_groups}, {n}, k) with 1 <= k <= {MAX_K}, "
                         f"got {tuple(idx.shape)}")
    check_same_device(x=x, idx=idx)
    if check_range:
        check_index_range("idx", idx, n, "n")
    return idx.contiguous()


def _op(name: str):
    """torch.ops.pec.<name>, looked up at call time (an extension that loaded without it raises here)."""
    return getattr(torch.ops.pec, name)


def _check_cuda(name: str, value: torch.Tensor) -> None:
    """Raise unless value is on a CUDA device and the extension is built (after the cheap checks)."""
    if not value.is_cuda:
        raise ValueError(f"{name} must be a CUDA tensor for the CUDA kNN backend, got device {value.device}")
    require_cuda_ops()
