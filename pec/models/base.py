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

import torch
from torch import nn

from pec.models.schedules import schedule_sigmas


@dataclass
class PromptBatch:
    """Encoded prompts, one row per sample: token embeddings and a pooled embedding."""

    embeds: torch.Tensor  # (B, L, D_text)
    pooled: torch.Tensor  # (B, D_pooled)

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def index(self, idx: torch.Tensor | slice) -> PromptBatch:
        """Rows `idx` of the batch (for micro-batching)."""
        return PromptBatch(self.embeds[idx], self.pooled[idx])

    def repeat_interleave(self, repeats: int) -> PromptBatch:
        """Each row `repeats` times in a row (one prompt -> a group of samples)."""
        return PromptBatch(self.embeds.repeat_interleave(repeats, 0), self.pooled.repeat_interleave(repeats, 0))

    @staticmethod
    def cat(batches: Sequence[PromptBatch]) -> PromptBatch:
        """Concatenate batches along the batch dimension (e.g. [uncond, cond] for CFG)."""
        return PromptBatch(torch.cat([b.embeds for b in batches]), torch.cat([b.pooled for b in batches]))


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

    def schedule(self, num_steps: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """The (num_steps + 1,) float32 sigmas the sampler uses, from 1 down to a terminal 0.

        The default is the unshifted flow-matching schedule of the embedded model; diffusers models
        take the shift their scheduler config gives (SD3: static, FLUX: dynamic in the image size).
        """
        return schedule_sigmas(num_steps, device=device)

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
