"""Spectral clustering of many small groups at once, on the device (DiverseGRPO's clusters, `pec.methods.diverse_grpo`).

Every group of a training step (G groups of N samples, e.g. 48 x 24) is clustered in one batched pass, with no
Python loop over groups and no host read of any group's values:

1. affinity (`gaussian_affinity`): W_ij = exp(-d_ij^2 / (2 sigma^2)) of the pairwise Euclidean distances
   d_ij, with sigma = `sigma_scale` x the median of the group's distances between distinct valid samples
   (the median heuristic: the affinity is then free of the feature space's scale);
2. the normalised Laplacian L = I - D^-1/2 W D^-1/2 of every group (W_ii = 0, Ng, Jordan & Weiss 2001),
   decomposed by one batched `torch.linalg.eigh` of (G, N, N) in float64;
3. the number of clusters k: fixed, or each group's largest eigengap lambda_{k+1} - lambda_k over
   k = 1 .. max_clusters (von Luxburg 2007, section 8.3);
4. the rows of the k bottom eigenvectors, normalised to unit length (NJW), clustered by k-means with a
   fixed number of Lloyd iterations from a deterministic farthest-point start (the group's first valid
   sample, then each time the sample farthest from the centres chosen so far; ties go to the lower index).

Masked samples (`valid` False) take no part: their affinities are 0 and their diagonal entry of L is 3, above
every eigenvalue of a normalised Laplacian (<= 2), so the bottom eigenvectors are those of the valid samples'
graph; they are left out of the eigengap, the centres and the counts, and get label -1 and cluster size 0.

Host synchronisation: `torch.linalg.eigh` on a CUDA device checks its convergence on the host, one
synchronisation for the whole batch (torch offers no unchecked variant); it runs inside `documented_sync`.
Nothing else reads a device value.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from pec.syncs import documented_sync
from pec_kernels import check_tensor

# L's diagonal entry for a masked sample: above the spectrum [0, 2] of any normalised Laplacian.
_MASKED_EIGENVALUE = 3.0


class SpectralClusters(NamedTuple):
    """Per-group spectral clustering (`spectral_clusters`).

    labels: (G, N) int64 cluster of each sample in 0 .. k - 1, -1 for masked samples;
    sizes: (G, N) float64 size n_c(i) of each sample's cluster (valid samples counted), 0 for masked ones;
    num_clusters: (G,) int64 non-empty clusters of each group (0 for a group without valid samples);
    eigenvalues: (G, N) float64 ascending eigenvalues of the groups' normalised Laplacians.
    """

    labels: torch.Tensor
    sizes: torch.Tensor
    num_clusters: torch.Tensor
    eigenvalues: torch.Tensor


def _check_valid(valid: torch.Tensor | None, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """The (G, N) bool mask (all True when None), checked against `shape`."""
    if valid is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    check_tensor("valid", valid, ndims=(2,), dtypes=(torch.bool,))
    if tuple(valid.shape) != shape:
        raise ValueError(f"valid must have shape (G, N) = {shape}, got {tuple(valid.shape)}")
    return valid


def valid_pairs(valid: torch.Tensor) -> torch.Tensor:
    """(G, N, N) bool: the pairs (i, j) of distinct samples that are both valid, from a (G, N) mask."""
    n = valid.shape[1]
    return valid[:, :, None] & valid[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=valid.device)


def gaussian_affinity(features: torch.Tensor, valid: torch.Tensor | None = None, *, sigma_scale: float = 0.5
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The affinity W_ij = exp(-d_ij^2 / (2 sigma^2)) of each group's samples, in float64.

    Args:
        features: (G, N, D) features of G groups of N samples (masked rows may hold NaN).
        valid: optional (G, N) bool mask; masked samples get affinity 0 with everyone.
        sigma_scale: sigma = sigma_scale x the median distance between distinct valid samples of the group
            (the lower median, `torch.nanmedian`). A group whose samples all coincide has median 0: sigma is
            then floored at 1e-12, so identical samples have affinity 1.

    Returns:
        (W (G, N, N) float64 with a zero diagonal, sigma (G,) float64; 1 for a group with < 2 valid samples).
    """
    check_tensor("features", features, ndims=(3,))
    if isinstance(sigma_scale, bool) or not isinstance(sigma_scale, (int, float)) or not sigma_scale > 0:
        raise ValueError(f"sigma_scale must be a number > 0, got {sigma_scale!r}")
    valid = _check_valid(valid, tuple(features.shape[:2]), features.device)
    zero = torch.zeros((), dtype=torch.float64, device=features.device)
    x = torch.where(valid[..., None], features.double(), zero)
    pairs = valid_pairs(valid)
    d = torch.cdist(x, x)
    upper = pairs & torch.ones_like(pairs[0]).triu(diagonal=1)
    median = torch.nanmedian(torch.where(upper, d, zero + torch.nan).flatten(1), dim=1).values
    sigma = torch.where(median.isnan(), zero + 1.0, sigma_scale * median).clamp_min(1e-12)
    w = torch.exp(-d.square() / (2 * sigma.square()[:, None, None]))
    return torch.where(pairs, w, zero), sigma


