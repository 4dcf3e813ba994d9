"""knn_entropy: the public Kozachenko-Leonenko kNN entropy op (DESIGN.md §2.2, §3)."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from pec_kernels._checks import check_choice, check_mask, check_same_device, check_tensor
from pec_kernels._checks import check_finite as _check_finite
from pec_kernels._fallback import Chain
from pec_kernels._fallback import run as run_with_fallback
from pec_kernels.knn.autograd import NeighbourDistances
from pec_kernels.knn.backends import BACKENDS, candidates, module_of
from pec_kernels.knn.estimator import RowScale, inverse_norms, surprisal_from_distance

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
                valid: torch.Tensor | None = None, reference_valid: torch.Tensor | None = None,
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
        valid: optional bool mask of x's rows, shaped like x without its last dimension ((n,) or
            (G, n)), on x's device. Masked rows are left out as if absent, with no host
            synchronisation and fixed shapes: they are never neighbours, each group's estimator uses
            its own candidate count m_g (valid rows − 1 in self mode), the entropy is the mean over the
            group's valid rows, and a masked row gets surprisal 0, distance 0, index −1 and gradient 0.
            A group with fewer than k + 1 valid rows (self mode; with a bank: fewer than k valid
            candidates) gets entropy 0 and surprisal 0 in every row. Masked rows may hold NaN/Inf:
            they are zeroed before use (a masked copy of x) and never reach an output or gradient.
        reference_valid: optional bool mask of the bank's rows, shaped like reference without its last
            dimension; masked bank rows are never neighbours and not counted in m_g.
        metric: "euclidean", or "cosine" (rows L2-normalised first, differentiably; the Triton and
            CUDA kernels scale the rows as they load them: no normalised copy).
        min_dist: floor of ρ (> 0): duplicates give a finite surprisal and no gradient.
        normalize: "none", or "per_dim" to divide surprisal and entropy by D.
        backend: "auto" (CUDA kernels, then Triton on GPU; torch elsewhere), "cuda", "triton", "torch".
            Under "auto" a faster backend that fails to compile or launch is replaced by the next one,
            with one RuntimeWarning (pec_kernels._fallback).
        check_finite: raise a ValueError when x or reference holds NaN or Inf in a row that is not
            masked (one host synchronisation per call). Pass False where the caller checks once per
            step itself (the trainer); a group holding non-finite values then gets meaningless (often
            non-finite) results, the other groups are unaffected, and nothing raises. Under
            torch.compile the check is a device-side assert (no graph break).

    Returns:
        KnnEntropy(entropy, surprisal, index, distance); see its docstring for shapes.

    Raises:
        ValueError naming the argument for bad input; RuntimeError when an explicitly requested
        backend is not installed or built.
    """
    x_groups, ref_groups, masks = _validated(x, k, reference, valid, reference_valid, metric, min_dist,
                                             normalize, backend, check_finite)
    num_candidates = x_groups.shape[1] - 1 if ref_groups is None else ref_groups.shape[1]
    x_groups = x_groups.contiguous()
    ref_groups = None if ref_groups is None else ref_groups.contiguous()
    candidate_valid = None if masks is None else masks.candidates
    # Cosine: every backend takes the raw rows and these inverse norms (the Triton and CUDA kernels
    # scale rows as they load them); the autograd Function adds the normalisation's Jacobian.
    scale = None if metric == "euclidean" else RowScale(
        inverse_norms(x_groups), None if ref_groups is None else inverse_norms(ref_groups))

    def neighbours(chain: Chain) -> tuple[torch.Tensor, torch.Tensor]:
        module = module_of(chain[0])
        with torch.no_grad():
            x_rank, ref_rank = x_groups.detach(), None if ref_groups is None else ref_groups.detach()
            if module.EXACT_SELECT:
                index, exact = module.select_with_distances(x_rank, ref_rank, k, valid=candidate_valid,
                                                            scale=scale)
            else:
                index, exact = module.select(x_rank, ref_rank, k, _shift(x_rank, ref_rank, scale),
                                             valid=candidate_valid, scale=scale), None
        return NeighbourDistances.apply(x_groups, ref_groups, index, float(min_dist), tuple(chain), exact, scale)

    distance, index = run_with_fallback("knn_entropy", candidates(backend, x_groups, ref_groups, k), neighbours)

    surprisal = surprisal_from_distance(distance[..., -1], num_candidates, k, x.shape[-1],
                                        per_dim=normalize == "per_dim",
                                        candidate_counts=None if masks is None else masks.counts)
    if masks is None:
        entropy = surprisal.mean(-1)
    else:
        scored = masks.scored
        surprisal = torch.where(scored, surprisal, torch.zeros((), dtype=surprisal.dtype, device=x.device))
        entropy = surprisal.sum(-1) / scored.sum(-1).clamp_min(1)
        distance = torch.where(scored[..., None], distance, torch.zeros((), dtype=distance.dtype, device=x.device))
        index = torch.where(scored[..., None], index, torch.full((), -1, dtype=index.dtype, device=x.device))
    if x.dim() == 2:
        return KnnEntropy(entropy[0], surprisal[0], index[0], distance[0])
    return KnnEntropy(entropy, surprisal, index, distance)


