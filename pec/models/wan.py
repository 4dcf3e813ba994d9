"""Wan text-to-video (diffusers `WanPipeline`) as a `FlowModel`: Wan2.1 T2V 1.3B / 14B, Wan2.2 T2V A14B
(two experts) and Wan2.2 TI2V-5B in its text-to-video mode.

From a diffusers folder (`--model.path /data/Wan2.1-T2V-1.3B-Diffusers`, or the hub id
Wan-AI/Wan2.1-T2V-1.3B-Diffusers: `pec.hub`). What differs from SD3:
- Video latents: one sample is (C, F, H/s, W/s) with F = (frames - 1) / 4 + 1 latent frames (the causal
  3D VAE keeps the first frame and compresses each next 4 into one), C = 16 and s = 8 for the Wan2.1 VAE
  (Wan2.1 and Wan2.2 A14B), C = 48 and s = 16 for the Wan2.2 VAE of TI2V-5B. `--model.frames` must be
  1 + a multiple of 4 (WanPipeline rounds other counts with a warning; we refuse them). The latents are
  normalised per channel with the VAE config's `latents_mean` / `latents_std`, as WanPipeline decodes them.
- `decode` returns frames (B, F, 3, H, W) in [0, 1]. We add no clamp, but AutoencoderKLWan clamps its
  own output to [-1, 1] (its `_decode`), so a saturated pixel passes no gradient. The VAE runs in float32
  whatever `--model.dtype` (diffusers' Wan recommendation), frame by frame inside the VAE.
- Prompts: UMT5-XXL's hidden states, zero-padded to `max_sequence_length` (512 in WanPipeline); there is
  no pooled embedding (the PromptBatch's `pooled` is (B, 0)). CFG's unconditional prompt is "", which is
  WanPipeline's default negative prompt.
- Timestep: the transformer gets the scheduler's float32 timestep sigma * 1000, as WanPipeline passes it
  with a FlowMatchEulerDiscreteScheduler; TI2V-5B (`expand_timesteps` in model_index.json) gets it
  once per latent token, (B, F * h/2 * w/2), as WanPipeline builds it.
- Sigmas: Wan's folders ship a UniPCMultistepScheduler whose `flow_shift` (3.0 in Wan-AI's T2V folders;
  diffusers' examples use 5.0 at 720p, `--model.flow_shift` overrides it) shifts the flow sigmas
  linspace(1, 1/1000, N + 1)[:N] to shift*s / (1 + (shift - 1)*s), with a terminal 0. `schedule` returns
  those sigmas, which our Euler / SDE samplers step through; UniPC's only change to them, its first sigma
  1 - 1e-6 (which keeps its log-SNR finite), is undone: an Euler step starts from pure noise at 1.
  UniPC passes integer timesteps (int64(sigma * 1000)); we pass the float ones an Euler scheduler passes.
- Wan2.2 A14B has two experts: `transformer` for the high-noise steps (timestep >= boundary_ratio * 1000,
  0.875 in Wan-AI's folder) with the sampler's CFG scale, `transformer_2` for the rest with
  `--model.guidance_scale_2` (empty = the same scale), as WanPipeline switches them. The sampler asks
  `expert_at(sigma)` on the host (no device read), runs `velocity` under `use_expert(i)` and combines
  with `expert_guidance_scale(i, scale)`. Both experts are one module, `WanExperts` (the model's
  `transformer`), so LoRA, full fine-tuning and the checkpoints see both; `--model.train_experts` picks
  which train (`both` by default: the sampler trains every SDE step unless told otherwise, and a step's
  gradient reaches only the expert that ran it, so a frozen expert leaves its steps' policy where it was;
  Flow-Factory's and UniRL's Wan2.2 LoRA recipes adapt both. `high` or `low` freezes the other, e.g. to
  halve full-fine-tuning memory when the SDE steps all lie above the boundary, as Flow-Factory's
  full-fine-tuning Wan2.2 recipe does with `transformer` alone).
- TI2V-5B is added for text-to-video (a WanPipeline folder with `expand_timesteps`); its image-to-video mode
  (an image as the first latent frame) is not a text-to-image policy and is not supported.
"""
from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pec.config import WAN_EXPERTS
from pec.hub import load_options, resolve_model_path
from pec.models.base import PromptBatch, to_device
from pec.models.diffusers_model import DiffusersFlowModel, check_pipeline_folder, load_pipeline