def spectral_clusters(affinity: torch.Tensor, valid: torch.Tensor | None = None, *, clusters: int = 0,
                      max_clusters: int = 4, iterations: int = 10) -> SpectralClusters:
    """Spectral clustering of every group of `affinity` at once (see the module docstring).

    Args:
        affinity: (G, N, N) symmetric non-negative affinities (the diagonal is ignored).
        valid: optional (G, N) bool mask of the samples to cluster.
        clusters: k for every group (clamped to the group's valid samples); 0 = each group's largest
            eigengap among k = 1 .. min(max_clusters, N - 1).
        max_clusters: the largest k the eigengap may choose (with `clusters` 0).
        iterations: Lloyd iterations of k-means (a fixed number: no convergence test, so no host read).

    Returns:
        `SpectralClusters`.
    """
    check_tensor("affinity", affinity, ndims=(3,))
    g, n = affinity.shape[:2]
    if affinity.shape[2] != n:
        raise ValueError(f"affinity must be (G, N, N), got shape {tuple(affinity.shape)}")
    for name, value, low in (("clusters", clusters, 0), ("max_clusters", max_clusters, 1), ("iterations", iterations, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    device = affinity.device
    valid = _check_valid(valid, (g, n), device)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    w = torch.where(valid_pairs(valid), affinity.double(), zero)
    degree = w.sum(dim=2)
    inv_sqrt = torch.where(degree > 0, degree.clamp_min(1e-300).rsqrt(), zero)
    # I - D^-1/2 W D^-1/2; an isolated valid sample (degree 0) is a component of its own (diagonal 0), a masked
    # one sits above the spectrum.
    diagonal = torch.where(valid, (degree > 0).double(), zero + _MASKED_EIGENVALUE)
    laplacian = torch.diag_embed(diagonal) - inv_sqrt[:, :, None] * w * inv_sqrt[:, None, :]
    with documented_sync():  # one host check of the whole batch's convergence on a GPU (torch's eigh)
        eigenvalues, eigenvectors = torch.linalg.eigh(laplacian)

    n_valid = valid.sum(dim=1)
    top = max(1, min(clusters or max_clusters, n - 1 if not clusters else n))
    ks = torch.arange(1, top + 1, device=device)
    if clusters:
        k = torch.full((g,), clusters, dtype=torch.long, device=device)
    else:
        gaps = eigenvalues[:, 1:top + 1] - eigenvalues[:, :top]  # gap after the k-th eigenvalue, k = 1 .. top
        gaps = torch.where(ks[None, :] < n_valid[:, None], gaps, zero - 1.0)  # only gaps among valid eigenvalues
        k = gaps.argmax(dim=1) + 1
    k = torch.minimum(k, n_valid.clamp_min(1))
    active = ks[None, :] <= k[:, None]  # (G, top): the group's first k eigenvectors / centres
    rows = torch.where(active[:, None, :], eigenvectors[:, :, :top], zero)
    rows = rows / rows.norm(dim=2, keepdim=True).clamp_min(1e-12)
    rows = torch.where(valid[..., None], rows, zero)
    labels, counts = _kmeans(rows, valid, active, iterations)
    sizes = torch.where(valid, counts.gather(1, labels.clamp_min(0)), zero)
    return SpectralClusters(labels, sizes, (counts > 0).sum(dim=1), eigenvalues)


def _kmeans(rows: torch.Tensor, valid: torch.Tensor, active: torch.Tensor, iterations: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched k-means of `rows` (G, N, K) with the (G, K) `active` centres of each group, from the
    farthest-point start, `iterations` Lloyd steps; returns (labels (G, N), -1 where masked; counts (G, K))."""
    g, n, top = rows.shape
    far = torch.finfo(rows.dtype).max
    batch = torch.arange(g, device=rows.device)
    centre_ids = torch.arange(top, device=rows.device)
    first = valid.double().argmax(dim=1)  # the first valid sample (0 for an empty group)
    centres = [rows[batch, first]]
    nearest = (rows - centres[0][:, None, :]).square().sum(dim=2)
    for _ in range(1, top):  # K - 1 picks, a fixed count: no loop over groups
        nearest = torch.where(valid, nearest, -1.0)
        pick = rows[batch, nearest.argmax(dim=1)]
        centres.append(pick)
        nearest = torch.minimum(nearest, (rows - pick[:, None, :]).square().sum(dim=2))
    centre = torch.stack(centres, dim=1)  # (G, K, K)
    for step in range(iterations + 1):
        distance = torch.cdist(rows, centre).masked_fill(~active[:, None, :], far)
        labels = distance.argmin(dim=2)
        member = ((labels[..., None] == centre_ids) & valid[..., None]).double()  # one_hot would read its range
        counts = member.sum(dim=1)
        if step == iterations:
            break
        sums = member.transpose(1, 2) @ rows
        centre = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], centre)
    return torch.where(valid, labels, -1), counts
