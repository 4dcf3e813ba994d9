"""What every RL algorithm gives the trainer: its rollout needs, its update, and its checkpoint state.

The trainer's step reads as four phases (`pec.trainer`): rollout, scoring, reward shaping, update. An
algorithm decides the first and the last:

- `plan(step)`: how step `step` samples (`RolloutPlan`: which steps are SDE steps with a log-prob and which
  are ODE steps, the ODE solver, whether a group shares its initial noise) — the trained steps then follow
  from one rule for every algorithm (`pec.sampling.trained_steps`);
- `columns(rollout)`: how many advantage columns its update reads (one per trained step for the
  policy-gradient family, one for DiffusionNFT): the shaped rewards and advantages have that width;
- `update(batch)`: its optimizer updates on the step's `UpdateBatch`;
- `state_dict()` / `load_state_dict()`: extra state a checkpoint must carry (plain values and tensors only,
  read back with `torch.load(weights_only=True)`), e.g. NFT's old adapter or MixGRPO's window position.

`provides` names what its update offers the regularisers (`pec.methods`): "log_probs" (per-step
log-probabilities of the behaviour policy), "ratio" (a PPO ratio and its clip), "policy_entropy"
(Gaussian steps whose entropy is fixed by the schedule), "reference_kl" (each trained step's KL
||mu_theta - mu_ref||^2 / (2 s^2) to the reference policy, evaluated for the pieces whose
`LossTerms.wants_reference` asks for it). A regulariser that needs one of them is refused
with an algorithm that lacks it, before any model loads (`check_pair`).

A new algorithm is one module: subclass `Algorithm` (or `pec.algorithms.flow_grpo.FlowGRPO` for a variant
of the clipped policy gradient), register it with `@ALGORITHMS.register(name)` in its module, and import
that module in `pec/algorithms/__init__.py`. Its options, if any, are a section of `pec.config.Config`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from pec.config import Config
from pec.distributed import plain_tensor
from pec.syncs import documented_sync

if TYPE_CHECKING:
    from pec.distributed import DistContext
    from pec.methods.base import LossTerms
    from pec.policy import Policy
    from pec.run_safety import PreemptionHandler
    from pec.sampling import Rollout

# What an algorithm may provide to the regularisers, and what each means (for the refusal messages).
CAPABILITIES = {
    "log_probs": "per-step log-probabilities of the sampled transitions",
    "ratio": "PPO ratio with its clip",
    "policy_entropy": "Gaussian SDE steps whose entropy the schedule fixes",
    "reference_kl": "per-step KL of its SDE steps to the reference policy",
}


@dataclass(frozen=True)
class RolloutPlan:
    """How one training step samples.

    sde_window: steps [start, end) sampled with noise (SDE steps, each with a log-prob); all others are
        deterministic ODE steps; None = every step. A step whose noise std is 0 is an ODE step anyway.
    shared_noise: every sample of a prompt group starts from the same initial noise (MixGRPO), so the
        group diverges only where steps have noise.
    solver: how ODE steps are solved: "euler" (the SDE step with eta 0, through `pec_kernels`) or "dpm2"
        (DPM-Solver++(2M), DiffusionNFT's sampler; `pec.sampling.sample`).
    eta: the SDE noise level of the step's SDE steps (None: `--sampling.eta`; 0: every step is an ODE step).
    record_means: keep each step's Gaussian mean in the rollout (`Rollout.means`: GRPO-Guard's mu_old).
    """

    sde_window: tuple[int, int] | None = None
    shared_noise: bool = False
    solver: str = "euler"
    eta: float | None = None
    record_means: bool = False


@dataclass
class UpdateBatch:
    """What one step's update reads, this rank's rows unless said otherwise.

    step: the training step; rollout: the sampled batch (masked rows zeroed); trained: the trained steps
    (indices into the rollout's steps, in denoising order); advantages: (B_local, columns); valid:
    (B_local,) mask of the samples to learn from; global_valid: (B,) the whole step's mask;
    minibatches: this rank's micro-batches of each minibatch and the minibatch's global sample indices;
    terms: the regulariser's per-piece loss terms (Clip-Cov, KL-Cov, the entropy bonus) or None.
    """

    step: int
    rollout: Rollout
    trained: list[int]
    advantages: torch.Tensor
    valid: torch.Tensor
    global_valid: torch.Tensor
    minibatches: list[tuple[list[torch.Tensor], torch.Tensor]]
    terms: LossTerms | None = None


@dataclass
class Learner:
    """What an update acts on: the policy, its optimizer and the run's processes."""

    cfg: Config
    policy: Policy
    optimizer: torch.optim.Optimizer
    dist: DistContext
    device: torch.device
    preemption: PreemptionHandler
    params: list[torch.nn.Parameter] = field(init=False)

    def __post_init__(self) -> None:
        # The optimizer's own parameter objects: FSDP2 swaps a module's parameters for unsharded views
        # between forwards, and only its sharded ones receive the gradients.
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]

    def step(self, mb_index: int, mb_loss: torch.Tensor, mb: torch.Tensor, global_valid: torch.Tensor,
             causes: list[str]) -> torch.Tensor | None:
        """Finish one minibatch whose gradients are accumulated: all-reduce its loss, clip the gradient
        norm and take the optimizer step, unless the loss or gradient is not finite or the minibatch (global
        sample indices `mb`) holds no valid sample; then the update is skipped (weights and optimizer
        moments untouched) and `causes` says why. The decision is the update's one host read
        (`pec.syncs`). Returns the gradient norm of an applied update, else None."""
        mb_loss = self.dist.all_reduce_(mb_loss.clone())
        grad_norm = plain_tensor(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm))
        mb_valid = global_valid[mb.to(self.device, non_blocking=True)].any()
        decision = torch.stack([mb_loss.isfinite(), grad_norm.isfinite(), mb_valid, global_valid.any()])
        with documented_sync():
            loss_ok, grad_ok, mb_has_valid, step_has_valid = decision.tolist()
        if not mb_has_valid:
            if not step_has_valid:
                causes.append(f"minibatch {mb_index}: no valid sample group (every group kept fewer than "
                              f"perceptual.k + 1 = {self.cfg.perceptual.k + 1} samples with a finite reward, "
                              f"image, features and log-probs)")
            return None
        if not (loss_ok and grad_ok):
            causes.append(f"minibatch {mb_index}: non-finite {'loss' if not loss_ok else 'gradient'}")
            return None
        self.preemption.commit()
        self.optimizer.step()
        return grad_norm