WAN_PIPELINES = ("WanPipeline",)
WAN_REQUIRED = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
WAN_TRANSFORMER = "WanTransformer3DModel"
# Flow-Factory's Wan LoRA targets (models/wan/wan2_t2v.py, `default_target_modules`, used by its Wan2.1 and
# Wan2.2 configs): self-attention, cross-attention and the feed-forward of every block.
WAN_LORA_TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                    "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"]
# Schedulers whose sigmas `WanFlowModel.schedule` reproduces: Wan's own, and the Euler one its pipeline
# also takes.
WAN_SCHEDULERS = ("UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler")


def check_wan_options(index: Mapping[str, Any], vae: Mapping[str, Any], transformer: Mapping[str, Any],
                      scheduler_class: str | None, *, frames: int, resolution: int, train_experts: str,
                      guidance_scale_2: float | None) -> None:
    """ValueError, naming the option, unless the options fit a Wan folder's configs (plain mappings, so the
    JSON files of a folder and a loaded pipeline's configs are checked by the same code)."""
    temporal = vae.get("scale_factor_temporal", 4)
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1 or (frames - 1) % temporal:
        raise ValueError(f"--model.frames must be 1 + a multiple of {temporal} (the VAE keeps the first frame and "
                         f"compresses each next {temporal} into one latent frame), e.g. 5, 33 or 81; got {frames!r}: "
                         f"a frame count the VAE cannot take")
    multiple = vae.get("scale_factor_spatial", 8) * transformer.get("patch_size", (1, 2, 2))[1]
    if resolution % multiple:
        raise ValueError(f"--model.resolution must be a multiple of {multiple} for this Wan model (VAE factor x "
                         f"patch size), got {resolution}")
    if train_experts not in WAN_EXPERTS:
        raise ValueError(f"--model.train_experts must be one of {WAN_EXPERTS}, got {train_experts!r}")
    two = index.get("boundary_ratio") is not None
    if not two and train_experts == "low":
        raise ValueError("--model.train_experts low needs a two-expert model (Wan2.2 A14B: boundary_ratio and "
                         "transformer_2 in model_index.json); this folder has one transformer: use both or high")
    if not two and guidance_scale_2 is not None:
        raise ValueError("--model.guidance_scale_2 is the low-noise expert's CFG scale of a two-expert model "
                         "(Wan2.2 A14B); this folder has one transformer: leave it empty")
    if scheduler_class not in WAN_SCHEDULERS:
        raise ValueError(f"--model.path: its scheduler is a {scheduler_class}; pec reproduces the sigmas of "
                         f"{' and '.join(WAN_SCHEDULERS)} only")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


