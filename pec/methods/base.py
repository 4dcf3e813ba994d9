"""What a regulariser (`--method`) gives the trainer: rollout guidance, reward shaping, advantage shaping
and per-piece loss terms, each a hook with a neutral default.

The trainer's step reads as four phases (`pec.trainer`): rollout, scoring, reward shaping, update. A
method acts through these hooks, whatever the algorithm (`pec.algorithms`):

- `guidance(ctx)`: a guidance function and weight for the rollout (PCGS's guided form), or none;
- `shape(inputs)`: the (B, C) shaped rewards from the rewards, the perceptual surprisal and (when the
  algorithm has them) the trained steps' log-probabilities; C is the algorithm's number of advantage
  columns (one per trained step for the policy-gradient family, one for DiffusionNFT);
- `advantages(...)`: advantages of the method's own (None: the group-normalised ones of `pec.grpo`);
- `loss_terms(inputs)`: terms added to each (trained step, micro-batch) piece of a policy-gradient loss
  (Clip-Cov's detached entries, KL-Cov's penalty, the analytic entropy bonus, GARDO's gated KL,
  DiverseGRPO's early-step regulariser), or none;
- `metrics()`: what the method did this step, for the metrics row (0-dim tensors, read with the row);
- `needs_reference()`, `bind(policy)`, `state_dict()` / `load_state_dict()`: a method whose loss terms
  evaluate the reference policy, or that moves the reference (GARDO's reset), and its checkpoint state.

`needs` maps what the method needs from the algorithm (a capability of `pec.algorithms.base.CAPABILITIES`)
to why; `check_pair` refuses a method whose needs the algorithm does not provide, with one line.
A new regulariser is one module in this package: subclass `Method`, register it with
`@METHODS.register(name)`, import the module in `pec/methods/__init__.py`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from pec.config import Config

if TYPE_CHECKING:
    from pec.policy import Policy

GuidanceFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepContext:
    """The step a hook runs in: its number, the run's config, an all-gather of per-sample rows into the
    global batch order (the identity with one process), and this rank's global sample indices."""

    step: int
    cfg: Config
    gather: Callable[[torch.Tensor], torch.Tensor]
    index: torch.Tensor


@dataclass
class GuidanceContext:
    """What the rollout's guidance needs: the model's decoder, the regulariser's perceptual encoder, the
    samples per group on this rank, the number of sampling steps and, when a group is spread over ranks,
    how to gather its samples (None otherwise)."""

    decode: Callable[[torch.Tensor], torch.Tensor]
    encoder: torch.nn.Module
    group_size: int
    num_steps: int
    gather: Callable[[torch.Tensor], torch.Tensor] | None


@dataclass
class ShapingInputs:
    """Per-sample rows of this rank for `Method.shape`.

    rewards: (B,) task rewards; surprisal: (B,) perceptual surprisal in the regulariser's space (0 where
    invalid); log_probs: (B, C) the behaviour policy's log-probs of the trained steps, or None when the
    algorithm has none; latents: (B, ...) final latents (zeroed where invalid); valid: (B,) mask;
    columns: C; features: (B, D) features in the regulariser's space (`--perceptual.space`; invalid rows
    may hold NaN); images: (B, ...) the decoded images in [0, 1] the rewards scored (invalid rows may hold
    NaN) and prompts: their B prompts. Rows of this rank: a method that needs whole groups gathers them
    (`StepContext.gather`).
    """

    rewards: torch.Tensor
    surprisal: torch.Tensor
    log_probs: torch.Tensor | None
    latents: torch.Tensor
    valid: torch.Tensor
    columns: int
    features: torch.Tensor | None = None
    images: torch.Tensor | None = None
    prompts: Sequence[str] = ()


@dataclass
class TermsInputs:
    """What `Method.loss_terms` may read: the step's rollout log-probs of the trained steps (B_local, C),
    the surprisal (B_local,), the global advantages and validity mask ((B, C), (B,)), each trained step's
    analytic policy entropy (C,) (host floats), the latent dimension D and the trained steps (C indices
    into the sampler's steps, in denoising order: column c trains step trained[c])."""

    log_probs: torch.Tensor
    surprisal: torch.Tensor
    advantages: torch.Tensor
    valid: torch.Tensor
    step_entropy: list[float]
    latent_dim: int
    trained: list[int] = field(default_factory=list)


class LossTerms:
    """A regulariser's terms in each (trained step `col`, micro-batch `idx`) piece of a policy-gradient loss.

    The piece's loss is `clipped_surrogate(*ratio_inputs(...)) [+ penalty] [+ KL] [+ piece_loss(...)]`.
    """

    def ratio_inputs(self, idx: torch.Tensor, col: int, log_prob: torch.Tensor, old: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The log-prob entering the ratio (e.g. detached on selected entries) and a penalty to add, if any."""
        return log_prob, None

    def wants_reference(self, col: int) -> bool:
        """Whether the piece of trained step `col` needs the reference policy's step (its fused KL, e.g. for
        a regulariser on ||mu_theta - mu_ref||^2 of early steps); the algorithm then evaluates it even
        without --train.kl_beta."""
        return False

    def piece_loss(self, col: int, loss: torch.Tensor, step: Any, idx: torch.Tensor) -> torch.Tensor | None:
        """A term added to the piece's loss after the KL (same dtype and device as `loss`), if any. `step` is
        the piece's re-evaluated `pec_kernels.SdeStep` (its `kl` holds ||mu_theta - mu_ref||^2 / (2 s^2)
        per sample, in `--train.kl_units`, when the reference was evaluated); `idx` are the piece's rows of
        this rank's batch (on the device)."""
        return None

    def counts(self) -> dict[str, Any]:
        """What the terms did this step, for the metrics row."""
        return {}


class Method:
    """A regulariser behind the trainer's loop (see the module docstring)."""

    name: ClassVar[str] = ""
    needs: ClassVar[dict[str, str]] = {}

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def requirements(self) -> dict[str, str]:
        """What this configuration of the method needs from the algorithm, and why (default: `needs`)."""
        return dict(self.needs)

    def guidance(self, ctx: GuidanceContext) -> tuple[GuidanceFn | None, float | torch.Tensor]:
        """The rollout's guidance function and its per-step weight gamma (default: none)."""
        return None, 0.0

    def shape(self, inputs: ShapingInputs, ctx: StepContext) -> torch.Tensor:
        """(B, C) shaped rewards (default: the reward in every column)."""
        return inputs.rewards.float()[:, None].expand(-1, inputs.columns)

    def advantages(self, shaped: torch.Tensor, valid: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
        """Advantages (B, C) of the method's own from the global shaped rewards, or None for the default
        group normalisation."""
        return None

    def loss_terms(self, inputs: TermsInputs, ctx: StepContext) -> LossTerms | None:
        """The step's per-piece loss terms (default: none)."""
        return None

    def metrics(self) -> dict[str, torch.Tensor]:
        """What the method did in the step just shaped, for its metrics row: 0-dim tensors over the global
        batch, identical on every process (default: nothing)."""
        return {}

    def needs_reference(self) -> bool:
        """Whether its loss terms evaluate the reference policy, so that full fine-tuning keeps the frozen
        base copy (`pec.policy.Policy`; default: no)."""
        return False

    def bind(self, policy: Policy) -> None:
        """Called once by the trainer with the policy being trained, before any step or resume (default:
        nothing; GARDO's reference reset tracks a copy of the policy there)."""

    def state_dict(self) -> dict[str, Any]:
        """Extra checkpoint state (tensors and plain values only; every rank calls it, rank 0's is written)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` (an empty dict: a fresh run, or a checkpoint without this state)."""