class Algorithm:
    """An RL algorithm behind the trainer's loop (see the module docstring)."""

    name: ClassVar[str] = ""
    provides: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, cfg: Config, learner: Learner) -> None:
        self.cfg = cfg
        self.learner = learner

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Raise ValueError, naming the option, for settings this algorithm cannot run with (called before
        any model loads)."""

    @classmethod
    def needs_reference(cls, cfg: Config) -> bool:
        """Whether this run's update evaluates the reference policy for a term of its own (beyond
        `--train.kl_beta`'s KL), so that full fine-tuning keeps the frozen base copy (`pec.policy.Policy`)."""
        return False

    def plan(self, step: int) -> RolloutPlan:
        """How step `step` samples (see `RolloutPlan`)."""
        raise NotImplementedError

    def sampling_policy(self) -> contextlib.AbstractContextManager[None]:
        """The policy the rollout samples with, as a context around the rollout: the current one by
        default (on-policy); DiffusionNFT samples with its old policy."""
        return contextlib.nullcontext()

    def columns(self, trained: list[int]) -> int:
        """Width of the step's shaped-reward and advantage arrays, given its trained steps."""
        raise NotImplementedError

    def update(self, batch: UpdateBatch) -> tuple[dict[str, Any], list[str]]:
        """The step's optimizer updates: (diagnostics as 0-dim device tensors or floats, causes of the
        updates that were skipped)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Extra checkpoint state (tensors and plain values only). Every rank calls it (gathering a sharded
        state is a collective); rank 0's is written."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` (an empty dict: a fresh run, or a checkpoint without this state)."""


AlgorithmFactory = Callable[[Config, Learner], Algorithm]
