"""Stable Diffusion 3 / 3.5 (diffusers) as a `FlowModel`, for training on GPUs.

Pass a local directory (`--model.path /data/sd3.5-medium`), a hub id resolved through huggingface_hub's
cache (`--model.path stabilityai/stable-diffusion-3.5-medium`, `pec.hub`) or an already-built
`StableDiffusion3Pipeline`. The trainer talks to it exactly as to the embedded model:
SD3's transformer predicts v = eps - x0 in the same flow convention (DESIGN.md §2), its latents are
the VAE's scaled latents (16, H/8, W/8), `decode` runs the VAE, and the sigma schedule carries the
shift of the folder's scheduler config (3.0 for SD3.5). The full pipeline's three text encoders
(CLIP-L, CLIP-G, T5-XXL) encode prompts; T5 is optional (`--model.t5 false` drops it, as SD3 allows).
"""
from __future__ import annotations

from pathlib import Path

import torch

from pec.models.base import PromptBatch, to_device
from pec.models.diffusers_model import DiffusersFlowModel, check_pipeline_folder, load_pipeline

SD3_PIPELINES = ("StableDiffusion3Pipeline",)
SD3_REQUIRED = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


class SD3FlowModel(DiffusersFlowModel):
    """Wraps the components of a diffusers `StableDiffusion3Pipeline` (SD3-Medium, SD3.5-Medium/Large).

    Keyword arguments: see `DiffusersFlowModel`.
    """

    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def __init__(self, pipeline, resolution: int = 512, max_sequence_length: int = 256, **kwargs) -> None:
        super().__init__(pipeline, resolution=resolution, max_sequence_length=max_sequence_length, **kwargs)
        self.check_resolution(self.vae_scale_factor * self.transformer.config.patch_size)
        cells = resolution // self.vae_scale_factor
        self.sample_shape = (self.transformer.config.in_channels, cells, cells)

    @classmethod
    def check_path(cls, path: str | None, t5: bool = True, revision: str | None = None) -> Path:
        """ValueError (naming --model.path) unless `path` (a local folder, or a hub id at `revision`) is an SD3
        diffusers folder; its local folder."""
        required = SD3_REQUIRED + (("text_encoder_3", "tokenizer_3") if t5 else ())
        try:
            return check_pipeline_folder(path, model_name="sd3", pipeline_classes=SD3_PIPELINES,
                                         transformer_class="SD3Transformer2DModel", required=required,
                                         revision=revision)
        except ValueError as err:
            if t5 and "text_encoder_3" in str(err):
                raise ValueError(f"{err}; run without T5 with --model.t5 false") from None
            raise

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str | torch.dtype = torch.bfloat16, device: str = "cuda",
                        resolution: int = 512, t5: bool = True, empty_transformer: bool = False,
                        revision: str | None = None, **kwargs) -> SD3FlowModel:
        """Load an SD3/SD3.5 checkpoint directory (diffusers layout): a local folder, or a hub id at `revision`
        from huggingface_hub's cache (fetched there unless offline: `pec.hub`).

        The transformer and VAE go to `device`; the text encoders go there to encode (and stay with
        text_encoders='gpu', or return to the CPU with 'offload'). With `empty_transformer` the transformer
        is built on the meta device, unread (full fine-tuning on several processes:
        `pec.distributed.load_sharded_transformer` loads its shards).
        """
        from diffusers import StableDiffusion3Pipeline

        folder = cls.check_path(path, t5, revision)
        extra = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
        pipe = load_pipeline(StableDiffusion3Pipeline, folder, dtype, empty_transformer=empty_transformer, **extra)
        model = cls(pipe, resolution=resolution, **kwargs)
        return to_device(model, device)  # the transformer and the VAE; text encoders move when they encode

    def _encode(self, prompts: list[str], device: torch.device) -> PromptBatch:
        """SD3's CLIP-L, CLIP-G (and T5 when present); "" is the null prompt for CFG."""
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=prompts, prompt_3=prompts, device=device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return PromptBatch(embeds, pooled)

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, prompts: PromptBatch) -> torch.Tensor:
        """SD3's transformer takes timesteps in [0, 1000]: sigma * num_train_timesteps in float32, exactly the
        scheduler's timesteps StableDiffusion3Pipeline passes (never rounded to the weights' dtype: bf16
        moves them by up to 2.65 of the 1000 timesteps at 10 steps). Float32 out."""
        dtype = self.transformer.dtype
        timestep = sigma.float() * self.scheduler_config["num_train_timesteps"]
        return self.transformer(hidden_states=latents.to(dtype), timestep=timestep,
                                encoder_hidden_states=prompts.embeds.to(dtype),
                                pooled_projections=prompts.pooled.to(dtype), return_dict=False)[0].float()

    def _to_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

