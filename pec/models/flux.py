"""FLUX.1-dev (diffusers `FluxPipeline`) as a `FlowModel`, for training on GPUs.

From a diffusers folder (`--model.path /data/FLUX.1-dev`, or the hub id black-forest-labs/FLUX.1-dev:
`pec.hub`). What differs from SD3:
- Guidance-distilled: the guidance scale (`--model.guidance`, 3.5 as Flow-GRPO's FLUX configs) is an
  input of the transformer's guidance embedding; there is no CFG forward, so the sampler runs with
  `sampling.guidance_scale` 1 (one forward per step).
- Latents are packed 2x2: a (16, H/8, W/8) VAE latent is a sequence of (H/16)(W/16) tokens of 64
  channels, so `sample_shape` is (tokens, 64), with the image ids (0, row, col) per token and zero
  text ids, as `FluxPipeline` builds them.
- Prompts: CLIP-L's pooled embedding and T5's token embeddings.
- The sigma schedule: linspace(1, 1/N, N) under the dynamic shift mu = calculate_shift(tokens) from
  the scheduler config (`DiffusersFlowModel.schedule`), as `FluxPipeline` computes it.
- The VAE's shift and scale factors map latents to the VAE's space.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pec.models.base import PromptBatch, to_device
from pec.models.diffusers_model import DiffusersFlowModel, check_pipeline_folder, load_pipeline

FLUX_PIPELINES = ("FluxPipeline",)
FLUX_REQUIRED = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
# Flow-GRPO's FLUX LoRA targets (scripts/train_flux.py): attention projections of the double- and
# single-stream blocks, and the image and text feed-forwards of the double-stream blocks.
FLUX_LORA_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2"]


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, (h/2)(w/2), 4C): 2x2 patches as tokens, the layout of FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack_latents`: (B, (h/2)(w/2), 4C) -> (B, C, h, w)."""
    b, _, channels = tokens.shape
    x = tokens.reshape(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, h, w)


def image_ids(h: int, w: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
              ) -> torch.Tensor:
    """(h*w, 3) position ids (0, row, col) of the packed tokens of an h x w token grid."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


class FluxFlowModel(DiffusersFlowModel):
    """Wraps the components of a diffusers `FluxPipeline` (FLUX.1-dev).

    Args:
        pipeline: the FluxPipeline.
        resolution: image side in pixels (a multiple of 16).
        guidance: the distilled guidance scale fed to the guidance embedding (ignored by a
            transformer without one, e.g. FLUX.1-schnell).
        Other keyword arguments: see `DiffusersFlowModel`.
    """

    text_encoder_names = ("text_encoder", "text_encoder_2")
    lora_targets = FLUX_LORA_TARGETS

    def __init__(self, pipeline, resolution: int = 512, max_sequence_length: int = 512, guidance: float = 3.5,
                 **kwargs) -> None:
        super().__init__(pipeline, resolution=resolution, max_sequence_length=max_sequence_length, **kwargs)
        if guidance < 0:
            raise ValueError(f"--model.guidance must be >= 0, got {guidance}")
        self.check_resolution(self.vae_scale_factor * 2)
        self.guidance = float(guidance)
        self.latent_cells = resolution // self.vae_scale_factor
        channels = self.transformer.config.in_channels
        self.sample_shape = ((self.latent_cells // 2) ** 2, channels)
        self.register_buffer("img_ids", image_ids(self.latent_cells // 2, self.latent_cells // 2), persistent=False)

    @property
    def image_seq_len(self) -> int:
        """Packed image tokens (what the dynamic shift reads)."""
        return self.sample_shape[0]

    @classmethod
    def check_path(cls, path: str | None, revision: str | None = None) -> Path:
        """ValueError (naming --model.path) unless `path` (a local folder, or a hub id at `revision`) is a FLUX
        diffusers folder; its local folder."""
        return check_pipeline_folder(path, model_name="flux", pipeline_classes=FLUX_PIPELINES,
                                     transformer_class="FluxTransformer2DModel", required=FLUX_REQUIRED,
                                     revision=revision)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str | torch.dtype = torch.bfloat16, device: str = "cuda",
                        resolution: int = 512, empty_transformer: bool = False, revision: str | None = None,
                        **kwargs) -> FluxFlowModel:
        """Load a FLUX.1 checkpoint directory (diffusers layout): a local folder, or a hub id at `revision`
        (`pec.hub`). With `empty_transformer` the transformer is built on the meta device, unread (full
        fine-tuning on several processes: `pec.distributed.load_sharded_transformer` loads its shards)."""
        from diffusers import FluxPipeline

        folder = cls.check_path(path, revision)
        pipe = load_pipeline(FluxPipeline, folder, dtype, empty_transformer=empty_transformer)
        model = cls(pipe, resolution=resolution, **kwargs)
        return to_device(model, device)  # the transformer and the VAE; text encoders move when they encode

    def _encode(self, prompts: list[str], device: torch.device) -> PromptBatch:
        """T5 token embeddings and CLIP-L's pooled embedding ("" encodes like any prompt)."""
        embeds, pooled, _ = self.pipeline.encode_prompt(prompt=prompts, prompt_2=prompts, device=device,
                                                        max_sequence_length=self.max_sequence_length)
        return PromptBatch(embeds, pooled)

    def transformer_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The transformer's `timestep` for flow times `sigma`, as FluxPipeline and Flux2Pipeline /
        Flux2KleinPipeline (and Flow-GRPO's FLUX sampler) pass it, bit for bit: t.to(latents dtype) / 1000
        with t = sigma * num_train_timesteps the scheduler's float32 timestep. Those pipelines round t, not
        sigma, to their latents' dtype (the weights' dtype), so sigma.to(dtype) would differ from it in the
        last bit at about a quarter of the steps in bfloat16. The transformers scale it by 1000 themselves."""
        scale = self.scheduler_config["num_train_timesteps"]
        return (sigma.float() * scale).to(self.transformer.dtype) / scale

    def distilled_guidance(self, batch: int, device: torch.device) -> torch.Tensor:
        """The guidance-embedding input as FluxPipeline and Flux2Pipeline pass it: `guidance` in float32."""
        return torch.full((batch,), self.guidance, device=device, dtype=torch.float32)

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, prompts: PromptBatch) -> torch.Tensor:
        """The transformer's prediction on packed latents (B, tokens, 64); float32 out.

        The timestep and the guidance are FluxPipeline's, bit for bit (`transformer_timestep`,
        `distilled_guidance`; FLUX's transformer scales both by 1000 itself, so it gets them in [0, 1]).
        """
        dtype = self.transformer.dtype
        guidance = (self.distilled_guidance(latents.shape[0], latents.device)
                    if self.transformer.config.guidance_embeds else None)
        timestep = self.transformer_timestep(sigma)
        txt_ids = torch.zeros(prompts.embeds.shape[1], 3, device=latents.device, dtype=dtype)
        return self.transformer(hidden_states=latents.to(dtype), timestep=timestep, guidance=guidance,
                                pooled_projections=prompts.pooled.to(dtype),
                                encoder_hidden_states=prompts.embeds.to(dtype), txt_ids=txt_ids,
                                img_ids=self.img_ids.to(dtype), return_dict=False)[0].float()

    def _to_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return unpack_latents(latents, self.latent_cells, self.latent_cells)
