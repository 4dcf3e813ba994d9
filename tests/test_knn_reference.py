"""A float64 brute-force Kozachenko-Leonenko reference for the knn_entropy tests, written independently
of pec_kernels (full pairwise distances, a full sort, self excluded by index), plus tests of the
reference itself against hand-computed values. Also the output-poisoning fixture the knn tests use.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch


class Reference(NamedTuple):
    entropy: torch.Tensor  # () or (G,)
    surprisal: torch.Tensor  # (..., n)
    distance: torch.Tensor  # (..., n, k), ascending, clamped at min_dist
    all_distances: torch.Tensor  # (..., n, m_total): every candidate's distance (self: +inf)


def kl_reference(x: torch.Tensor, k: int, *, reference: torch.Tensor | None = None, metric: str = "euclidean",
                 min_dist: float = 1e-6, normalize: str = "none") -> Reference:
    """float64 KL estimate, differentiable by autograd (away from duplicates)."""
    grouped = x.dim() == 3
    xs = (x if grouped else x[None]).double()
    if reference is None:
        cands = xs
    else:
        cands = reference.double()
        cands = cands if cands.dim() == 3 else cands[None].expand(xs.shape[0], -1, -1)
    if metric == "cosine":
        xs = xs / xs.norm(dim=-1, keepdim=True)
        cands = cands / cands.norm(dim=-1, keepdim=True)
    squared = (xs[:, :, None, :] - cands[:, None, :, :]).square().sum(-1)
    if reference is None:
        # Mask before the square root: its gradient at the zero self-distance would be NaN.
        squared = squared.masked_fill(torch.eye(xs.shape[1], dtype=torch.bool), float("inf"))
        m = xs.shape[1] - 1
    else:
        m = cands.shape[1]
    dists = squared.sqrt()
    nearest = torch.sort(dists, dim=-1, stable=True).values[..., :k].clamp_min(min_dist)
    dim = xs.shape[-1]
    log_ball = dim / 2 * math.log(math.pi) - math.lgamma(dim / 2 + 1)
    surprisal = _digamma(m + 1) - _digamma(k) + log_ball + dim * torch.log(nearest[..., -1])
    if normalize == "per_dim":
        surprisal = surprisal / dim
    entropy = surprisal.mean(-1)
    if not grouped:
        return Reference(entropy[0], surprisal[0], nearest[0], dists[0])
    return Reference(entropy, surprisal, nearest, dists)


def _digamma(v: int) -> float:
    return torch.special.digamma(torch.tensor(float(v), dtype=torch.float64)).item()


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Make torch.empty/empty_like return NaN (floating) or -1 (integer) memory for the whole test.

    The backends allocate every output with torch.empty, so an element a kernel fails to write reads
    as NaN or as an invalid index and fails the comparison, instead of passing by luck on memory that
    happened to hold the right value.
    """
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-1)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))


def _harmonic(n: int) -> float:
    return sum(1.0 / i for i in range(1, n + 1))


def test_reference_matches_hand_computed_1d_values():
    # Points on a line: 0, 1, 3, 7. Euler-Mascheroni gamma cancels in ψ(m+1) − ψ(k) = H_m − H_{k−1}.
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    k, m = 2, 3
    kth = torch.tensor([3.0, 2.0, 3.0, 6.0], dtype=torch.float64)  # second-nearest distances
    offset = _harmonic(m) - _harmonic(k - 1) + math.log(2.0)  # log V_1 = log 2
    ref = kl_reference(x, k)
    torch.testing.assert_close(ref.surprisal, offset + torch.log(kth), rtol=0, atol=1e-12)
    torch.testing.assert_close(ref.entropy, ref.surprisal.mean(), rtol=0, atol=1e-12)


def test_reference_bank_cosine_and_clamp_by_hand():
    # Bank mode in 2-D, k=1: m = M = 2, offset H_2 − H_0 + log π.
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    bank = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    offset = _harmonic(2) + math.log(math.pi)
    ref = kl_reference(x, 1, reference=bank, min_dist=0.5)
    # Row 0 coincides with bank row 0 (ρ = 0 → clamped to 0.5); row 1 is √5 from bank row 0, 3 from row 1.
    expected = offset + 2 * torch.log(torch.tensor([0.5, math.sqrt(5.0)], dtype=torch.float64))
    torch.testing.assert_close(ref.surprisal, expected, rtol=0, atol=1e-12)
    cos = kl_reference(x, 1, reference=bank, metric="cosine", normalize="per_dim")
    # After normalisation row 1 is (0, 1): √2 from both bank rows.
    expected = (offset + 2 * torch.log(torch.tensor([1e-6, math.sqrt(2.0)], dtype=torch.float64))) / 2
    torch.testing.assert_close(cos.surprisal, expected, rtol=0, atol=1e-12)
