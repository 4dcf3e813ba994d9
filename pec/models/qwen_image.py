"""Qwen-Image (diffusers `QwenImagePipeline`) as a `FlowModel`, for training on GPUs.

From a diffusers folder (`--model.path /data/Qwen-Image`, or the hub id Qwen/Qwen-Image: `pec.hub`). What differs
from SD3 and FLUX:
- Prompts: the last hidden states of a Qwen2.5-VL text encoder on the prompt under the pipeline's chat
  template (the template's 34 leading tokens dropped), with an attention mask and no pooled embedding;
  prompts keep their own token counts, so a batch of them is padded and masked (`PromptBatch.mask`).
- True CFG with a negative prompt: the null prompt "" is encoded as `negative_prompt` (" " in
  Qwen-Image's examples and Flow-GRPO's Qwen-Image trainer), and after CFG the combined velocity is
  rescaled to the conditional velocity's norm per token (`cfg_renorm`, QwenImagePipeline.__call__).
  `sampling.guidance_scale` is the pipeline's `true_cfg_scale` (4.0 in Qwen's examples and Flow-GRPO).
- Latents are packed 2x2 as FLUX's: `sample_shape` is ((H/16)(W/16), 4C), and the transformer gets the
  token grid as `img_shapes`.
- The sigma schedule: linspace(1, 1/N, N) under the dynamic shift mu = calculate_shift(tokens) of the
  scheduler config (Qwen-Image's: exponential time shift, up to 8192 tokens, shift_terminal 0.02), as
  QwenImagePipeline computes it (`DiffusersFlowModel.schedule`).
- The VAE (AutoencoderKLQwenImage) is Wan's video VAE on one frame, with per-channel latent mean and
  std instead of one shift and scale; its decode clamps to [-1, 1], so saturated pixels pass no
  gradient (the pipeline's own decode, kept as it is).
"""
from __future__ import annotations

from pathlib import Path

import torch

from pec.models.base import PromptBatch, to_device
from pec.models.diffusers_model import DiffusersFlowModel, check_pipeline_folder, load_pipeline
from pec.models.flux import unpack_latents

QWEN_IMAGE_PIPELINES = ("QwenImagePipeline",)
QWEN_IMAGE_REQUIRED = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
# QwenImagePipeline refuses longer prompts (max_sequence_length <= 1024 text tokens).
QWEN_IMAGE_MAX_TOKENS = 1024
# Flow-GRPO's Qwen-Image LoRA targets (scripts/train_qwenimage.py, r 64 / alpha 128): the joint-attention
# projections and the image and text feed-forwards of every block (verl's Qwen-Image example names the same).
QWEN_IMAGE_LORA_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                           "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj",
                           "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]
# The negative prompt of Qwen-Image's examples and of Flow-GRPO's Qwen-Image trainer.
QWEN_IMAGE_NEGATIVE_PROMPT = " "


