"""Flow-GRPO (Liu et al. 2025; DESIGN.md 2.3): the clipped policy gradient on the SDE steps of the rollout.

Each step's rollout samples with the SDE of `--sampling.kind` on the steps of `--sampling.sde_window` (all
by default) and records every SDE step's log-probability. The trained steps are those SDE steps among the
first int(T * `--train.timestep_fraction`) (`pec.sampling.trained_steps`); the advantages have one column
per trained step. `--train.minibatches` optimizer updates follow: for each trained step and micro-batch,
the log-prob is re-evaluated through the rollout's own code path (`pec.sampling.step_log_prob`, with the
rollout's micro-batch shapes, so the first update's ratio is exactly 1), then the clipped surrogate
(`pec.grpo.clipped_surrogate`, Clip-Higher with `--train.clip_range_high`), the optional KL to the reference
(`--train.kl_beta`, adapter-off model or frozen copy) and the regulariser's loss terms; gradients
accumulate over the logical minibatch.

Variants subclass `FlowGRPO` and override `plan` (which steps are SDE steps: MixGRPO, Flow-GRPO-Fast) or
`piece_loss` (how a piece's ratio and surrogate are formed: GRPO-Guard).
"""
from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch

from pec.algorithms.base import Algorithm, RolloutPlan, UpdateBatch
from pec.algorithms.registry import ALGORITHMS
from pec.grpo import SurrogateStats, clipped_surrogate
from pec.policy import latent_dim
from pec.regularizers import policy_entropy
from pec.sampling import Rollout, guided_velocity, step_log_prob

if TYPE_CHECKING:
    from pec.methods.base import LossTerms
    from pec_kernels import SdeStep