class _Masks(NamedTuple):
    """What knn_entropy derives from `valid` / `reference_valid` (all on the device, no host read).

    candidates: (G|1, m) bool, the rows that may be neighbours (None: all of them).
    counts: (G,) int64, each group's number of candidates m_g. scored: (G, n) bool, the rows that get
    a surprisal (valid, in a group with at least k candidates).
    """

    candidates: torch.Tensor | None
    counts: torch.Tensor
    scored: torch.Tensor


def _masks(ref_groups: torch.Tensor | None, valid: torch.Tensor, ref_valid: torch.Tensor | None, k: int) -> _Masks:
    """_Masks of grouped inputs: valid (G, n); ref_valid (G|1, M) or None (every bank row counts)."""
    if ref_groups is None:
        counts = valid.sum(-1) - 1  # the other valid rows of the group
        candidates = valid
    elif ref_valid is None:
        counts = torch.full(valid.shape[:1], ref_groups.shape[1], dtype=torch.int64, device=valid.device)
        candidates = None
    else:
        counts = ref_valid.sum(-1).expand(valid.shape[0])
        candidates = ref_valid
    return _Masks(candidates, counts, valid & (counts >= k)[:, None])


def _shift(x: torch.Tensor, reference: torch.Tensor | None, scale: RowScale | None) -> torch.Tensor | None:
    """The candidates' mean per group, (G|1, 1, D), that the backends subtract before ranking (inside
    their kernels: no centred copy of x): distances do not change, but the expanded form
    ‖x‖² + ‖c‖² − 2x·c (and TF32's 10-bit inputs) lose far less precision on features far from the
    origin. With the cosine metric, the mean of the normalised rows (one bmm: no normalised copy).
    None for 16-bit inputs: their products are exact in float32, while rounding the shifted
    values back to 16 bits would perturb the ranking more than it gains."""
    if x.dtype not in (torch.float32, torch.float64):
        return None
    cand = x if reference is None else reference
    if scale is None:
        return cand.mean(dim=1, keepdim=True)
    weights = scale.x if reference is None else scale.reference
    return torch.bmm(weights[:, None, :].to(cand.dtype), cand) / cand.shape[1]


def _validated(x: object, k: object, reference: object, valid: object, reference_valid: object, metric: object,
               min_dist: object, normalize: object, backend: object, finite: object
               ) -> tuple[torch.Tensor, torch.Tensor | None, _Masks | None]:
    """Check every argument; return x as (G, n, D), reference as (G, M, D), (1, M, D) or None (both with
    their masked rows zeroed), and the masks (None without `valid` and `reference_valid`)."""
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
    if valid is not None:
        check_mask("valid", valid, x, "x")
    if reference_valid is not None:
        if reference is None:
            raise ValueError("reference_valid needs a reference (in self mode, valid masks the candidates)")
        check_mask("reference_valid", reference_valid, reference, "reference")
    x = _zero_masked(x, valid)
    x_groups = x if x.dim() == 3 else x.unsqueeze(0)
    if finite:
        _check_finite("x", x)

    if reference is None:
        num_candidates = x_groups.shape[1] - 1
        if k > num_candidates:
            raise ValueError(f"k must be at most the number of candidates n - 1 = {num_candidates} in self "
                             f"mode (x has shape {tuple(x.shape)}), got k={k}")
        ref_groups = None
    else:
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
        reference = _zero_masked(reference, reference_valid)
        if finite:
            _check_finite("reference", reference)
        ref_groups = reference if reference.dim() == 3 else reference.unsqueeze(0)
    if valid is None and reference_valid is None:
        return x_groups, ref_groups, None
    valid_groups = torch.ones(x_groups.shape[:2], dtype=torch.bool, device=x.device) if valid is None else (
        valid if valid.dim() == 2 else valid.unsqueeze(0))
    ref_valid_groups = None if reference_valid is None else (
        reference_valid if reference_valid.dim() == 2 else reference_valid.unsqueeze(0))
    return x_groups, ref_groups, _masks(ref_groups, valid_groups, ref_valid_groups, k)


def _zero_masked(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """t with its masked rows set to 0 (a copy; t itself without a mask), so that their NaN/Inf reach
    neither the kernels nor the gradient (torch.where's backward gives the masked rows 0)."""
    if mask is None:
        return t
    return torch.where(mask[..., None], t, torch.zeros((), dtype=t.dtype, device=t.device))