class QwenImageFlowModel(DiffusersFlowModel):
    """Wraps the components of a diffusers `QwenImagePipeline` (Qwen-Image).

    Args:
        pipeline: the QwenImagePipeline.
        resolution: image side in pixels (a multiple of 16).
        max_sequence_length: text tokens kept per prompt (at most 1024, as the pipeline allows).
        negative_prompt: the text the null prompt "" stands for (true CFG's unconditional row).
        Other keyword arguments: see `DiffusersFlowModel`.
    """

    text_encoder_names = ("text_encoder",)
    lora_targets = QWEN_IMAGE_LORA_TARGETS
    cfg_renorm = True

    def __init__(self, pipeline, resolution: int = 512, max_sequence_length: int = 512,
                 negative_prompt: str = QWEN_IMAGE_NEGATIVE_PROMPT, **kwargs) -> None:
        super().__init__(pipeline, resolution=resolution, max_sequence_length=max_sequence_length, **kwargs)
        check_max_sequence_length(max_sequence_length)
        if not isinstance(negative_prompt, str):
            raise ValueError(f"--model.negative_prompt must be a string, got {type(negative_prompt).__name__}")
        self.check_resolution(self.vae_scale_factor * 2)
        self.negative_prompt = negative_prompt
        self.latent_cells = resolution // self.vae_scale_factor
        self.sample_shape = ((self.latent_cells // 2) ** 2, self.transformer.config.in_channels)
        # The per-channel statistics of the VAE's latent space (float32, cast as the pipeline casts them).
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        self.register_buffer("latents_mean", torch.tensor(config.latents_mean).view(shape), persistent=False)
        self.register_buffer("latents_std", torch.tensor(config.latents_std).view(shape), persistent=False)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: 2 ** (the VAE's downsampling stages), 8 for Qwen-Image."""
        return 2 ** len(self.vae.temperal_downsample)

    @property
    def image_seq_len(self) -> int:
        """Packed image tokens (what the dynamic shift reads)."""
        return self.sample_shape[0]

    @classmethod
    def check_path(cls, path: str | None, revision: str | None = None) -> Path:
        """ValueError (naming --model.path) unless `path` (a local folder, or a hub id at `revision`) is a
        Qwen-Image diffusers folder; its local folder."""
        return check_pipeline_folder(path, model_name="qwen_image", pipeline_classes=QWEN_IMAGE_PIPELINES,
                                     transformer_class="QwenImageTransformer2DModel", required=QWEN_IMAGE_REQUIRED,
                                     revision=revision)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str | torch.dtype = torch.bfloat16, device: str = "cuda",
                        resolution: int = 512, empty_transformer: bool = False, revision: str | None = None,
                        **kwargs) -> QwenImageFlowModel:
        """Load a Qwen-Image checkpoint directory (diffusers layout): a local folder, or a hub id at `revision`
        (`pec.hub`). With `empty_transformer` the transformer is built on the meta device, unread (full
        fine-tuning on several processes: `pec.distributed.load_sharded_transformer` loads its shards)."""
        from diffusers import QwenImagePipeline

        folder = cls.check_path(path, revision)
        pipe = load_pipeline(QwenImagePipeline, folder, dtype, empty_transformer=empty_transformer)
        model = cls(pipe, resolution=resolution, **kwargs)
        return to_device(model, device)  # the transformer and the VAE; the text encoder moves when it encodes

    def _encode(self, prompts: list[str], device: torch.device) -> PromptBatch:
        """The pipeline's `encode_prompt` (chat template, hidden states, mask); "" is the negative prompt."""
        texts = [self.negative_prompt if p == "" else p for p in prompts]
        embeds, mask = self.pipeline.encode_prompt(prompt=texts, device=device,
                                                   max_sequence_length=self.max_sequence_length)
        return PromptBatch(embeds, mask=None if mask is None else mask.bool())

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, prompts: PromptBatch) -> torch.Tensor:
        """The transformer's prediction on packed latents (B, tokens, 4C); float32 out.

        The timestep as QwenImagePipeline passes it, bit for bit: t.to(latents dtype) / 1000 with t = sigma *
        num_train_timesteps the scheduler's float32 timestep (the pipeline's latents are in the weights'
        dtype). The text mask (None when no prompt is padded) hides the padding of shorter prompts.
        """
        dtype = self.transformer.dtype
        timestep = (sigma.float() * self.scheduler_config["num_train_timesteps"]).to(dtype) / 1000
        grid = self.latent_cells // 2
        return self.transformer(hidden_states=latents.to(dtype), timestep=timestep,
                                encoder_hidden_states=prompts.embeds.to(dtype),
                                encoder_hidden_states_mask=prompts.mask,
                                img_shapes=[[(1, grid, grid)]] * latents.shape[0], return_dict=False)[0].float()

    def _to_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, tokens, 4C) -> the VAE's latent video of one frame (B, C, 1, h, w), still normalised."""
        return unpack_latents(latents, self.latent_cells, self.latent_cells).unsqueeze(2)

    def _decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        """QwenImagePipeline's decode: z·std + mean per channel (in the VAE's dtype, as it computes it),
        the VAE on one frame, images back to [0, 1]."""
        dtype = self.vae.dtype
        z = self._to_vae_latents(latents).to(dtype)
        z = z / (1.0 / self.latents_std.to(dtype)) + self.latents_mean.to(dtype)
        images = self.vae.decode(z, return_dict=False)[0][:, :, 0]
        return (images.float() + 1) / 2


def check_max_sequence_length(value: int) -> None:
    """ValueError naming --model.max_sequence_length unless it is in [1, 1024] (QwenImagePipeline's limit)."""
    if not 1 <= value <= QWEN_IMAGE_MAX_TOKENS:
        raise ValueError(f"--model.max_sequence_length must be in [1, {QWEN_IMAGE_MAX_TOKENS}] for qwen_image "
                         f"(QwenImagePipeline's limit), got {value}")

