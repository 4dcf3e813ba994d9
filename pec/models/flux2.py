"""FLUX.2 dev and klein (diffusers `Flux2Pipeline` / `Flux2KleinPipeline`) as a `FlowModel`.

One model name, `flux2`: the folder's model_index.json says which pipeline it is, and that decides the rest.
- dev (`Flux2Pipeline`, 32B): guidance-distilled like FLUX.1-dev: `--model.guidance` goes into the
  transformer's guidance embedding (the pipeline's default is 4.0), no CFG forward (sampling.guidance_scale 1).
  Prompts: a Mistral-Small-3.1 (Mistral3ForConditionalGeneration) under FLUX.2's system message and chat
  template, hidden states of layers 10, 20 and 30 stacked per token.
- klein (`Flux2KleinPipeline`, 4B / 9B): no guidance embedding (the transformer gets guidance=None). A
  Qwen3 text encoder under its chat template (no thinking), hidden states of layers 9, 18 and 27. Two kinds,
  told apart by model_index.json's `is_distilled`: FLUX.2-klein-4B/9B are step-distilled (4 steps; the
  pipeline ignores CFG, so sampling.guidance_scale must be 1) and FLUX.2-klein-base-4B/9B use true CFG with
  the empty prompt as negative (the pipeline's default scale 4.0): neg + g (cond - neg), which is the
  sampler's CFG with "" as its null prompt.
What both share with FLUX.1 (`FluxFlowModel`, reused): 2x2-packed latents, so `sample_shape` is (tokens,
128) for FLUX.2's 32 latent channels, token for token FLUX.1's packing (FLUX.2 patchifies to (B, 128, h/2, w/2)
and flattens the grid; the channels come out in the same (c, 2, 2) order); the transformer's timestep
(t.to(dtype) / 1000) and the float32 distilled guidance. What differs:
- position ids have 4 axes: (0, row, col, 0) per image token and (0, 0, 0, l) per text token, built by the
  pipelines' own `_prepare_latent_ids` / `_prepare_text_ids` (int64, as they pass them: text positions up to
  512 are not exact in bfloat16);
- no pooled prompt embedding (`PromptBatch.pooled` is (B, 0));
- the sigma schedule: linspace(1, 1/N, N) under mu = compute_empirical_mu(tokens, N), an empirical fit that
  depends on the step count too (not FLUX.1's calculate_shift);
- the VAE (AutoencoderKLFlux2) has no scaling/shift factors: the pipelines undo its batch-norm statistics,
  z * sqrt(running_var + eps) + running_mean on the 128 patchified channels, then unpatchify and decode.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pec.models.base import PromptBatch, to_device
from pec.models.diffusers_model import check_pipeline_folder, load_pipeline
from pec.models.flux import FluxFlowModel

FLUX2_PIPELINES = ("Flux2Pipeline", "Flux2KleinPipeline")
FLUX2_REQUIRED = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
FLUX2_VARIANTS = ("dev", "klein", "klein-base")
# Flow-Factory's FLUX.2 LoRA targets (`default_target_modules` of models/flux/flux2.py and flux2_klein.py, the
# same list): the double-stream blocks' attention projections and SwiGLU feed-forwards, and the single-stream
# blocks' fused QKV+MLP input projection. (Their list names "attn.to_out.0" for the single blocks too, but
# there `to_out` is a plain Linear, so that name matches the double-stream blocks only, here as there.)
FLUX2_LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                      "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
                      "ff_context.linear_out", "attn.to_qkv_mlp_proj"]


def flux2_variant(index: dict) -> str:
    """'dev', 'klein' (step-distilled: no CFG) or 'klein-base' (true CFG) from a model_index.json's contents."""
    if index["_class_name"] == "Flux2Pipeline":
        return "dev"
    return "klein" if index.get("is_distilled", False) else "klein-base"


