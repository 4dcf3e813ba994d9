"""GARDO (He et al., arXiv 2512.24138, "Reinforcing Diffusion Models without Reward Hacking"; DESIGN.md 2.8) as a
regulariser (`--method gardo`, options `--gardo.*`), in any perceptual space (`--perceptual.space`).

What is built, and its defaults:
- the diversity-aware advantage (always): each sample's novelty d_i = min over the other valid samples j of its
  group of 1 - cos(f_i, f_j) on L2-normalised features f; A_i = (r_i - mean_group r) * w_i with w_i = 1 where
  r_i is below its group's mean, else d_i / mean_group(d); no division by a std (`--gardo.scale none`, the
  paper's; `global` divides by the batch's reward std, GRPO's step size); clipped to +-`--train.adv_clip` (5).
  Masked samples are left out of every mean and minimum and get advantage 0. Where mean_group(d) is 0 (the
  group's valid samples all coincide) the weight is 1 (the authors' code divides by 0 there).
- the gated KL (`--gardo.kl_coef` > 0, off by default): the KL to the reference on the samples whose main
  reward ranks better than their auxiliary rewards (`--gardo.aux_rewards`, scored on every sample, never
  trained on) - where the proxy is high but the other judges disagree, the method's stated intent. Ranks are
  over the step's valid samples (1 = best), u_i = mean over the auxiliary rewards of their rank minus the main
  reward's rank, and the gate keeps the top `--gardo.gate_fraction` (at least one) of the samples with u_i > 0,
  by u. The authors' public code (tinnerhrhe/GARDO @1cc77fb, scripts/train_sd3_grpo_gardo.py) computes
  u = rank_main - mean aux rank with rank 1 = best and gates u above a percentile of its positive values, which
  selects the opposite samples (the main reward ranks worse than the others); this module builds the intent.
  Their gate fraction adapts within [0.02, 0.2] from 0.1 (`RiskCompensator`); here it is fixed (the option).
  Without auxiliary rewards there is nothing to disagree with: the gated KL is refused (`Config.validate`), and
  --train.kl_beta is the ungated KL. The KL is the fused step KL of `--train.kl_units` (the authors':
  mean (mu - mu_ref)^2 / (2 std_dev_t^2), Flow-GRPO's units), averaged in each (trained step, micro-batch)
  piece over its gated samples, as the authors do, so that --gardo.kl_coef is their beta.
- the reference reset (`--gardo.reset_reference`, on with the gated KL): the reference is a copy of the policy
  (`pec.policy.Policy.track_reference`, the starting policy at first), reset to the current policy before a
  step when the previous step's mean gated KL exceeded `--gardo.reset_kl` (3e-4) or `--gardo.reset_every` (15)
  steps have passed since the last reset. The decision stays on the device (`Policy.reset_reference`); the copy,
  the last reset and the last KL are checkpointed. --train.kl_beta's KL, if set too, uses the same reference.
  false = the reference is the base model (adapters off, or the frozen copy under full fine-tuning).
The authors also weight each step's policy loss by its noise std over the steps' mean; that is Flow-GRPO's
loss, which this regulariser does not change.

GARDO needs no per-step log-probs: its advantage composes with every algorithm (DiffusionNFT maps it to r as
any advantage); the gated KL needs the per-step KL of the SDE steps ("reference_kl"), which DiffusionNFT has
not (its own --nft.ref_coef pulls every sample to the base model).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from pec.config import Config
from pec.methods.base import LossTerms, Method, ShapingInputs, StepContext, TermsInputs
from pec.methods.reference_kl import ReferenceKLTerms
from pec.methods.registry import METHODS
from pec.methods.spectral import valid_pairs
from pec.rewards import reward_for_run
from pec_kernels import check_tensor

if TYPE_CHECKING:
    from pec.policy import Policy


class GardoAdvantages(NamedTuple):
    """`gardo_advantages`: advantages (B, C) float32, the weights w (B, C) float64 (1 where masked) and where
    the novelty weight d_i / mean_group(d) applies (B, C) bool (valid samples at or above their group's mean)."""

    advantages: torch.Tensor
    weights: torch.Tensor
    novel: torch.Tensor


def novelty(features: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """GARDO's novelty d_i = min over the other valid samples j of the group of 1 - cos(f_i, f_j).

    Args:
        features: (G, N, D) features (masked rows may hold NaN).
        valid: optional (G, N) bool mask.

    Returns:
        (G, N) float64; 0 for a masked sample or one without another valid sample in its group.
    """
    check_tensor("features", features, ndims=(3,))
    if valid is None:
        valid = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
    zero = torch.zeros((), dtype=torch.float64, device=features.device)
    f = torch.nn.functional.normalize(torch.where(valid[..., None], features.double(), zero), dim=2)
    distance = 1 - (f @ f.transpose(1, 2)).clamp(-1, 1)
    pairs = valid_pairs(valid)
    d = torch.where(pairs, distance, zero + torch.inf).amin(dim=2)
    return torch.where(pairs.any(dim=2), d, zero)


def gardo_advantages(rewards: torch.Tensor, features: torch.Tensor, group_size: int, valid: torch.Tensor | None = None,
                     *, clip: float | None = 5.0, scale: str = "none", eps: float = 1e-4) -> GardoAdvantages:
    """GARDO's diversity-aware advantages A = (r - mean_group r) * w (module docstring), per column.

    Args:
        rewards: (B,) or (B, C) rewards, groups of `group_size` consecutive samples.
        features: (B, D) features of the samples in the perceptual space.
        group_size: N.
        valid: optional (B,) bool mask: masked samples are left out of the means and minima, advantage 0.
        clip: clamp to [-clip, clip] (None: no clip).
        scale: "none" (the paper's) or "global" (divide by the column's std over the valid samples + eps).

    Returns:
        `GardoAdvantages` with (B, C) arrays ((B, 1) for (B,) rewards).
    """
    check_tensor("rewards", rewards, ndims=(1, 2))
    check_tensor("features", features, ndims=(2,))
    b = rewards.shape[0]
    if features.shape[0] != b or b % group_size:
        raise ValueError(f"rewards and features must hold the same B samples, whole groups of {group_size}; got "
                         f"{b} and {features.shape[0]}")
    if scale not in ("none", "global"):
        raise ValueError(f"scale must be 'none' or 'global', got {scale!r}")
    r = rewards.double().reshape(b, -1)
    if valid is None:
        valid = torch.ones(b, dtype=torch.bool, device=r.device)
    zero = torch.zeros((), dtype=torch.float64, device=r.device)
    w_valid = valid.double()[:, None]
    r = torch.where(valid[:, None], r, zero)
    groups = r.reshape(-1, group_size, r.shape[1])
    gw = w_valid.reshape(-1, group_size, 1)
    mean = (groups * gw).sum(dim=1, keepdim=True) / gw.sum(dim=1, keepdim=True).clamp_min(1)
    centred = (groups - mean) * gw
    d = novelty(features.reshape(-1, group_size, features.shape[1]), valid.reshape(-1, group_size))[..., None]
    mean_d = (d * gw).sum(dim=1, keepdim=True) / gw.sum(dim=1, keepdim=True).clamp_min(1)
    ratio = torch.where(mean_d > 0, d / torch.where(mean_d > 0, mean_d, zero + 1), zero + 1)
    novel = (groups >= mean) & (gw > 0)
    weights = torch.where(novel, ratio, zero + 1).reshape(b, -1)
    adv = centred.reshape(b, -1) * weights
    if scale == "global":
        n = w_valid.sum().clamp_min(1)
        col_mean = r.sum(dim=0) / n
        adv = adv / ((((r - col_mean) * w_valid).square().sum(dim=0) / n).sqrt() + eps)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return GardoAdvantages(adv.float(), weights, novel.reshape(b, -1))


def ranks(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Each column's descending rank among the valid rows (1 = best; ties by row order), as float64; masked
    rows rank after every valid one. values: (B,) or (B, A)."""
    v = values.double().reshape(values.shape[0], -1)
    key = torch.where(valid[:, None], v, -torch.inf)
    order = torch.argsort(key, dim=0, descending=True, stable=True)
    position = torch.arange(1, v.shape[0] + 1, dtype=torch.float64, device=v.device)[:, None].expand_as(v)
    out = torch.empty_like(v).scatter_(0, order, position)
    return out.reshape(values.shape)


def gardo_gate(main: torch.Tensor, aux: torch.Tensor, valid: torch.Tensor, fraction: float) -> torch.Tensor:
    """The samples whose main reward ranks better than their auxiliary rewards, the top `fraction` of them by
    u = mean aux rank - main rank (> 0; at least one when any): (B,) bool, False where masked.

    Args:
        main: (B,) the trained reward; aux: (B, A) the auxiliary rewards; valid: (B,) mask; fraction: in (0, 1].
    """
    check_tensor("main", main, ndims=(1,))
    check_tensor("aux", aux, ndims=(2,))
    u = ranks(aux, valid).mean(dim=1) - ranks(main, valid)
    positive = valid & (u > 0)
    key = torch.where(positive, u, -torch.inf)
    place = ranks(key, positive)  # 1 = the largest u among the positive ones
    quota = torch.ceil(fraction * positive.double().sum())
    return positive & (place <= quota)


@METHODS.register("gardo")
class GARDO(Method):
    """GARDO's diversity-aware advantage, with its optional gated KL and reference reset (module docstring)."""

    name = "gardo"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self._aux: dict[str, torch.nn.Module] | None = None  # built on first use: a config check builds methods too
        self._step: dict[str, torch.Tensor] = {}  # the step being shaped: gathered features and rewards
        self._metrics: dict[str, torch.Tensor] = {}
        self._policy: Policy | None = None
        self._reference: list[torch.Tensor] = []  # the tracked reference's values (`Policy.track_reference`)
        self._terms: ReferenceKLTerms | None = None  # the last step's gated KL terms
        self._resumed_kl: torch.Tensor | None = None  # the last step's gated KL, from a checkpoint
        self._last_reset: torch.Tensor | None = None
        self._resets: torch.Tensor | None = None

    @property
    def gated(self) -> bool:
        """Whether the gated KL is on."""
        return self.cfg.gardo.kl_coef > 0

    @property
    def resetting(self) -> bool:
        """Whether the reference is a tracked copy of the policy, reset along training."""
        return self.gated and self.cfg.gardo.reset_reference

    def requirements(self) -> dict[str, str]:
        if self.gated:
            return {"reference_kl": "its gated KL (--gardo.kl_coef > 0) is the KL of each trained SDE step to the "
                                    "reference (set --gardo.kl_coef 0 for its advantage alone)"}
        return {}

    def needs_reference(self) -> bool:
        return self.gated and not self.resetting

    def bind(self, policy: Policy) -> None:
        if self.resetting:
            self._policy = policy
            self._reference = policy.track_reference()

    def shape(self, inputs: ShapingInputs, ctx: StepContext) -> torch.Tensor:
        cols = [inputs.rewards.float()]
        if self.gated:
            cols += [a.float() for a in self._aux_rewards(inputs)]
        self._step = {"features": ctx.gather(inputs.features.float()), "rewards": ctx.gather(torch.stack(cols, 1))}
        return super().shape(inputs, ctx)

    def _aux_rewards(self, inputs: ShapingInputs) -> list[torch.Tensor]:
        """This rank's auxiliary rewards (B_local,) each, scored in micro-batches like the main reward."""
        cfg = self.cfg
        if self._aux is None:
            self._aux = {name: reward_for_run(name, cfg, inputs.rewards.device) for name in cfg.gardo.aux_rewards}
        images, prompts, size = inputs.images, list(inputs.prompts), cfg.train.micro_batch
        with torch.no_grad():
            return [torch.cat([reward(images[i:i + size], prompts[i:i + size]).float()
                               for i in range(0, images.shape[0], size)]) for reward in self._aux.values()]

    def advantages(self, shaped: torch.Tensor, valid: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        g, n = self.cfg.gardo, self.cfg.sampling.group_size
        features = self._step["features"]
        out = gardo_advantages(shaped, features, n, valid, clip=self.cfg.train.adv_clip, scale=g.scale)
        d = novelty(features.reshape(-1, n, features.shape[1]), valid.reshape(-1, n)).reshape(-1)
        zero = out.weights.new_zeros(())
        count = out.novel.sum()
        self._metrics = {
            "gardo/novelty_mean": torch.where(valid, d, zero).sum() / valid.sum().clamp_min(1),
            "gardo/weight_mean": torch.where(out.novel, out.weights, zero).sum() / count.clamp_min(1),
            "gardo/weight_min": torch.where(count > 0, torch.where(out.novel, out.weights, zero + torch.inf).min(), zero),
            "gardo/weight_max": torch.where(count > 0, torch.where(out.novel, out.weights, zero - torch.inf).max(), zero),
        }
        if self.gated:
            rewards = self._step["rewards"]
            self._step["gate"] = gardo_gate(rewards[:, 0], rewards[:, 1:], valid, g.gate_fraction)
            self._metrics["gardo/gated_fraction"] = self._step["gate"].double().sum() / valid.sum().clamp_min(1)
        return out.advantages

    def loss_terms(self, inputs: TermsInputs, ctx: StepContext) -> LossTerms | None:
        if not self.gated:
            return None
        if self.resetting:
            self._reset(ctx.step)
        weight = self._step["gate"][ctx.index].float()
        self._terms = ReferenceKLTerms(self.cfg.gardo.kl_coef, weight, range(inputs.log_probs.shape[1]), ctx.gather,
                                       "gardo/kl_gated", over_weighted=True)
        return self._terms

    def _previous_kl(self) -> torch.Tensor | None:
        """The last step's mean gated KL over every process (None before the run's first step)."""
        return self._resumed_kl if self._terms is None else self._terms.mean_kl()

    def _reset(self, step: int) -> None:
        """Before step `step`'s update: reset the tracked reference to the policy when the last step's gated KL
        exceeded --gardo.reset_kl or --gardo.reset_every steps have passed (on the device: no host read)."""
        device = self._step["gate"].device
        if self._last_reset is None:
            self._last_reset = torch.zeros((), dtype=torch.long, device=device)
            self._resets = torch.zeros((), dtype=torch.long, device=device)
        g = self.cfg.gardo
        flag = (step - self._last_reset) >= g.reset_every
        previous = self._previous_kl()
        if previous is not None:
            flag = flag | (previous > g.reset_kl)
        self._policy.reset_reference(flag)
        self._last_reset = torch.where(flag, step, self._last_reset)
        self._resets = self._resets + flag.long()
        self._metrics["gardo/reference_resets"] = self._resets.double()

    def metrics(self) -> dict[str, torch.Tensor]:
        return dict(self._metrics)

    def state_dict(self) -> dict[str, Any]:
        """The tracked reference (by name, whole, on the CPU), the step of the last reset, the resets so far and
        the last step's gated KL: what the next step's reset decision reads."""
        if not self.resetting:
            return {}
        previous = self._previous_kl()
        return {"reference": self._policy.values_state(self._reference),
                "last_reset": 0 if self._last_reset is None else int(self._last_reset),
                "resets": 0 if self._resets is None else int(self._resets),
                "kl": None if previous is None else float(previous)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.resetting or not state:
            return
        if set(state) != {"reference", "last_reset", "resets", "kl"}:
            raise ValueError(f"the checkpoint's GARDO state must hold reference, last_reset, resets and kl, "
                             f"got {sorted(state)}")
        self._policy.load_values_state(self._reference, state["reference"])
        device = self._reference[0].device
        self._last_reset = torch.tensor(state["last_reset"], device=device)
        self._resets = torch.tensor(state["resets"], device=device)
        self._resumed_kl = None if state["kl"] is None else torch.tensor(state["kl"], dtype=torch.float64,
                                                                         device=device)
