"""The interface every text-to-image flow model implements for the trainer and the evaluator.

Kept deliberately small, in the spirit of diffusers' split between models, schedulers and pipelines:
a `FlowModel` owns the networks (prompt encoder, transformer, decoder) and answers three questions:
how to encode prompts, what velocity the transformer predicts, and how to turn latents into images.
Sampling (the SDE steps and their log-probabilities) lives in `pec.sampling` on top of
`pec_kernels`, and is shared by the embedded model and real SD3.5 / FLUX models.

Conventions (DESIGN.md §2): flow time sigma in [0, 1], sigma = 1 pure noise,
x_sigma = (1 - sigma) * x0 + sigma * eps, and `velocity` predicts v ~ eps - x0.
"""
from __future__ import annotations

import abc
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pec.models.schedules import schedule_sigmas


@dataclass
class PromptBatch:
    """Encoded prompts, one row per sample: token embeddings, and what the model's transformer also takes.

    SD3 and FLUX give a pooled embedding and pad every prompt to the same token count (`mask` None);
    Qwen-Image gives no pooled embedding (`pooled` None) and prompts of different token counts, so a
    batch of them is right-padded with zeros to a common length and `mask` marks the real tokens.
    """

    embeds: torch.Tensor  # (B, L, D_text)
    pooled: torch.Tensor | None = None  # (B, D_pooled), or None for a model without one
    mask: torch.Tensor | None = None  # (B, L) bool, True at real tokens; None: every token is real

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def _map(self, fn) -> PromptBatch:
        return PromptBatch(*(None if t is None else fn(t) for t in (self.embeds, self.pooled, self.mask)))

    def index(self, idx: torch.Tensor | slice) -> PromptBatch:
        """Rows `idx` of the batch (for micro-batching)."""
        return self._map(lambda t: t[idx])

    def repeat_interleave(self, repeats: int) -> PromptBatch:
        """Each row `repeats` times in a row (one prompt -> a group of samples)."""
        return self._map(lambda t: t.repeat_interleave(repeats, 0))

    def to(self, device: str | torch.device, non_blocking: bool = False) -> PromptBatch:
        """The batch on `device`."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def row(self, i: int) -> PromptBatch:
        """Row `i` alone (a batch of one) without its right padding: the unit a prompt cache keeps.

        Reads the mask's count on the host (a synchronisation on a GPU): for encoding time, not sampling.
        """
        if self.mask is None:
            return self.index(slice(i, i + 1))
        n = int(self.mask[i].sum())
        if not bool(self.mask[i, :n].all()):
            raise ValueError("PromptBatch.row needs right-padded rows (real tokens first, then padding)")
        return PromptBatch(self.embeds[i:i + 1, :n], None if self.pooled is None else self.pooled[i:i + 1])

    @staticmethod
    def cat(batches: Sequence[PromptBatch]) -> PromptBatch:
        """Concatenate batches along the batch dimension (e.g. [uncond, cond] for CFG).

        Batches of different token counts are right-padded with zeros to the longest, with a mask that
        marks the real tokens; batches of one token count without masks concatenate as they are.
        """
        if not batches:
            raise ValueError("PromptBatch.cat needs at least one batch")
        pooled = [b.pooled for b in batches]
        if any(p is None for p in pooled) and not all(p is None for p in pooled):
            raise ValueError("PromptBatch.cat: either every batch has a pooled embedding or none has")
        pooled = None if pooled[0] is None else torch.cat(pooled)
        length = max(b.embeds.shape[1] for b in batches)
        if all(b.mask is None and b.embeds.shape[1] == length for b in batches):
            return PromptBatch(torch.cat([b.embeds for b in batches]), pooled)
        embeds, masks = [], []
        for b in batches:
            pad = length - b.embeds.shape[1]
            mask = b.mask if b.mask is not None else torch.ones(b.embeds.shape[:2], dtype=torch.bool,
                                                                  device=b.embeds.device)
            embeds.append(torch.nn.functional.pad(b.embeds, (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(mask.bool(), (0, pad), value=False))
        return PromptBatch(torch.cat(embeds), pooled, torch.cat(masks))


@dataclass(frozen=True)
class WeightFiles:
    """Where one network's weights lie on disk: its safetensors files, and the prefix of its tensors' names
    in them (e.g. "transformer." where the file holds a whole FlowModel's state)."""

    files: tuple[Path, ...]
    prefix: str = ""


def to_device(module: nn.Module, device: str | torch.device) -> nn.Module:
    """`module.to(device)`, except for parameters on the meta device, which stay there: a transformer built
    empty (`empty_transformer=True`) has no data to move; its shards load after FSDP2 shards it. The rest
    (VAE, prompt encoder, buffers) moves as `to` moves it (`_apply` is what `nn.Module.to` runs)."""
    return module._apply(lambda t: t if t.is_meta else t.to(device))


# Flow-GRPO's LoRA targets for SD3 (and the embedded SD3 backbone): the joint-attention projections.
SD3_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


class FlowModel(nn.Module, abc.ABC):
    """A flow-matching text-to-image model as the trainer sees it.

    Attributes:
        transformer: the denoising network; LoRA adapters and full fine-tuning target it.
        sample_shape: shape of one latent, e.g. (1, 8, 8) for the embedded digits model,
            (16, 64, 64) for SD3.5 at 512 px, (1024, 64) for FLUX at 512 px (packed 2x2 tokens) or
            (16, 21, 60, 60) for Wan at 81 frames of 480 px (C, F, H, W video latents).
        lora_targets: module names LoRA adapters attach to (peft `target_modules`).
        cfg_renorm: after CFG, rescale the combined velocity to the conditional velocity's norm per
            token (Qwen-Image's true CFG): the sampler passes it to `guided_sde_step(cfg_renorm=...)`.

    Experts: a model may denoise with several networks, one per range of sigma (Wan2.2 A14B: a high-noise
    and a low-noise transformer, each with its own CFG scale). Three hooks say which runs at a step; their
    defaults are those of a single-expert model, and the sampler calls them as
    `i = model.expert_at(sigma)`, then `with model.use_expert(i): model.velocity(...)` combined with CFG
    scale `model.expert_guidance_scale(i, guidance_scale)`:
        expert_at(sigma): the expert of a step, from its host-side sigma (a Python float, so that choosing
            never reads a device value);
        use_expert(i): a context manager under which `velocity` runs expert i;
        expert_guidance_scale(i, guidance_scale): expert i's CFG scale given the sampler's.
    """

    transformer: nn.Module
    sample_shape: tuple[int, ...]
    lora_targets: list[str] = SD3_LORA_TARGETS
    cfg_renorm: bool = False
    # How many rows `decode` decodes together: it splits a batch into chunks of this many from the first row, and
    # a row's image may depend on its chunk (BLAS rounds a row by its batch). 1: each row alone (any split gives
    # the same images); None: the whole batch at once (the default: no split is assumed exact). The sampler's
    # per-micro-batch decoding (`pec.sampling.sample(on_decoded=...)`) decodes these same chunks.
    decode_chunk: int | None = None

    def schedule(self, num_steps: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """The (num_steps + 1,) float32 sigmas the sampler uses, from 1 down to a terminal 0.

        The default is the unshifted flow-matching schedule of the embedded model; diffusers models
        take the shift their scheduler config gives (SD3: static, FLUX: dynamic in the image size).
        """
        return schedule_sigmas(num_steps, device=device)

    def transformer_weights(self) -> dict[str, WeightFiles]:
        """Where the weights of `transformer` lie on disk, for loading it shard by shard after building it
        empty (`from_pretrained(..., empty_transformer=True)`, then `pec.distributed.load_sharded_transformer`):
        for each network (its name in `transformer`, "" for the transformer itself; Wan2.2 A14B: "experts.0"
        and "experts.1"), its files. A model that cannot load so raises ValueError (the default)."""
        raise ValueError(f"{type(self).__name__} cannot load its transformer shard by shard (no weight files "
                         f"known): full fine-tuning on several processes needs a model loaded from a folder")

    def expert_at(self, sigma: float) -> int:
        """The index of the expert that denoises at host-side flow time `sigma` (0: a single expert)."""
        return 0

    def use_expert(self, index: int) -> contextlib.AbstractContextManager[None]:
        """A context under which `velocity` runs expert `index` (a single expert: nothing to switch)."""
        return contextlib.nullcontext()

    def expert_guidance_scale(self, index: int, guidance_scale: float) -> float:
        """The CFG scale of expert `index` when the sampler's is `guidance_scale` (a single expert: the same)."""
        return guidance_scale

    @abc.abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> PromptBatch:
        """Encode prompts; the empty string "" is the null prompt used for classifier-free guidance."""

    @abc.abstractmethod
    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, prompts: PromptBatch) -> torch.Tensor:
        """Predicted velocity v ~ eps - x0 for `latents` (B, *sample_shape) at flow times `sigma` (B,).

        Timestep rule, for every adapter: `sigma` arrives in float32 (the schedule's values), and the
        adapter computes the transformer's `timestep` (and any guidance input) from it exactly as the
        model's diffusers pipeline does, bit for bit: in float32 as the pipeline passes it, never rounded
        to the weights' dtype unless the pipeline itself rounds it there. SD3: sigma * num_train_timesteps
        in float32 (the scheduler's timesteps); FLUX: FluxPipeline's t.to(latents dtype) / 1000 and a
        float32 guidance. A test checks each adapter against its pipeline in bfloat16 with torch.equal
        (float32 hides the rounding).
        """

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] (not clamped, so gradients pass), differentiable in `latents`; a video
        model returns frames (B, F, C, H, W)."""
