"""Clip-Cov and KL-Cov (Cui et al. 2025, arXiv 2505.22617), native and perceptual, for flow-matching GRPO.

An *entry* is one (sample, trained step) pair of the step's batch: B samples x T trained steps. Per
entry, with the means taken over the valid samples of the batch, one trained step (column) at a time,

    Cov[b, t] = (y[b, t] - mean_b y[:, t]) * (A[b, t] - mean_b A[:, t]),

where y is the policy log-prob log pi(x'|x) of the entry's transition ("native") or the sample's
perceptual log-density -surprisal[b], the same in every column ("perceptual", the paper's PickScore
rows). Centring per column removes the schedule's per-step offset -log s_t of the mean-reduced
log-prob, which would otherwise rank entries by step instead of by sample.

- Clip-Cov: the *band* is the top `band` fraction of the valid entries by Cov; a random `fraction` of
  the band (at least one entry while `fraction` > 0; drawn with a `torch.Generator` seeded from the
  run seed and the step, so a resumed run draws the same) has its log-prob detached in the clipped
  surrogate: those entries add nothing to the gradient.
- KL-Cov: the top `fraction` of the valid entries by Cov (at least one while `fraction` > 0) get the
  penalty beta * |log pi_old - log pi| added to their surrogate term (same mean as the surrogate).

Why quantiles and not the LLM paper's settings: Cui et al. select Cov in the absolute band [1, 5]
and r = 2e-4 of the tokens. A step here has about 320 entries and mean-reduced log-probs vary by
about 0.1 (the embedded model) or less (SD3.5 latents), so no Cov reaches 1 and 2e-4 x 320 < 1:
those settings select nothing. A band of batch quantiles and a fraction relative to it select the
same number of entries whatever the scale of log pi (`selection_count`).

Selection uses the rollout's stored log-probs. Cov in Cui et al. is of the *current* log pi; at the
first (on-policy) update of a step the current log pi equals the stored one exactly (the trainer
re-evaluates the rollout's own batches), so selecting once per step from the stored log-probs is the
standard approximation (later minibatches keep the first one's selection).

Two differences from Cui et al.'s implementation, both so that a fraction of 0 is plain GRPO bit for
bit: the PPO clip stays on for every entry under KL-Cov (theirs drops it), and Clip-Cov does not skip
entries the PPO clip already cuts (the selection happens before any ratio departs from 1).
Note that |log pi_old - log pi| has zero gradient at log pi = log pi_old: KL-Cov's penalty acts
only from the second minibatch of a step on (`train.minibatches` >= 2).

All functions are model-free tensor math and never read a value back to the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pec.config import COV_METHODS
from pec_kernels import check_tensor


def entry_covariance(log_density: torch.Tensor, advantages: torch.Tensor, valid: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Cov[b, t] = (y[b, t] - mean y[:, t]) * (A[b, t] - mean A[:, t]), means over the valid rows.

    Args:
        log_density: (B, T) per-entry log pi, or (B,) per-sample log-density (broadcast over T).
        advantages: (B, T) advantages.
        valid: (B,) bool mask of the samples to use; invalid rows get Cov = -inf (never selected).

    Returns:
        (B, T) float32 covariances (detached).
    """
    check_tensor("advantages", advantages, ndims=(2,))
    check_tensor("log_density", log_density, ndims=(1, 2))
    y = log_density.detach().float()
    y = y[:, None].expand_as(advantages) if y.dim() == 1 else y
    if y.shape != advantages.shape:
        raise ValueError(f"log_density must be (B,) or (B, T) = {tuple(advantages.shape)}, "
                         f"got {tuple(log_density.shape)}")
    a = advantages.detach().float()
    if valid is None:
        valid = torch.ones(a.shape[0], dtype=torch.bool, device=a.device)
    check_tensor("valid", valid, ndims=(1,), dtypes=(torch.bool,))
    if valid.shape[0] != a.shape[0]:
        raise ValueError(f"valid must have one entry per row ({a.shape[0]}), got {valid.shape[0]}")
    w = valid[:, None].float()
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    y = torch.where(valid[:, None], y, zero)
    a = torch.where(valid[:, None], a, zero)
    n = w.sum(dim=0).clamp_min(1)
    cov = (y - y.sum(dim=0) / n) * (a - a.sum(dim=0) / n)
    return torch.where(valid[:, None], cov, zero - torch.inf)


def selection_count(fraction: float, n: torch.Tensor) -> torch.Tensor:
    """How many of n entries a fraction selects: floor(fraction * n), at least 1 while fraction > 0
    and n > 0, 0 for fraction 0 (as Cui et al.'s max(1, int(r * N)), but a fraction of 0 selects nothing).

    `n` is a 0-dim tensor (a count on the device), and so is the result."""
    _check_fraction("fraction", fraction)
    n = n.to(torch.float64)
    if fraction == 0:
        return torch.zeros_like(n)
    # The 1e-9 absorbs float rounding of fraction * n just below an integer (0.29 * 100 = 28.999...).
    return torch.minimum(torch.floor(fraction * n + 1e-9).clamp_min(1.0), n)


def ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each element of `scores` in descending order (0 = largest; ties by position)."""
    flat = scores.reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True)
    out = torch.empty_like(order)
    out[order] = torch.arange(flat.numel(), device=flat.device)
    return out.reshape(scores.shape)


def top_fraction(cov: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool mask of the top `fraction` of the finite entries of `cov` by value (`selection_count`
    entries; -inf marks entries that take no part)."""
    count = selection_count(fraction, torch.isfinite(cov).sum())
    return ranks(cov) < count


def clip_cov_mask(cov: torch.Tensor, band: float, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Clip-Cov's selection: a uniformly random `fraction` of the band (the top `band` fraction of the
    finite entries by Cov), as a bool mask of `cov`'s shape.

    `generator` is a CPU generator (seed it from the run seed and the step): the random order is
    drawn on the host and moved to `cov`'s device, so the draw is the same on any device."""
    in_band = top_fraction(cov, band)
    count = selection_count(fraction, in_band.sum())
    keys = torch.rand(cov.shape, generator=generator, dtype=torch.float64).to(cov.device)
    return (ranks(torch.where(in_band, -keys, -torch.inf)) < count) & in_band


@dataclass
class CovSelection:
    """The entries of one step that Clip-Cov detaches (`mode` "clip") or KL-Cov penalises ("kl").

    mask: (B, T) bool, one column per trained step (the trainer's advantage columns).
    kl_coef: beta of KL-Cov's penalty.
    count: 0-dim tensor, the number of entries selected in the whole batch (also after `rows`).
    """

    mode: str
    mask: torch.Tensor
    kl_coef: float
    count: torch.Tensor

    def rows(self, index: torch.Tensor) -> CovSelection:
        """The selection restricted to the rows `index` (one process's samples), keeping the batch's count."""
        return CovSelection(self.mode, self.mask[index], self.kl_coef, self.count)

    def apply(self, rows: torch.Tensor, col: int, log_prob: torch.Tensor, old_log_prob: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch's log-prob for the clipped surrogate and the penalty to add to its loss.

        Args:
            rows: (n,) sample indices of the micro-batch; col: its trained-step column.
            log_prob: (n,) current log-probs (differentiable); old_log_prob: (n,) the behaviour's.

        Returns:
            (log_prob, penalty): under "clip", log_prob detached at the selected entries (their
            surrogate adds nothing to the gradient) and a zero penalty; under "kl", log_prob unchanged
            and penalty = kl_coef * mean(selected * |old_log_prob - log_prob|), a 0-dim tensor.
        """
        selected = self.mask[rows, col]
        if self.mode == "clip":
            return torch.where(selected, log_prob.detach(), log_prob), log_prob.new_zeros(())
        # Mask before abs, so a NaN log-prob of an unselected (masked-out) sample cannot reach the gradient.
        zero = torch.zeros((), dtype=log_prob.dtype, device=log_prob.device)
        gap = torch.where(selected, old_log_prob.detach() - log_prob, zero).abs()
        return log_prob, self.kl_coef * gap.mean()

    def counts(self) -> dict[str, torch.Tensor]:
        """The logged counts (0-dim device tensors): "cov/clipped" and "cov/penalised" entries."""
        n = self.count.double()
        zero = torch.zeros_like(n)
        return {"cov/clipped": n if self.mode == "clip" else zero, "cov/penalised": n if self.mode == "kl" else zero}


def select_entries(method: str, log_density: torch.Tensor, advantages: torch.Tensor, valid: torch.Tensor | None,
                   *, band: float, fraction: float, kl_coef: float, generator: torch.Generator) -> CovSelection:
    """One step's Clip-Cov or KL-Cov selection.

    Args:
        method: "clip_cov" or "kl_cov".
        log_density: (B, T) stored log-probs of the trained steps (native) or (B,) perceptual
            log-densities -surprisal (perceptual).
        advantages: (B, T) the step's advantages.
        valid: (B,) bool mask of the samples to learn from (None = all).
        band: Clip-Cov's band, the top fraction of entries by Cov (ignored by KL-Cov).
        fraction: Clip-Cov's r (relative to the band) or KL-Cov's top fraction (of all valid entries).
        kl_coef: KL-Cov's beta.
        generator: CPU generator of Clip-Cov's random draw.
    """
    if method not in COV_METHODS:
        raise ValueError(f"method must be one of {list(COV_METHODS)}, got {method!r}")
    _check_fraction("band", band)
    _check_fraction("fraction", fraction)
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    cov = entry_covariance(log_density, advantages, valid)
    if method == "clip_cov":
        mask = clip_cov_mask(cov, band, fraction, generator)
        return CovSelection("clip", mask, kl_coef, mask.sum())
    mask = top_fraction(cov, fraction)
    return CovSelection("kl", mask, kl_coef, mask.sum())


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value}")