class Flux2FlowModel(FluxFlowModel):
    """Wraps the components of a diffusers `Flux2Pipeline` (FLUX.2-dev) or `Flux2KleinPipeline` (FLUX.2-klein).

    Args:
        pipeline: the Flux2Pipeline or Flux2KleinPipeline.
        resolution: image side in pixels (a multiple of 16).
        max_sequence_length: text tokens per prompt (the pipelines pad every prompt to it; their default 512).
        guidance: dev's distilled guidance scale (ignored by klein, whose pipeline passes no guidance).
        Other keyword arguments: see `DiffusersFlowModel`.
    """

    text_encoder_names = ("text_encoder",)
    lora_targets = FLUX2_LORA_TARGETS

    def __init__(self, pipeline, resolution: int = 512, max_sequence_length: int = 512, guidance: float = 4.0,
                 **kwargs) -> None:
        super().__init__(pipeline, resolution=resolution, max_sequence_length=max_sequence_length,
                         guidance=guidance, **kwargs)
        self.variant = flux2_variant({**dict(pipeline.config), "_class_name": type(pipeline).__name__})
        cells = self.latent_cells // 2
        # FLUX.1's 3-axis image ids replaced by the pipeline's 4-axis ones; the text ids cover the padded prompt.
        self.img_ids = pipeline._prepare_latent_ids(torch.empty(1, 0, cells, cells))[0]
        self.register_buffer("txt_ids", pipeline._prepare_text_ids(torch.empty(1, max_sequence_length, 0))[0],
                             persistent=False)

    @classmethod
    def check_path(cls, path: str | None, revision: str | None = None) -> Path:
        """ValueError (naming --model.path) unless `path` (a local folder, or a hub id at `revision`) is a
        FLUX.2 diffusers folder; its local folder (`folder_variant` says which FLUX.2 it holds)."""
        return check_pipeline_folder(path, model_name="flux2", pipeline_classes=FLUX2_PIPELINES,
                                     transformer_class="Flux2Transformer2DModel", required=FLUX2_REQUIRED,
                                     revision=revision)

    @staticmethod
    def folder_variant(folder: Path) -> str:
        """The variant ('dev', 'klein', 'klein-base') of a checked FLUX.2 folder, from its model_index.json."""
        return flux2_variant(json.loads((folder / "model_index.json").read_text()))

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str | torch.dtype = torch.bfloat16, device: str = "cuda",
                        resolution: int = 512, empty_transformer: bool = False, revision: str | None = None,
                        **kwargs) -> Flux2FlowModel:
        """Load a FLUX.2 dev or klein checkpoint directory (diffusers layout): a local folder, or a hub id at
        `revision` (`pec.hub`). With `empty_transformer` the transformer is built on the meta device, unread
        (full fine-tuning on several processes: `pec.distributed.load_sharded_transformer` loads its shards)."""
        import diffusers

        folder = cls.check_path(path, revision)
        dev = cls.folder_variant(folder) == "dev"
        pipeline_class = diffusers.Flux2Pipeline if dev else diffusers.Flux2KleinPipeline
        pipe = load_pipeline(pipeline_class, folder, dtype, empty_transformer=empty_transformer)
        model = cls(pipe, resolution=resolution, **kwargs)
        return to_device(model, device)  # the transformer and the VAE; the text encoder moves when it encodes

    def _encode(self, prompts: list[str], device: torch.device) -> PromptBatch:
        """The pipeline's own `encode_prompt` (chat template, stacked hidden states); no pooled embedding."""
        embeds, _ = self.pipeline.encode_prompt(prompt=prompts, device=device,
                                                max_sequence_length=self.max_sequence_length)
        return PromptBatch(embeds, embeds.new_zeros(embeds.shape[0], 0))

    def _set_timesteps(self, scheduler, num_steps: int) -> None:
        """As both FLUX.2 pipelines: linspace(1, 1/N, N) (none where the config asks for flow sigmas) under
        mu = compute_empirical_mu(image tokens, N)."""
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu, retrieve_timesteps

        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        retrieve_timesteps(scheduler, num_steps, "cpu", sigmas=sigmas,
                           mu=compute_empirical_mu(image_seq_len=self.image_seq_len, num_steps=num_steps))

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, prompts: PromptBatch) -> torch.Tensor:
        """The transformer's prediction on packed latents (B, tokens, 128); float32 out. Timestep and (dev's)
        guidance as the pipelines pass them (`FluxFlowModel.transformer_timestep` / `distilled_guidance`);
        klein's pipeline passes guidance=None."""
        dtype = self.transformer.dtype
        guidance = self.distilled_guidance(latents.shape[0], latents.device) if self.variant == "dev" else None
        return self.transformer(hidden_states=latents.to(dtype), timestep=self.transformer_timestep(sigma),
                                guidance=guidance, encoder_hidden_states=prompts.embeds.to(dtype),
                                txt_ids=self.txt_ids, img_ids=self.img_ids, return_dict=False)[0].float()

    def _vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the VAE's batch-norm statistics on the packed tokens (their last axis is the 128 patchified
        channels the pipelines normalise), then unpack to the VAE's (B, 32, h, w) latent image."""
        bn, dtype = self.vae.bn, self.vae.dtype
        std = torch.sqrt(bn.running_var + self.vae.config.batch_norm_eps).to(dtype)
        return self._to_vae_latents(latents.to(dtype) * std + bn.running_mean.to(dtype))