class WanExperts(nn.Module):
    """Wan2.2 A14B's two transformers as one module: `forward(..., expert=i)` runs expert i (0: high noise,
    `transformer`; 1: low noise, `transformer_2`).

    One module, so that what the trainer does to "the transformer" (LoRA adapters, full fine-tuning, the
    reference copy, checkpoints, gradient checkpointing) reaches both, limited to the experts in `trained`:
    `add_adapter` adapts only those, `requires_grad_(True)` makes only those trainable, and a deep copy (the
    full-fine-tuning reference) copies only those and shares the frozen ones.
    """

    def __init__(self, experts: Sequence[nn.Module], trained: Sequence[int]) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.trained = tuple(trained)
        self._adapted: tuple[int, ...] = ()

    def forward(self, *args: Any, expert: int = 0, **kwargs: Any) -> Any:
        """The forward of expert `expert` (the arguments of WanTransformer3DModel.forward)."""
        return self.experts[expert](*args, **kwargs)

    @property
    def config(self):
        """The high-noise expert's config (both experts share their shapes)."""
        return self.experts[0].config

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype."""
        return self.experts[0].dtype

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether every expert recomputes its blocks in the backward pass."""
        return all(e.is_gradient_checkpointing for e in self.experts)

    def enable_gradient_checkpointing(self) -> None:
        """Gradient checkpointing in every expert."""
        for expert in self.experts:
            expert.enable_gradient_checkpointing()

    def requires_grad_(self, requires_grad: bool = True) -> WanExperts:
        """True: the trained experts become trainable (the others stay frozen); False: every expert freezes."""
        for i, expert in enumerate(self.experts):
            expert.requires_grad_(requires_grad and i in self.trained)
        return self

    def add_adapter(self, adapter_config, adapter_name: str = "default") -> None:
        """diffusers' `add_adapter` on each trained expert (a copy of the peft config each)."""
        for i in self.trained:
            self.experts[i].add_adapter(copy.deepcopy(adapter_config), adapter_name=adapter_name)
        self._adapted = self.trained

    def disable_adapters(self) -> None:
        """Disable the LoRA adapters (the KL reference of a LoRA run)."""
        for i in self._adapted:
            self.experts[i].disable_adapters()

    def enable_adapters(self) -> None:
        """Enable the LoRA adapters again."""
        for i in self._adapted:
            self.experts[i].enable_adapters()

    def __deepcopy__(self, memo: dict) -> WanExperts:
        clone = WanExperts([copy.deepcopy(e, memo) if i in self.trained else e for i, e in enumerate(self.experts)],
                           self.trained)
        clone._adapted = self._adapted
        return clone


