"""Stable Diffusion 3 / 3.5 (diffusers) as a `FlowModel`, for training on GPUs.

The weights are never downloaded here: pass a local directory (`--model.path /data/sd3.5-medium`) or an
already-built `StableDiffusion3Pipeline`. The trainer talks to it exactly as to the embedded model:
SD3's transformer predicts v = eps - x0 in the same flow convention (DESIGN.md §2), its latents are
the VAE's scaled latents, and `decode` runs the VAE.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from pec.models.base import FlowModel, PromptBatch


class SD3FlowModel(FlowModel):
    """Wraps the components of a diffusers `StableDiffusion3Pipeline` (SD3-Medium, SD3.5-Medium/Large)."""

    def __init__(self, pipeline, resolution: int = 512, max_sequence_length: int = 256) -> None:
        super().__init__()
        self.pipeline = pipeline
        self.transformer = pipeline.transformer
        self.vae = pipeline.vae
        scale = pipeline.vae_scale_factor
        if resolution % (scale * pipeline.transformer.config.patch_size):
            raise ValueError(f"resolution must be a multiple of {scale * pipeline.transformer.config.patch_size}, "
                             f"got {resolution}")
        self.sample_shape = (pipeline.transformer.config.in_channels, resolution // scale, resolution // scale)
        self.max_sequence_length = max_sequence_length
        # The text encoders and the VAE are frozen; only the transformer is trained.
        for module in (pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2, pipeline.text_encoder_3):
            if module is not None:
                module.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.bfloat16, device: str = "cuda",
                        resolution: int = 512) -> SD3FlowModel:
        """Load a local SD3/SD3.5 checkpoint directory (diffusers layout); nothing is fetched from a hub."""
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
        return cls(pipe.to(device), resolution=resolution)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptBatch:
        """Encode with SD3's CLIP-L, CLIP-G (and T5 when present); "" is the null prompt for CFG."""
        prompts = list(prompts)
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=prompts, prompt_3=prompts, device=self.transformer.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return PromptBatch(embeds.to(self.transformer.dtype), pooled.to(self.transformer.dtype))

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, prompts: PromptBatch) -> torch.Tensor:
        """SD3's transformer takes timesteps in [0, 1000] (sigma * num_train_timesteps)."""
        timestep = sigma.to(latents.dtype) * self.pipeline.scheduler.config.num_train_timesteps
        return self.transformer(hidden_states=latents.to(self.transformer.dtype), timestep=timestep,
                                encoder_hidden_states=prompts.embeds, pooled_projections=prompts.pooled,
                                return_dict=False)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-decode scaled latents into images in [0, 1] (unclamped, differentiable)."""
        config = self.vae.config
        latents = latents.to(self.vae.dtype) / config.scaling_factor + config.shift_factor
        images = self.vae.decode(latents, return_dict=False)[0]
        return (images.float() + 1) / 2