@ALGORITHMS.register("flow_grpo")
class FlowGRPO(Algorithm):
    """Flow-GRPO (see the module docstring)."""

    name = "flow_grpo"
    provides = frozenset({"log_probs", "ratio", "policy_entropy", "reference_kl"})

    def plan(self, step: int) -> RolloutPlan:
        window = self.cfg.sampling.sde_window
        return RolloutPlan(sde_window=tuple(window) if window else None)

    def columns(self, trained: list[int]) -> int:
        return len(trained)

    def piece_loss(self, rollout: Rollout, t_index: int, col: int, idx: torch.Tensor, adv: torch.Tensor,
                   keep: torch.Tensor, v_ref: torch.Tensor | None, terms: LossTerms | None
                   ) -> tuple[torch.Tensor, SurrogateStats, SdeStep]:
        """The policy loss of one piece of the update (trained step `t_index`, advantage column `col`,
        micro-batch `idx` with advantages `adv` and validity `keep`): the clipped surrogate of the step's
        ratio, with the regulariser's ratio inputs and penalty (`LossTerms.ratio_inputs`), before the KL and
        the regulariser's piece term, which `update` adds. Variants override it to form the ratio otherwise
        (GRPO-Guard).

        Returns (loss, the ratio's stats, the re-evaluated step: `pec.sampling.step_log_prob`'s output, whose
        `kl` is the KL to the reference when `v_ref` is given).
        """
        cfg = self.cfg
        out = step_log_prob(self.learner.policy.model, rollout, t_index, idx, v_ref=v_ref,
                            kl_units=cfg.train.kl_units)
        old = rollout.log_probs[t_index, idx].float()
        log_prob, penalty = out.log_prob.float(), None
        if terms is not None:
            log_prob, penalty = terms.ratio_inputs(idx, col, log_prob, old)
        loss, stats = clipped_surrogate(log_prob, old, adv, cfg.train.clip_range, valid=keep,
                                        clip_range_high=cfg.train.clip_range_high)
        if penalty is not None:
            loss = loss + penalty
        return loss, stats, out

    def update(self, batch: UpdateBatch) -> tuple[dict[str, Any], list[str]]:
        """`train.minibatches` optimizer updates on the rollout (see `Learner.step` for the skip rules).

        Masked samples (`batch.valid` False) add nothing to the loss. Returns the averaged diagnostics
        (0-dim device tensors) and the causes of the skipped updates.
        """
        cfg, learner = self.cfg, self.learner
        model, dist, device = learner.policy.model, learner.dist, learner.device
        rollout, trained, advantages, valid = batch.rollout, batch.trained, batch.advantages, batch.valid
        terms = batch.terms
        dim = latent_dim(model)
        # DDP and FSDP2 average gradients over ranks; every rank's loss is already a share of the global mean.
        loss_scale = dist.world_size
        zero = torch.zeros((), dtype=torch.float64, device=device)
        sums: dict[str, torch.Tensor] = defaultdict(lambda: zero)
        counts: dict[str, int] = defaultdict(int)
        first_ratio_dev, ratio_max, ratio_min = zero, zero - torch.inf, zero + torch.inf
        grad_norm_sum, updates, causes = zero, 0, []
        # The analytic policy entropy of each trained step, from the schedule's noise std on the host (no
        # device read): s is fixed by the schedule, and every trained step has s > 0.
        step_entropy = policy_entropy(rollout.step_std[trained], dim)
        model.train()
        for mb_index, (chunks, mb) in enumerate(batch.minibatches):
            learner.optimizer.zero_grad(set_to_none=True)
            pieces = len(trained) * len(mb)  # the loss is a mean over the whole (global) minibatch
            mb_loss = zero
            passes = len(trained) * len(chunks)
            chunks_dev = [idx.to(device, non_blocking=True) for idx in chunks]  # once, not per trained step
            for col, t_index in enumerate(trained):
                for chunk_index, (idx, idx_dev) in enumerate(zip(chunks, chunks_dev)):
                    learner.policy.gradient_sync(col * len(chunks) + chunk_index == passes - 1)
                    v_ref = None
                    if cfg.train.kl_beta > 0 or (terms is not None and terms.wants_reference(col)):
                        with torch.no_grad(), learner.policy.reference() as ref_model:
                            v_ref = guided_velocity(ref_model, rollout, t_index, idx_dev)
                    adv = advantages[idx_dev, col]
                    keep = valid[idx_dev]
                    loss, stats, out = self.piece_loss(rollout, t_index, col, idx_dev, adv, keep, v_ref, terms)
                    surrogate = loss.detach()
                    if out.kl is not None and cfg.train.kl_beta > 0:
                        loss = loss + cfg.train.kl_beta * (out.kl * keep).mean()
                    extra = terms.piece_loss(col, loss, out, idx_dev) if terms is not None else None
                    if extra is not None:
                        loss = loss + extra
                    scaled = loss * len(idx) / pieces
                    (scaled * loss_scale).backward()
                    mb_loss = mb_loss + scaled.detach()
                    if mb_index == 0:
                        first_ratio_dev = torch.maximum(first_ratio_dev, torch.maximum(
                            (stats.ratio_max - 1).abs(), (stats.ratio_min - 1).abs()).double())
                    n = len(idx)
                    for key, value in (("loss", loss.detach()), ("surrogate", surrogate),
                                       ("ratio_mean", stats.ratio_mean), ("clip_fraction", stats.clip_fraction),
                                       ("approx_kl", stats.approx_kl), ("advantage_abs", adv.abs().mean())):
                        sums[key] = sums[key] + value.double() * n
                        counts[key] += n
                    if out.kl is not None:
                        sums["kl"] = sums["kl"] + out.kl.mean().double() * n
                        counts["kl"] += n
                    ratio_max = torch.maximum(ratio_max, stats.ratio_max.double())
                    ratio_min = torch.minimum(ratio_min, stats.ratio_min.double())
            grad_norm = learner.step(mb_index, mb_loss, mb, batch.global_valid, causes)
            if grad_norm is not None:
                grad_norm_sum = grad_norm_sum + grad_norm.double()
                updates += 1
        learner.optimizer.zero_grad(set_to_none=True)
        keys = sorted(counts)
        weights = torch.tensor([float(counts[k]) for k in keys], dtype=torch.float64).to(device, non_blocking=True)
        totals = dist.all_reduce_(torch.cat([torch.stack([sums[k] for k in keys]), weights]))
        row: dict[str, Any] = {k: totals[i] / totals[len(keys) + i] for i, k in enumerate(keys)}
        first_ratio_dev, ratio_max = dist.all_reduce_(torch.stack([first_ratio_dev, ratio_max]), "max")
        ratio_min = dist.all_reduce_(ratio_min.clone(), "min")
        entropy_mean = step_entropy.mean().tolist()
        row.update(policy_entropy=entropy_mean, policy_entropy_per_dim=entropy_mean / dim)
        row.update(ratio_max=ratio_max, ratio_min=ratio_min, first_update_ratio_dev=first_ratio_dev,
                   grad_norm=grad_norm_sum / updates if updates else zero + torch.nan)
        if terms is not None:
            row.update(terms.counts())
        return row, causes
