"""Perceptual entropy of groups of features, one interface over the two estimators of DESIGN.md 2.2.

- "knn": Kozachenko-Leonenko, `pec_kernels.knn_entropy`;
- "gaussian": a per-group diagonal Gaussian fit, `pec_kernels.gaussian_entropy` (what the paper's
  project page describes: "proportional to the variance of the group features").
Both give per-group entropies and per-sample surprisals (-log p_hat), differentiable in the features.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from pec.config import ESTIMATORS
from pec_kernels import gaussian_entropy, knn_entropy
from pec_kernels import check_choice, check_tensor


class GroupEntropy(NamedTuple):
    """entropy: (G,) per-group entropy; surprisal: (G, n) per-sample -log p_hat."""

    entropy: torch.Tensor
    surprisal: torch.Tensor


def group_entropy(features: torch.Tensor, *, estimator: str = "knn", k: int = 3, per_dim: bool = True,
                  valid: torch.Tensor | None = None, check_finite: bool = True) -> GroupEntropy:
    """Perceptual entropy of each group of `features` (G, n, D) with the chosen estimator.

    Args:
        features: (G, n, D) perceptual features, one row per sample, grouped by prompt.
        estimator: "knn" (pec_kernels.knn_entropy, self mode within each group) or "gaussian".
        k: neighbour rank of the kNN estimator (k < n).
        per_dim: divide entropies and surprisals by D.
        valid: optional (G, n) bool mask of the samples to use (`pec.run_safety`). Each group's entropy
            is then estimated from its valid samples alone (their features may be NaN elsewhere); a
            group with too few valid samples (k + 1 for kNN, 2 for the Gaussian fit) and every invalid
            sample get 0. The estimators take the mask on the device: no host synchronisation, and an
            all-valid mask gives the unmasked result.
        check_finite: check the (used) features for NaN/Inf, at one host sync; the trainer, which has
            already masked every non-finite sample, passes False.
    """
    check_choice("estimator", estimator, ESTIMATORS)
    check_tensor("features", features, ndims=(3,))
    if valid is not None:
        check_tensor("valid", valid, ndims=(2,), dtypes=(torch.bool,))
        if valid.shape != features.shape[:2]:
            raise ValueError(f"valid must have shape (G, n) = {tuple(features.shape[:2])}, got {tuple(valid.shape)}")
    normalize = "per_dim" if per_dim else "none"
    if estimator == "gaussian":
        out = gaussian_entropy(features.float(), valid=valid, normalize=normalize, check_finite=check_finite)
    else:
        if not 1 <= k < features.shape[1]:
            raise ValueError(f"k must be in [1, n - 1] for groups of n = {features.shape[1]} samples, got {k}")
        out = knn_entropy(features.float(), k=k, valid=valid, normalize=normalize, check_finite=check_finite)
    return GroupEntropy(out.entropy, out.surprisal)
