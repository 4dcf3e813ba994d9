"""Perceptual entropy of groups of features, one interface over the two estimators of DESIGN.md 2.2.

- "knn": Kozachenko-Leonenko, `pec_kernels.knn_entropy`;
- "gaussian": a per-group diagonal Gaussian fit, `pec_kernels.gaussian_entropy` (what the paper's
  project page describes: "proportional to the variance of the group features").
Both give per-group entropies and per-sample surprisals (-log p_hat), differentiable in the features.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from pec_kernels import gaussian_entropy, knn_entropy
from pec_kernels._checks import check_choice, check_tensor

ESTIMATORS = ("knn", "gaussian")


class GroupEntropy(NamedTuple):
    """entropy: (G,) per-group entropy; surprisal: (G, n) per-sample -log p_hat."""

    entropy: torch.Tensor
    surprisal: torch.Tensor


def group_entropy(features: torch.Tensor, *, estimator: str = "knn", k: int = 3,
                  per_dim: bool = True) -> GroupEntropy:
    """Perceptual entropy of each group of `features` (G, n, D) with the chosen estimator.

    Args:
        features: (G, n, D) perceptual features, one row per sample, grouped by prompt.
        estimator: "knn" (pec_kernels.knn_entropy, self mode within each group) or "gaussian".
        k: neighbour rank of the kNN estimator (k < n).
        per_dim: divide entropies and surprisals by D.
    """
    check_choice("estimator", estimator, ESTIMATORS)
    check_tensor("features", features, ndims=(3,))
    normalize = "per_dim" if per_dim else "none"
    if estimator == "gaussian":
        out = gaussian_entropy(features.float(), normalize=normalize)
    else:
        if not 1 <= k < features.shape[1]:
            raise ValueError(f"k must be in [1, n - 1] for groups of n = {features.shape[1]} samples, got {k}")
        out = knn_entropy(features.float(), k=k, normalize=normalize)
    return GroupEntropy(out.entropy, out.surprisal)