class WanFlowModel(DiffusersFlowModel):
    """Wraps the components of a diffusers `WanPipeline` (see the module docstring).

    Args:
        pipeline: the WanPipeline (one transformer, or two with `boundary_ratio` in its config).
        resolution: frame side in pixels (a multiple of the VAE factor x patch size: 16, or 32 for TI2V-5B).
        frames: video frames; 1 + a multiple of the VAE's temporal factor (4).
        max_sequence_length: UMT5 tokens per prompt (512, WanPipeline's default).
        flow_shift: overrides the scheduler config's flow shift (None = the folder's).
        guidance_scale_2: CFG scale of the low-noise expert (None = the sampler's scale, as WanPipeline).
        train_experts: 'both', 'high' or 'low': which experts train (the others are frozen).
        Other keyword arguments: see `DiffusersFlowModel`.
    """

    text_encoder_names = ("text_encoder",)
    lora_targets = WAN_LORA_TARGETS

    def __init__(self, pipeline, resolution: int = 480, frames: int = 81, max_sequence_length: int = 512,
                 flow_shift: float | None = None, guidance_scale_2: float | None = None,
                 train_experts: str = "both", **kwargs) -> None:
        super().__init__(pipeline, resolution=resolution, max_sequence_length=max_sequence_length, **kwargs)
        vae, transformer = self.vae.config, self.transformer.config
        self.scheduler_class = type(pipeline.scheduler).__name__
        check_wan_options(pipeline.config, vae, transformer, self.scheduler_class, frames=frames,
                          resolution=resolution, train_experts=train_experts, guidance_scale_2=guidance_scale_2)
        if flow_shift is not None:
            if flow_shift <= 0:
                raise ValueError(f"--model.flow_shift must be > 0, got {flow_shift}")
            key = "flow_shift" if self.scheduler_class == "UniPCMultistepScheduler" else "shift"
            self.scheduler_config[key] = float(flow_shift)
        self.boundary_ratio = pipeline.config.get("boundary_ratio")
        self.guidance_scale_2 = guidance_scale_2
        self.expand_timesteps = bool(pipeline.config.get("expand_timesteps", False))
        cells = resolution // vae.scale_factor_spatial
        self.sample_shape = (transformer.in_channels, (frames - 1) // vae.scale_factor_temporal + 1, cells, cells)
        # TI2V-5B: one timestep per latent token (WanPipeline's mask[0][0][:, ::2, ::2], i.e. the 2x2 patches).
        _, p_h, p_w = transformer.patch_size
        self.timestep_tokens = self.sample_shape[1] * (cells // p_h) * (cells // p_w)
        if self.boundary_ratio is not None:
            trained = {"both": (0, 1), "high": (0,), "low": (1,)}[train_experts]
            self.transformer = WanExperts([pipeline.transformer, pipeline.transformer_2], trained)
            self.transformer_components = {"experts.0": "transformer", "experts.1": "transformer_2"}
            if kwargs.get("gradient_checkpointing"):
                self.transformer.enable_gradient_checkpointing()
            self.transformer.requires_grad_(True)
        self._expert = 0
        self.register_buffer("latents_mean", torch.tensor(vae.latents_mean).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("latents_std", torch.tensor(vae.latents_std).view(1, -1, 1, 1, 1), persistent=False)

    @property
    def num_experts(self) -> int:
        """1 (Wan2.1, TI2V-5B) or 2 (Wan2.2 A14B)."""
        return 2 if isinstance(self.transformer, WanExperts) else 1

    @classmethod
    def check_path(cls, path: str | None, *, frames: int = 81, resolution: int = 480, train_experts: str = "both",
                   guidance_scale_2: float | None = None, revision: str | None = None) -> Path:
        """ValueError (naming the option) unless `path` (a local folder, or a hub id at `revision`) is a
        WanPipeline folder these options fit; reads only its JSON files; returns its local folder."""
        local = resolve_model_path(path, revision) if path else None
        two = local is not None and _read_json(local / "model_index.json").get("boundary_ratio") is not None
        required = WAN_REQUIRED + (("transformer_2",) if two else ())
        folder = check_pipeline_folder(local or path, model_name="wan", pipeline_classes=WAN_PIPELINES,
                                       transformer_class=WAN_TRANSFORMER, required=required)
        if two and _read_json(folder / "transformer_2" / "config.json").get("_class_name") != WAN_TRANSFORMER:
            raise ValueError(f"--model.path: {folder / 'transformer_2'} holds no {WAN_TRANSFORMER} (config.json), "
                             f"which a two-expert Wan folder (boundary_ratio in model_index.json) needs")
        check_wan_options(_read_json(folder / "model_index.json"), _read_json(folder / "vae" / "config.json"),
                          _read_json(folder / "transformer" / "config.json"),
                          _read_json(folder / "scheduler" / "scheduler_config.json").get("_class_name"), frames=frames,
                          resolution=resolution, train_experts=train_experts, guidance_scale_2=guidance_scale_2)
        return folder

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str | torch.dtype = torch.bfloat16, device: str = "cuda",
                        resolution: int = 480, frames: int = 81, train_experts: str = "both",
                        guidance_scale_2: float | None = None, empty_transformer: bool = False,
                        revision: str | None = None, **kwargs) -> WanFlowModel:
        """Load a Wan checkpoint directory (diffusers layout): a local folder, or a hub id at `revision`
        (`pec.hub`). The
        transformer(s) and the text encoder in `dtype`, the VAE in float32. With `empty_transformer` the
        transformer(s) are built on the meta device, unread (full fine-tuning on several processes:
        `pec.distributed.load_sharded_transformer` loads their shards)."""
        from diffusers import AutoencoderKLWan, WanPipeline

        folder = cls.check_path(path, frames=frames, resolution=resolution, train_experts=train_experts,
                                guidance_scale_2=guidance_scale_2, revision=revision)
        vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32,
                                               **load_options(folder))
        pipe = load_pipeline(WanPipeline, folder, dtype, empty_transformer=empty_transformer, vae=vae)
        model = cls(pipe, resolution=resolution, frames=frames, train_experts=train_experts,
                    guidance_scale_2=guidance_scale_2, **kwargs)
        return to_device(model, device)  # the transformer(s) and the VAE; the text encoder moves when it encodes

    # -------------------------------------------------------------------------------------------
    def schedule(self, num_steps: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """The sigmas of the folder's scheduler config (see the module docstring): UniPC's flow sigmas at its
        flow shift, starting at 1, or FlowMatchEulerDiscreteScheduler's (`DiffusersFlowModel.schedule`)."""
        if self.scheduler_class != "UniPCMultistepScheduler":
            return super().schedule(num_steps, device)
        from diffusers import UniPCMultistepScheduler

        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        scheduler = UniPCMultistepScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(num_steps, device="cpu")
        sigmas = scheduler.sigmas.to(torch.float32)
        if 1 - 2e-6 < sigmas[0] < 1:  # UniPC's 1 - 1e-6 (finite log-SNR for its multistep update)
            sigmas[0] = 1.0
        return sigmas.to(device=device, non_blocking=True)

    # -------------------------------------------------------------------------------------------
    def expert_at(self, sigma: float) -> int:
        """The expert WanPipeline runs at the step of host-side sigma `sigma`: 0 (high noise) while its
        float32 timestep sigma * 1000 >= boundary_ratio * 1000, else 1; always 0 with one expert."""
        if self.boundary_ratio is None:
            return 0
        scale = self.scheduler_config["num_train_timesteps"]
        timestep = torch.tensor(sigma, dtype=torch.float32) * scale  # the scheduler's timestep, on the CPU
        return 0 if bool(timestep >= self.boundary_ratio * scale) else 1

    @contextlib.contextmanager
    def use_expert(self, index: int) -> Iterator[None]:
        """Within the context, `velocity` runs expert `index` (see `expert_at`)."""
        if index not in range(self.num_experts):
            raise ValueError(f"expert index must be in [0, {self.num_experts}), got {index!r}")
        previous, self._expert = self._expert, index
        try:
            yield
        finally:
            self._expert = previous

    def expert_guidance_scale(self, index: int, guidance_scale: float) -> float:
        """The CFG scale of expert `index`: `guidance_scale_2` for the low-noise expert when set, else
        `guidance_scale` (WanPipeline's rule)."""
        if index == 1 and self.guidance_scale_2 is not None:
            return float(self.guidance_scale_2)
        return guidance_scale

    # -------------------------------------------------------------------------------------------
    def _encode(self, prompts: list[str], device: torch.device) -> PromptBatch:
        """UMT5's last hidden states, zero-padded past each prompt's tokens (WanPipeline's encode_prompt)."""
        embeds, _ = self.pipeline.encode_prompt(prompt=prompts, do_classifier_free_guidance=False, device=device,
                                                max_sequence_length=self.max_sequence_length)
        return PromptBatch(embeds, embeds.new_zeros(embeds.shape[0], 0))

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, prompts: PromptBatch) -> torch.Tensor:
        """The current expert's prediction on video latents (B, C, F, h, w); float32 out.

        The timestep is the float32 sigma * num_train_timesteps that WanPipeline passes with an Euler
        scheduler (never rounded to the weights' dtype); per latent token for TI2V-5B.
        """
        dtype = self.transformer.dtype
        timestep = sigma.float() * self.scheduler_config["num_train_timesteps"]
        if self.expand_timesteps:
            timestep = timestep[:, None].expand(-1, self.timestep_tokens)
        kwargs = {"expert": self._expert} if self.num_experts > 1 else {}
        return self.transformer(hidden_states=latents.to(dtype), timestep=timestep,
                                encoder_hidden_states=prompts.embeds.to(dtype), return_dict=False,
                                **kwargs)[0].float()

    def _to_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the per-channel normalisation, as WanPipeline does: latents / (1 / std) + mean."""
        dtype = self.vae.dtype
        return latents.to(dtype) / (1.0 / self.latents_std.to(dtype)) + self.latents_mean.to(dtype)

    def _decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        video = self.vae.decode(self._to_vae_latents(latents), return_dict=False)[0]  # (B, 3, F, H, W)
        return (video.float().permute(0, 2, 1, 3, 4) + 1) / 2
