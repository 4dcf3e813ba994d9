"""The Gaussian perceptual-entropy estimator (DESIGN.md §2.2, second estimator).

Fits a diagonal Gaussian to each group of features and scores each sample by its negative
log-density under that fit: surprisal_i = ½ Σ_d [(f_id − m_d)² / s_d² + log 2π s_d²]. Its mean over
the group is the Gaussian entropy ½ Σ_d (1 + log 2π s_d²), "proportional to the variance of the group
features" as the paper's project page puts it. It is cheap, smooth and differentiable by autograd, so
it needs no kernel; it shares `knn_entropy`'s input checks and output layout.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from pec_kernels._checks import check_choice, check_mask, check_tensor
from pec_kernels._checks import check_finite as _check_finite


class GaussianEntropy(NamedTuple):
    """entropy: () or (G,); surprisal: (n,) or (G, n). float32 (float64 for float64 input)."""

    entropy: torch.Tensor
    surprisal: torch.Tensor


def gaussian_entropy(x: torch.Tensor, *, valid: torch.Tensor | None = None, min_var: float = 1e-6,
                     normalize: str = "none", check_finite: bool = True) -> GaussianEntropy:
    """Per-group diagonal-Gaussian entropy and per-sample surprisal of features x (n, D) or (G, n, D).

    The variance is the biased (1/n) estimate, clamped below at `min_var` so that a collapsed
    group gives a finite (very low) entropy instead of -inf. normalize="per_dim" divides by D.
    valid: optional bool mask of x's rows ((n,) or (G, n), on x's device). Each group is then fitted on
    its valid rows alone (their count taken on the device: no host synchronisation) and its entropy is
    the mean over them; masked rows, which may hold NaN/Inf (zeroed first), get surprisal 0 and
    gradient 0, and a group with fewer than 2 valid rows gets entropy 0 and surprisal 0.
    check_finite: raise a ValueError when x holds NaN or Inf in an unmasked row (one host
    synchronisation); False skips it (as in knn_entropy).
    """
    check_tensor("x", x, ndims=(2, 3))
    if not isinstance(check_finite, bool):
        raise ValueError(f"check_finite must be a bool, got {type(check_finite).__name__}")
    if valid is not None:
        check_mask("valid", valid, x, "x")
        x = torch.where(valid[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    if check_finite:
        _check_finite("x", x)
    check_choice("normalize", normalize, ("none", "per_dim"))
    if not min_var > 0:
        raise ValueError(f"min_var must be > 0, got {min_var}")
    if x.shape[-2] < 2:
        raise ValueError(f"x must hold at least 2 samples per group to fit a variance, got shape {tuple(x.shape)}")
    f = x.double() if x.dtype == torch.float64 else x.float()
    if valid is None:
        mean = f.mean(dim=-2, keepdim=True)
        var = (f - mean).square().mean(dim=-2, keepdim=True).clamp_min(min_var)
        surprisal = _surprisal(f - mean, var, normalize)
        return GaussianEntropy(surprisal.mean(dim=-1), surprisal)
    # Means as sums over the valid rows / their count: with every row valid, bit for bit the
    # unmasked path on CPU (whose mean is such a sum and division).
    zero = torch.zeros((), dtype=f.dtype, device=f.device)
    count = valid.sum(dim=-1)
    per_group = count.clamp_min(1)[..., None, None]
    mean = f.sum(dim=-2, keepdim=True) / per_group
    centred = torch.where(valid[..., None], f - mean, zero)
    var = (centred.square().sum(dim=-2, keepdim=True) / per_group).clamp_min(min_var)
    scored = valid & (count >= 2)[..., None]
    surprisal = torch.where(scored, _surprisal(centred, var, normalize), zero)
    return GaussianEntropy(surprisal.sum(dim=-1) / scored.sum(dim=-1).clamp_min(1), surprisal)


def _surprisal(centred: torch.Tensor, var: torch.Tensor, normalize: str) -> torch.Tensor:
    """½ Σ_d [c_d² / s_d² + log 2π s_d²] per row of the centred features (÷ D with "per_dim")."""
    surprisal = 0.5 * (centred.square() / var + torch.log(2 * math.pi * var)).sum(dim=-1)
    return surprisal / centred.shape[-1] if normalize == "per_dim" else surprisal
