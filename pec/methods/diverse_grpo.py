"""DiverseGRPO (arXiv 2512.21514; DESIGN.md 2.8) as a regulariser (`--method diverse_grpo`, options
`--diverse_grpo.*`), in any perceptual space (`--perceptual.space`). Its code is not public: this is a
reconstruction from the paper's description, and every choice the paper leaves open is an option.

- The cluster-size bonus: each group's samples are clustered spectrally in the perceptual space
  (`pec.methods.spectral`: affinity exp(-d_ij^2 / (2 sigma^2)), normalised Laplacian, k-means on its bottom
  eigenvectors, every group of the step in one batched pass on the device), and each sample gets
  E_i = sqrt(N / n_c(i)), N its group's valid samples and n_c(i) the size of its cluster: 1 in a group that is
  one cluster, sqrt(N) for a sample alone in its cluster. The shaped reward R_i = Q_i + beta E_i
  (`--diverse_grpo.beta`, the paper's 3) then gets the usual group normalisation (`pec.grpo.group_advantages`).
  Masked samples take no part in the clustering and get no bonus.
- The early-step regulariser: the KL ||mu_theta - mu_ref||^2 / (2 s^2) of each trained step among the first
  `--diverse_grpo.reg_steps` denoising steps to the reference policy (the base model: adapters off, or the
  frozen copy), weighted `--diverse_grpo.reg_coef` per piece like --train.kl_beta, in --train.kl_units. The
  paper writes ||mu_theta - mu_ref||^2; the per-step 1/(2 s^2) is the Gaussian KL the kernels fuse, a constant
  factor per step that `reg_coef` absorbs. Under a sliding or random SDE window (mixgrpo, flow_grpo_fast) only
  the window's steps below reg_steps are regularised.

Our choices, where the paper is silent (all options, to sweep):
| choice                     | default                              | option                                |
|----------------------------|--------------------------------------|---------------------------------------|
| clusters per group         | the largest eigengap among 1 .. 4    | --diverse_grpo.clusters, max_clusters |
| sigma                      | 0.5 x the group's median distance    | --diverse_grpo.sigma_scale            |
| feature geometry           | L2-normalised (cosine)               | --diverse_grpo.normalize              |
| k-means                    | 10 Lloyd iterations, farthest-point  | --diverse_grpo.kmeans_iters           |
| regularised steps, weight  | the first 3, 0.04 (KL units)         | --diverse_grpo.reg_steps, reg_coef    |
The eigengap keeps a collapsed group (no cluster structure) at one cluster, where every sample's bonus is 1 and
normalisation removes it; a fixed k would split any group into k clusters and reward its outliers anyway.
sigma_scale 0.5: on synthetic groups of 24 samples (our checks: unit-norm centres in 32 dimensions, noise up to
0.3 of their distance) it recovers 2-4 clusters and splits no single Gaussian blob of 4 or more dimensions,
where 1.0 merges separated clusters into one and 0.25 splits single blobs.
What to sweep, from a 20-step check on the embedded world (groups of 8, simclr): with these defaults the
eigengap finds 1 to 1.5 clusters per group on average, so the bonus acts on a few groups only and the early-step
KL does most of the work; a fixed k of 2-3 makes the bonus act on every group, and at beta 3 it then outweighs
the digit reward's spread (the gold reward stayed at or fell below the pretrained model's). Sweep beta with k.

Composition: the bonus needs nothing from the algorithm (DiffusionNFT included: it enters the reward before A);
the regulariser needs each trained SDE step's KL to the reference ("reference_kl"), which DiffusionNFT has not:
`--algorithm nft` is refused unless `--diverse_grpo.reg_coef 0` (NFT's own --nft.ref_coef pulls every step to
the base model; it is not restricted to the early steps).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from pec.config import Config
from pec.methods.base import LossTerms, Method, ShapingInputs, StepContext, TermsInputs
from pec.methods.reference_kl import ReferenceKLTerms
from pec.methods.registry import METHODS
from pec.methods.spectral import SpectralClusters, gaussian_affinity, spectral_clusters
from pec_kernels import check_tensor


class ClusterBonus(NamedTuple):
    """`cluster_bonus`: the bonus E (G, N) float64 (0 where masked), the clustering and sigma (G,)."""

    bonus: torch.Tensor
    clusters: SpectralClusters
    sigma: torch.Tensor


def cluster_bonus(features: torch.Tensor, valid: torch.Tensor | None = None, *, clusters: int = 0,
                  max_clusters: int = 4, sigma_scale: float = 0.5, normalize: bool = True, iterations: int = 10
                  ) -> ClusterBonus:
    """DiverseGRPO's bonus E_i = sqrt(N / n_c(i)) of every group at once (module docstring).

    Args:
        features: (G, N, D) features of G groups (masked rows may hold NaN).
        valid: optional (G, N) bool mask; N counts the valid samples of the group.
        clusters, max_clusters, iterations: as `pec.methods.spectral.spectral_clusters`.
        sigma_scale: as `pec.methods.spectral.gaussian_affinity`.
        normalize: L2-normalise the features first.
    """
    check_tensor("features", features, ndims=(3,))
    if valid is None:
        valid = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
    zero = torch.zeros((), dtype=torch.float64, device=features.device)
    x = torch.where(valid[..., None], features.double(), zero)
    if normalize:
        x = torch.nn.functional.normalize(x, dim=2)
    affinity, sigma = gaussian_affinity(x, valid, sigma_scale=sigma_scale)
    found = spectral_clusters(affinity, valid, clusters=clusters, max_clusters=max_clusters, iterations=iterations)
    n = valid.sum(dim=1, keepdim=True).double()
    bonus = torch.where(valid, (n / found.sizes.clamp_min(1)).sqrt(), zero)
    return ClusterBonus(bonus, found, sigma)


@METHODS.register("diverse_grpo")
class DiverseGRPO(Method):
    """DiverseGRPO's cluster-size bonus and early-step regulariser (module docstring)."""

    name = "diverse_grpo"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self._metrics: dict[str, torch.Tensor] = {}

    def requirements(self) -> dict[str, str]:
        if self.cfg.diverse_grpo.reg_coef > 0:
            return {"reference_kl": "its early-step regulariser (--diverse_grpo.reg_coef > 0) is the KL of the first "
                                    "denoising steps' SDE policy to the reference (set --diverse_grpo.reg_coef 0 for "
                                    "its cluster bonus alone)"}
        return {}

    def needs_reference(self) -> bool:
        return self.cfg.diverse_grpo.reg_coef > 0

    def shape(self, inputs: ShapingInputs, ctx: StepContext) -> torch.Tensor:
        o, n = self.cfg.diverse_grpo, self.cfg.sampling.group_size
        # Every rank clusters every group (a group may be spread over ranks); the batch is small.
        features = ctx.gather(inputs.features.float())
        valid = ctx.gather(inputs.valid).reshape(-1, n)
        out = cluster_bonus(features.reshape(-1, n, features.shape[1]), valid, clusters=o.clusters,
                            max_clusters=o.max_clusters, sigma_scale=o.sigma_scale, normalize=o.normalize,
                            iterations=o.kmeans_iters)
        group_ok = valid.any(dim=1)
        groups, samples = group_ok.sum().clamp_min(1), valid.sum().clamp_min(1)
        zero = out.bonus.new_zeros(())
        self._metrics = {
            "diverse_grpo/clusters_mean": torch.where(group_ok, out.clusters.num_clusters.double(), zero).sum() / groups,
            "diverse_grpo/cluster_size_mean": out.clusters.sizes.sum() / samples,
            "diverse_grpo/bonus_mean": out.bonus.sum() / samples,
            "diverse_grpo/bonus_max": out.bonus.max(),
            "diverse_grpo/sigma_mean": torch.where(group_ok, out.sigma, zero).sum() / groups,
        }
        bonus = out.bonus.reshape(-1)[ctx.index].float()
        return (inputs.rewards.float() + o.beta * bonus)[:, None].expand(-1, inputs.columns)

    def loss_terms(self, inputs: TermsInputs, ctx: StepContext) -> LossTerms | None:
        o = self.cfg.diverse_grpo
        if o.reg_coef <= 0:
            return None
        columns = [c for c, t in enumerate(inputs.trained) if t < o.reg_steps]
        return ReferenceKLTerms(o.reg_coef, inputs.valid[ctx.index].float(), columns, ctx.gather, "diverse_grpo/reg_kl")

    def metrics(self) -> dict[str, torch.Tensor]:
        return dict(self._metrics)
