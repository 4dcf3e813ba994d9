"""The trainable policy: a FlowModel with LoRA adapters or fully trainable, and its KL reference.

Shared by the trainer and the evaluator, so that a run's checkpoint always loads into the model it
was trained on. Models are built by name (`--model.name`) from `pec.models.MODELS`.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pec.checkpoint import config_mismatch
from pec.config import Config, to_dict
from pec.distributed import (full_model_state, full_optimizer_state, load_full_model_state, load_full_optimizer_state,
                             load_sharded_transformer, replicate_transformer, reshard, uniform_trainable_dtype)
from pec.models import MODELS
from pec.models.base import FlowModel

# Config fields a checkpoint must share with the run that loads it (they fix the trainable state and the base
# weights it applies to: model.revision is the commit a hub id resolved to, `pec.models.check_model_config`).
STATE_KEYS = ("model.name", "model.path", "model.revision", "train.lora", "train.lora_rank", "train.lora_alpha")


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)

class Policy:
    """The model being trained, which parameters train, and how to evaluate the KL reference.

    With LoRA (peft through diffusers' adapter API) only the adapters train and the reference is the
    same network with the adapters disabled; with full fine-tuning the transformer trains and the
    reference is a frozen copy (made only when a KL term needs it). A regulariser may instead make the
    reference a copy of the policy that it resets along training (`track_reference`, GARDO's): the
    reference is then the model holding those values (`holding`).

    Memory with several processes: with LoRA every rank loads the whole base model (frozen, as with one
    process) and DDP averages the adapters' gradients. With full fine-tuning no rank ever holds a whole
    transformer: the model is built with its transformer on the meta device, FSDP2 shards it block by block
    and each rank reads only its rows of the weights (`pec.distributed.load_sharded_transformer`); the KL
    reference is a copy of the still-empty transformer, sharded, loaded and frozen the same way. A rank
    then holds 1/W of the policy (and of the reference), plus one block gathered at a time in a forward.
    """

    def __init__(self, cfg: Config, device: torch.device, shard: bool = False, reference: bool = False) -> None:
        """Build the model named by `cfg.model`; `shard` (several processes) puts the transformer under
        DDP for LoRA (`pec.distributed.replicate_transformer`) or, for full fine-tuning, loads it and the
        KL reference's shard by shard under FSDP2 (`pec.distributed.load_sharded_transformer`). Full
        fine-tuning keeps the frozen reference copy when `--train.kl_beta` > 0 or `reference` asks for it
        (an algorithm's own pull toward the base model, e.g. DiffusionNFT's velocity penalty)."""
        self.lora = cfg.train.lora
        # The checkpoint whose weights were loaded (step, file): set by `pec.evaluate.load_policy`, None for
        # the base model; what `pec.export` records.
        self.checkpoint: tuple[int, Path] | None = None
        self.sharded = shard and not self.lora  # FSDP2 (full fine-tuning on several processes)
        self.replicated = shard and self.lora  # DDP over the adapters
        if self.sharded:
            self.model = MODELS.build_with_options(cfg.model.name, {"empty_transformer": True}, cfg=cfg.model,
                                                   device=device)
            if not any(p.is_meta for p in self.model.transformer.parameters()):
                raise ValueError(f"--model.name {cfg.model.name}: its loader cannot build the transformer empty "
                                 f"(empty_transformer), which full fine-tuning on several processes needs so that "
                                 f"no rank holds the whole model; use --train.lora true or one process")
        else:
            self.model = MODELS.build(cfg.model.name, cfg=cfg.model, device=device)
        self.model.requires_grad_(False)
        self._reference: FlowModel | None = None
        transformer = self.model.transformer
        if self.lora:
            if not hasattr(transformer, "add_adapter"):
                raise ValueError(f"--train.lora needs a transformer with diffusers' adapter API (add_adapter); "
                                 f"{type(transformer).__name__} has none: use --train.lora false")
            from peft import LoraConfig

            # Flow-GRPO's targets, per model (FlowModel.lora_targets: SD3's or FLUX's).
            transformer.add_adapter(LoraConfig(r=cfg.train.lora_rank, lora_alpha=cfg.train.lora_alpha,
                                               init_lora_weights="gaussian",
                                               target_modules=list(self.model.lora_targets)))
            for name, p in transformer.named_parameters():
                p.requires_grad_("lora_" in name)
        else:
            transformer.requires_grad_(True)
            if self.sharded:
                uniform_trainable_dtype(transformer)  # FSDP2's rule (Wan's float32 modules): see there
            if cfg.train.kl_beta > 0 or reference:
                # Sharded, the transformer is still empty here: the copy allocates nothing.
                self._reference = copy.deepcopy(self.model).requires_grad_(False)
        if self.sharded:
            for model in (self.model, self._reference):
                if model is not None:
                    load_sharded_transformer(model, torch.device(device))
        else:
            self.model.to(device)
        if self.replicated:
            replicate_transformer(self.model.transformer)
        if cfg.model.compile:
            # In place (nn.Module.compile): the adapters' and diffusers' attributes stay reachable.
            self.model.transformer.compile()
        # The trainable parameters as the optimizer gets them (under FSDP2 the sharded ones, which a forward
        # swaps for unsharded views), and the values of a tracked reference (`track_reference`).
        self.params = self.trainable_parameters()
        self._tracked: list[torch.Tensor] | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """State of the trainable parameters only (what a checkpoint needs), whole and on the CPU, the
        same with any number of processes (a collective every rank joins when sharded)."""
        return full_model_state(self.model)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """`optimizer`'s state keyed by parameter name, whole and on the CPU (see `trainable_state`)."""
        return full_optimizer_state(self.model, optimizer)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load an `optimizer_state` (sharded again where the model is)."""
        load_full_optimizer_state(self.model, optimizer, state)

    def gradient_sync(self, enabled: bool) -> None:
        """With several processes, whether the next backward reduces gradients over ranks (off while
        micro-batches accumulate, on for a minibatch's last); a no-op with one process.

        DDP (LoRA) follows it. FSDP2 (full fine-tuning) reduce-scatters every backward whatever `enabled`:
        skipping it would accumulate unsharded gradients, a whole model's gradient on every rank, which is
        what sharding avoids; the gradients accumulate sharded instead (more communication, same sum)."""
        if self.replicated:
            self.model.transformer.set_requires_gradient_sync(enabled)

    def check_checkpoint(self, payload: dict[str, Any], cfg: Config) -> None:
        """Raise ValueError unless the checkpoint `payload` fits this policy built from `cfg`: the same
        `STATE_KEYS` in its config, and the same trainable parameters with the same shapes. `--resume`
        and `pec.evaluate` both skip a checkpoint that fails it (e.g. one of another LoRA rank)."""
        mismatch = config_mismatch(payload["config"], to_dict(cfg), STATE_KEYS)
        if mismatch:
            raise ValueError(f"does not match this run's config: {mismatch}")
        expected = {n: tuple(p.shape) for n, p in self.model.named_parameters() if p.requires_grad}
        if {n: tuple(t.shape) for n, t in payload["model"].items()} != expected:
            raise ValueError("its trainable parameters do not match this model's")

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a `trainable_state`; every trainable parameter must be present."""
        params = dict(self.model.named_parameters())
        expected = {n for n, p in params.items() if p.requires_grad}
        if set(state) != expected:
            raise ValueError(f"checkpoint does not match the model: missing {sorted(expected - set(state))[:3]}, "
                             f"unexpected {sorted(set(state) - expected)[:3]} (was it trained with other "
                             f"--train.lora / --model options?)")
        load_full_model_state(self.model, state)

    @contextlib.contextmanager
    def holding(self, values: Sequence[torch.Tensor]) -> Iterator[None]:
        """Within the context the trainable parameters (`params`) hold `values` (one tensor like each, e.g.
        DiffusionNFT's old policy); on exit they hold theta again, bit for bit (in-place copies: FSDP2's shards
        and DDP's parameters stay the same tensors)."""
        with torch.no_grad():
            stash = [p.detach().clone() for p in self.params]
        self._write(values)
        try:
            yield
        finally:
            self._write(stash)

    def _write(self, values: Sequence[torch.Tensor]) -> None:
        """Copy `values` into the trainable parameters. Under FSDP2 the parameters are this rank's shards, and
        the root module keeps its gathered parameters after a forward: drop them, or the next forward would
        run on the values from before the copy."""
        with torch.no_grad():
            for p, value in zip(self.params, values):
                p.copy_(value)
        if self.sharded:
            reshard(self.model.transformer)

    def values_state(self, values: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """`values` of the trainable parameters as a `trainable_state` (by name, whole, on the CPU; a
        collective under FSDP2: every rank calls it)."""
        with self.holding(values):
            return self.trainable_state()

    def load_values_state(self, values: Sequence[torch.Tensor], state: dict[str, torch.Tensor]) -> None:
        """Load a `values_state` into `values` (sharded again where the parameters are)."""
        with self.holding(values):
            self.load_trainable_state(state)
            with torch.no_grad():
                for value, p in zip(values, self.params):
                    value.copy_(p)

    def track_reference(self) -> list[torch.Tensor]:
        """Make the reference a copy of the policy as it is now: from here on `reference()` gives the model
        holding these values (adapters enabled), which `reset_reference` moves to the policy. Returns them
        (for a checkpoint: `values_state`, `load_values_state`)."""
        with torch.no_grad():
            self._tracked = [p.detach().clone() for p in self.params]
        return self._tracked

    def reset_reference(self, flag: torch.Tensor) -> None:
        """Where the 0-dim bool `flag` is true, the tracked reference becomes the policy (a copy of theta); the
        flag stays on the device (no host read). Only after `track_reference`."""
        if self._tracked is None:
            raise ValueError("reset_reference needs a tracked reference: call track_reference first")
        with torch.no_grad():
            for value, p in zip(self._tracked, self.params):
                local, current = _local(value), _local(p)
                local.copy_(torch.where(flag, current, local))

    @contextlib.contextmanager
    def reference(self) -> Iterator[FlowModel]:
        """Context giving the reference model: the model holding the tracked reference (`track_reference`),
        else adapters disabled (LoRA) or the frozen copy."""
        if self._tracked is not None:
            with self.holding(self._tracked):
                yield self.model
        elif self.lora:
            self.model.transformer.disable_adapters()
            try:
                yield self.model
            finally:
                self.model.transformer.enable_adapters()
        else:
            if self._reference is None:
                raise ValueError("full fine-tuning keeps a reference copy only when --train.kl_beta > 0 or the "
                                 "algorithm needs one")
            yield self._reference


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 parameter (a DTensor), written in place through; `t` otherwise."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def latent_dim(model: FlowModel) -> int:
    """Number of elements D of one latent (the dimension of each step's Gaussian policy)."""
    n = 1
    for s in model.sample_shape:
        n *= s
    return n
