"""The Kozachenko-Leonenko math shared by every kNN backend (DESIGN.md §2.2).

surprisal_i = ψ(m+1) − ψ(k) + log V_D + D·log ρ_i, with ρ_i the distance to the k-th nearest of m
candidates, clamped below at `min_dist`. The constants are computed once in Python float64, in log
space (V_D underflows float64 for D ≳ 400); the backends only find neighbours and distances.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

#: F.normalize's eps: the cosine metric divides rows shorter than this by it instead of their norm.
NORM_EPS = 1e-12


class RowScale(NamedTuple):
    """The cosine metric's row multipliers 1 / max(‖row‖, NORM_EPS), which the backends apply to the rows
    as they read them (pec_kernels.knn.backends): x (G, n) and reference (G|1, M) or None (self mode),
    float32 (float64 for float64 inputs)."""

    x: torch.Tensor
    reference: torch.Tensor | None


def inverse_norms(t: torch.Tensor) -> torch.Tensor:
    """(G, rows) 1 / max(‖t_r‖, NORM_EPS) of t (G, rows, D), detached, reduced in float32 (float64 for
    float64 inputs). One reduction, no copy of the rows: on CUDA a 16-bit input is upcast as it is read."""
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(t.detach(), dim=-1, dtype=dtype).clamp_min(NORM_EPS).reciprocal()

def digamma(x: float) -> float:
    """ψ(x) for x > 0 in float64: recurrence up to x ≥ 10, then the asymptotic series (error < 1e-13)."""
    if x <= 0:
        raise ValueError(f"digamma needs x > 0, got {x}")
    shift = 0.0
    while x < 10.0:
        shift -= 1.0 / x
        x += 1.0
    inv2 = 1.0 / (x * x)
    series = inv2 * (1 / 12 - inv2 * (1 / 120 - inv2 * (1 / 252 - inv2 * (1 / 240 - inv2 / 132))))
    return shift + math.log(x) - 0.5 / x - series


def log_unit_ball_volume(dim: int) -> float:
    """log V_D, the log-volume of the unit-radius Euclidean ball in `dim` dimensions."""
    return 0.5 * dim * math.log(math.pi) - math.lgamma(0.5 * dim + 1.0)


def surprisal_offset(num_candidates: int, k: int, dim: int) -> float:
    """ψ(m+1) − ψ(k) + log V_D: the part of the surprisal that does not depend on ρ."""
    return digamma(num_candidates + 1.0) - digamma(float(k)) + log_unit_ball_volume(dim)


def surprisal_from_distance(kth_distance: torch.Tensor, num_candidates: int, k: int, dim: int,
                            per_dim: bool, candidate_counts: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample surprisal from the (already clamped) k-th-neighbour distance ρ (G, n).

    With `per_dim` both terms are divided by D, so the result is offset/D + log ρ. candidate_counts:
    (G,) int64, each group's own number m_g of candidates (masked samples left out) in place of
    `num_candidates`, its upper bound; counted on the device, so no host read. Its offset is the
    Python float64 one plus ψ(m_g + 1) − ψ(m + 1) on the device, which is exactly 0 where m_g = m: an
    all-valid mask gives bit for bit the unmasked surprisal. Counts below k (groups whose rows the
    caller discards) are raised to k, so that every value stays finite.
    """
    scale = 1.0 / dim if per_dim else 1.0
    offset = surprisal_offset(num_candidates, k, dim)
    if candidate_counts is None:
        return offset * scale + (dim * scale) * torch.log(kth_distance)
    full = torch.full((), num_candidates + 1.0, dtype=torch.float64, device=kth_distance.device)  # no copy
    own = candidate_counts.clamp_min(k).to(torch.float64) + 1.0
    group_offset = ((offset + (torch.digamma(own) - torch.digamma(full))) * scale).to(kth_distance.dtype)
    return group_offset[:, None] + (dim * scale) * torch.log(kth_distance)


def sort_pairs(distance: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row's k (distance, index) pairs by distance, equal distances by smaller index.

    Backends may rank in low precision; this re-sort of the exact distances makes the output order exact.
    """
    by_index = torch.argsort(index, dim=-1)
    distance, index = distance.gather(-1, by_index), index.gather(-1, by_index)
    by_distance = torch.argsort(distance, dim=-1, stable=True)
    return distance.gather(-1, by_distance), index.gather(-1, by_distance)


def pair_coefficients(grad_distance: torch.Tensor, distance: torch.Tensor, min_dist: float) -> torch.Tensor:
    """coef_ij = g_ij / d_ij, the weight of (x_i − c_j) in the gradient of d_ij = ‖x_i − c_j‖.

    Pairs closer than `min_dist` were clamped in the forward pass and carry no gradient (this also keeps
    duplicates, d = 0, away from 0/0).
    """
    unclamped = distance >= min_dist
    safe = torch.where(unclamped, distance, torch.ones_like(distance))
    return torch.where(unclamped, grad_distance.to(distance.dtype) / safe, torch.zeros_like(distance))
