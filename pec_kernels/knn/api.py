"""knn_entropy: the public Kozachenko-Leonenko kNN entropy op (DESIGN.md §2.2, §3)."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from pec_kernels._checks import check_choice, check_same_device, check_tensor
from pec_kernels._checks import check_finite as _check_finite
from pec_kernels._fallback import Chain
from pec_kernels._fallback import run as run_with_fallback
from pec_kernels.knn.autograd import NeighbourDistances
from pec_kernels.knn.backends import BACKENDS, candidates, module_of
from pec_kernels.knn.estimator import surprisal_from_distance

MAX_K = 64
METRICS = ("euclidean", "cosine")
NORMALIZATIONS = ("none", "per_dim")


class KnnEntropy(NamedTuple):
    """Result of knn_entropy; the leading G dimension is present only for grouped inputs.

    entropy: () or (G,) mean surprisal. surprisal: (..., n) per-sample −log p̂.
    index: (..., n, k) int64 into the candidates (x itself in self mode, else the reference bank).
    distance: (..., n, k) distances to those candidates, ascending, clamped below at min_dist
    (float32; float64 for float64 inputs).
    """

    entropy: torch.Tensor
    surprisal: torch.Tensor
    index: torch.Tensor
    distance: torch.Tensor


def knn_entropy(x: torch.Tensor, k: int = 3, *, reference: torch.Tensor | None = None,
                metric: str = "euclidean", min_dist: float = 1e-6, normalize: str = "none",
                backend: str = "auto", check_finite: bool = True) -> KnnEntropy:
    """Kozachenko-Leonenko kNN entropy of a set of feature vectors, differentiable in x and reference.

    surprisal_i = ψ(m+1) − ψ(k) + log V_D + D·log ρ_i, with ρ_i = max(distance to the k-th nearest of the
    m candidates, min_dist); entropy = mean_i surprisal_i.

    Args:
        x: (n, D) samples, or (G, n, D) for G independent groups (one entropy per group).
        k: neighbour rank, 1 ≤ k ≤ 64 and k ≤ m.
        reference: None for self mode (candidates: the other n − 1 rows of the same group; self is
            excluded by index, so duplicates are neighbours at distance 0), or a bank of candidates:
            (M, D) shared by all groups, or (G, M, D) one per group. Same dtype and device as x.
        metric: "euclidean", or "cosine" (rows L2-normalised first, differentiably).
        min_dist: floor of ρ (> 0): duplicates give a finite surprisal and no gradient.
        normalize: "none", or "per_dim" to divide surprisal and entropy by D.
        backend: "auto" (CUDA kernels, then Triton on GPU; torch elsewhere), "cuda", "triton", "torch".
            Under "auto" a faster backend that fails to compile or launch is replaced by the next one,
            with one RuntimeWarning (pec_kernels._fallback).
        check_finite: raise a ValueError when x or reference holds NaN or Inf (one host
            synchronisation per call). Pass False where the caller checks once per step itself (the
            trainer); a group holding non-finite values then gets meaningless (often non-finite)
            results, the other groups are unaffected, and nothing raises. Under torch.compile the
            check is a device-side assert (no graph break).

    Returns:
        KnnEntropy(entropy, surprisal, index, distance); see its docstring for shapes.

    Raises:
        ValueError naming the argument for bad input; RuntimeError when an explicitly requested
        backend is not installed or built.
    """
    x_groups, ref_groups = _validated(x, k, reference, metric, min_dist, normalize, backend, check_finite)
    num_candidates = x_groups.shape[1] - 1 if ref_groups is None else ref_groups.shape[1]
    if metric == "cosine":
        x_groups = F.normalize(x_groups, dim=-1)
        ref_groups = None if ref_groups is None else F.normalize(ref_groups, dim=-1)
    x_groups = x_groups.contiguous()
    ref_groups = None if ref_groups is None else ref_groups.contiguous()

    def neighbours(chain: Chain) -> tuple[torch.Tensor, torch.Tensor]:
        module = module_of(chain[0])
        with torch.no_grad():
            x_rank, ref_rank = x_groups.detach(), None if ref_groups is None else ref_groups.detach()
            if module.EXACT_SELECT:
                index, exact = module.select_with_distances(x_rank, ref_rank, k)
            else:
                index, exact = module.select(x_rank, ref_rank, k, _shift(x_rank, ref_rank)), None
        return NeighbourDistances.apply(x_groups, ref_groups, index, float(min_dist), tuple(chain), exact)

    distance, index = run_with_fallback("knn_entropy", candidates(backend, x_groups, ref_groups, k), neighbours)

    surprisal = surprisal_from_distance(distance[..., -1], num_candidates, k, x.shape[-1],
                                        per_dim=normalize == "per_dim")
    entropy = surprisal.mean(-1)
    if x.dim() == 2:
        return KnnEntropy(entropy[0], surprisal[0], index[0], distance[0])
    return KnnEntropy(entropy, surprisal, index, distance)


def _shift(x: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor | None:
    """The candidates' mean per group, (G|1, 1, D), that the backends subtract before ranking (inside
    their kernels: no centred copy of x): distances do not change, but the expanded form
    ‖x‖² + ‖c‖² − 2x·c (and TF32's 10-bit inputs) lose far less precision on features far from the
    origin. None for 16-bit inputs: their products are exact in float32, while rounding the shifted
    values back to 16 bits would perturb the ranking more than it gains."""
    if x.dtype not in (torch.float32, torch.float64):
        return None
    return (x if reference is None else reference).mean(dim=1, keepdim=True)


def _validated(x: object, k: object, reference: object, metric: object, min_dist: object,
               normalize: object, backend: object, finite: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check every argument; return x as (G, n, D) and reference as (G, M, D), (1, M, D) or None."""
    check_tensor("x", x, ndims=(2, 3))
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an int with 1 <= k <= {MAX_K}, got {k!r}")
    check_choice("metric", metric, METRICS)
    check_choice("normalize", normalize, NORMALIZATIONS)
    check_choice("backend", backend, BACKENDS)
    if (isinstance(min_dist, bool) or not isinstance(min_dist, (int, float))
            or not math.isfinite(min_dist) or min_dist <= 0):
        raise ValueError(f"min_dist must be a finite number > 0, got {min_dist!r}")
    if not isinstance(finite, bool):
        raise ValueError(f"check_finite must be a bool, got {type(finite).__name__}")
    x_groups = x if x.dim() == 3 else x.unsqueeze(0)
    if finite:
        _check_finite("x", x)

    if reference is None:
        num_candidates = x_groups.shape[1] - 1
        if k > num_candidates:
            raise ValueError(f"k must be at most the number of candidates n - 1 = {num_candidates} in self "
                             f"mode (x has shape {tuple(x.shape)}), got k={k}")
        return x_groups, None

    check_tensor("reference", reference, ndims=(2, 3))
    check_same_device(x=x, reference=reference)
    if reference.dtype != x.dtype:
        raise ValueError(f"reference must have the dtype of x ({x.dtype}), got {reference.dtype}")
    if reference.shape[-1] != x.shape[-1]:
        raise ValueError(f"reference must have the feature dimension of x (D={x.shape[-1]}), "
                         f"got shape {tuple(reference.shape)}")
    if reference.dim() == 3 and (x.dim() != 3 or reference.shape[0] != x.shape[0]):
        raise ValueError(f"reference of shape (G, M, D) needs x of shape (G, n, D) with the same G; got "
                         f"reference {tuple(reference.shape)} and x {tuple(x.shape)}")
    if k > reference.shape[-2]:
        raise ValueError(f"k must be at most the number of candidates M = {reference.shape[-2]} in the "
                         f"reference, got k={k}")
    if finite:
        _check_finite("reference", reference)
    return x_groups, (reference if reference.dim() == 3 else reference.unsqueeze(0))
