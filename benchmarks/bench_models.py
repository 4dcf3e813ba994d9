"""Training throughput at the sizes of the models the field trains now (issue 19, item 5): Wan2.1-T2V-1.3B
and Qwen-Image, ours (`Trainer.train_step`) against the Flow-GRPO-style eager loop of bench_iteration.py
(`FlowGrpoLoop`, its anchor) on the same model: one Trainer, whose model, reward, optimizer and prompts both
sides use, timed in the same run.

Reported in images per GPU-second, verl-omni's metric: images per step / (step time x GPUs), one GPU here;
a video counts its frames (clips per GPU-second are given beside them).

GPU cases (marked gpu; `bash benchmarks/gpu_models.sh` runs them within 4 minutes): the real transformers'
shapes (`pec.models.shapes`: WAN21_1_3B, QWEN_IMAGE) with random weights, built in from_pretrained's dtypes
(bf16; Wan's float32 modules), inside the real adapters (`WanFlowModel`, `QwenImageFlowModel`: their
schedules, timesteps, latent packing, decoding and LoRA targets); LoRA r64 / alpha 128 (their configs'),
gradient checkpointing. What is not compared is replaced: the text encoders by fixed random embeddings of
the real width and length (UMT5: 512 x 4096; Qwen2.5-VL: 64 tokens x 3584), the VAEs by the same classes at
a tiny width (their code, a fraction of their cost), the reward by the frames' contrast and the perceptual
space by a frozen random conv net (frames averaged), on both sides. Wan: 17 frames at 480 x 480 (5 x 60 x 60
latents, 4500 tokens); Qwen-Image: 512 px (1024 tokens). 2 prompts x 2 samples, 4 steps with CFG, the first
2 SDE steps trained. Both sides eager: torch.compile of a 30- or 60-block transformer takes longer than the
time box (set PEC_BENCH_MODELS_COMPILE=1 to compile ours). PEC_BENCH_MODELS_REPS (default 2) timed
iterations per side after one warm-up.

CPU case: the same code on tiny transformers of both kinds, so that `pytest benchmarks/ --benchmark-only`
exercises it on any machine (its times say nothing about GPUs).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import zlib
from pathlib import Path

import pytest
import torch

from _timing import Measurement, run_benchmark
from bench_iteration import FlowGrpoLoop, RandomConvSpace, _gpu_median_s, _interleaved_medians_s
from pec.config import Config, apply_dict
from pec.models.base import PromptBatch
from pec.models.qwen_image import QwenImageFlowModel
from pec.models.wan import WanFlowModel
from pec.trainer import Trainer

TEXT_ROWS = 16  # distinct prompt embeddings (the prompts hash to one of them)
# Qwen-Image's scheduler config (Qwen/Qwen-Image scheduler/scheduler_config.json).
QWEN_IMAGE_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 8192, "max_shift": 0.9,
                        "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
                        "time_shift_type": "exponential", "use_dynamic_shifting": True}
TINY_QWEN = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 1, "attention_head_dim": 8,
             "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": (2, 2, 4)}
TINY_WAN = {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 16,
            "out_channels": 16, "text_dim": 32, "freq_dim": 32, "ffn_dim": 32, "num_layers": 1, "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32}


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """One model at one size: `shape` names `pec.models.shapes.SHAPES` (random weights of the real size) or
    is a tiny config of the same class."""

    kind: str  # "wan" | "qwen_image"
    shape: str | dict
    resolution: int
    frames: int  # 1 for an image model
    text_tokens: int
    text_dim: int
    device: str
    cfg_scale: float
    lora: tuple[int, float] = (64, 128.0)
    num_steps: int = 4
    window: tuple[int, int] = (0, 2)

    @property
    def label(self) -> str:
        size = self.shape if isinstance(self.shape, str) else "tiny"
        clip = f"{self.frames} frames at " if self.frames > 1 else ""
        return (f"{self.device} iteration, {self.kind} ({size}, random weights), {clip}{self.resolution} px, B=2x2, "
                f"{self.num_steps} steps, CFG {self.cfg_scale:g}, trained steps {self.window[0]}-{self.window[1] - 1}, "
                f"LoRA r{self.lora[0]}")


GPU_CASES = [ModelCase("wan", "wan2.1-1.3b", 480, 17, 512, 4096, "cuda", 5.0),
             ModelCase("qwen_image", "qwen-image", 512, 1, 64, 3584, "cuda", 4.0)]
CPU_CASES = [ModelCase("wan", TINY_WAN, 32, 5, 8, 32, "cpu", 5.0, lora=(4, 8.0), num_steps=2, window=(0, 1)),
             ModelCase("qwen_image", TINY_QWEN, 32, 1, 8, 32, "cpu", 4.0, lora=(4, 8.0), num_steps=2, window=(0, 1))]


class TableText:
    """Prompts encoded as fixed random rows of the real width and length (`text_table`, a buffer), in place
    of the model's text encoder (mixed into the real adapter)."""

    text_table: torch.Tensor

    def _encode(self, prompts: list[str], device: torch.device) -> PromptBatch:
        rows = torch.tensor([zlib.crc32(p.encode()) % TEXT_ROWS for p in prompts])
        return self.prompt_batch(self.text_table[rows.to(self.text_table.device)])


class BenchQwenImage(TableText, QwenImageFlowModel):
    """Qwen-Image with table prompts (every token real: no mask)."""

    def prompt_batch(self, embeds: torch.Tensor) -> PromptBatch:
        return PromptBatch(embeds)


class BenchWan(TableText, WanFlowModel):
    """Wan with table prompts (no pooled embedding, as Wan's)."""

    def prompt_batch(self, embeds: torch.Tensor) -> PromptBatch:
        return PromptBatch(embeds, embeds.new_zeros(embeds.shape[0], 0))


def build_model(case: ModelCase, device: torch.device) -> QwenImageFlowModel | WanFlowModel:
    """The case's adapter around a random transformer, tiny VAE, table prompts (see the module docstring)."""
    import diffusers

    from pec.models.diffusers_model import build_in_dtype
    from pec.models.shapes import SHAPES

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        if isinstance(case.shape, str):
            class_name, config = SHAPES[case.shape]
            transformer = build_in_dtype(getattr(diffusers, class_name), dict(config), dtype)
        else:
            cls = diffusers.WanTransformer3DModel if case.kind == "wan" else diffusers.QwenImageTransformer2DModel
            transformer = build_in_dtype(cls, dict(case.shape), dtype)
    small = {"base_dim": 4, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1, "temperal_downsample": [False, True, True]}
    options = {"resolution": case.resolution, "gradient_checkpointing": True, "vae_batch": 2,
               "text_encoders": "gpu", "max_sequence_length": case.text_tokens}
    if case.kind == "wan":
        pipe = diffusers.WanPipeline(
            tokenizer=None, text_encoder=None, transformer=transformer,
            vae=diffusers.AutoencoderKLWan(z_dim=16, **small),
            scheduler=diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                        num_train_timesteps=1000, flow_shift=3.0))
        model = BenchWan(pipe, frames=case.frames, **options)
    else:
        vae = diffusers.AutoencoderKLQwenImage(z_dim=16, latents_mean=[0.0] * 16, latents_std=[1.0] * 16, **small)
        pipe = diffusers.QwenImagePipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae,
                                           scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER))
        model = BenchQwenImage(pipe, **options)
    gen = torch.Generator().manual_seed(1)
    model.register_buffer("text_table", torch.randn(TEXT_ROWS, case.text_tokens, case.text_dim, generator=gen).to(
        dtype), persistent=False)
    return model.to(device)


class FramesConvSpace(RandomConvSpace):
    """bench_iteration's random conv space on images, or on a video's frames averaged (B, F, 3, H, W)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 5:
            return super().forward(images.flatten(0, 1)).unflatten(0, images.shape[:2]).mean(1)
        return super().forward(images)


class FramesContrast(torch.nn.Module):
    """The contrast rule (mean |2x - 1|) over every pixel of an image or of a video's frames."""

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (images.float().clamp(0, 1) * 2 - 1).abs().flatten(1).mean(1)


def _register(case: ModelCase) -> str:
    from pec.models import MODELS
    from pec.perceptual import ENCODERS
    from pec.rewards import REWARDS

    name = f"bench_{case.kind}_{case.device}_{zlib.crc32(repr(case).encode())}"
    if name not in MODELS.names():
        MODELS.register(name)(lambda cfg, device: build_model(case, torch.device(device)))
    if "bench_frames_conv" not in ENCODERS.names():
        ENCODERS.register("bench_frames_conv")(FramesConvSpace)
    if "bench_frames_contrast" not in REWARDS.names():
        REWARDS.register("bench_frames_contrast")(lambda device="cpu", directory=None, paths=None: FramesContrast())
    return name


def _trainer(case: ModelCase, run_dir: Path) -> Trainer:
    cfg = Config()
    rank, alpha = case.lora
    apply_dict(cfg, {"device": case.device, "method": "grpo", "run_dir": str(run_dir), "seed": 0,
                     "threads": None if case.device == "cuda" else 1, "reward": "bench_frames_contrast",
                     "model": {"name": _register(case),
                               "compile": case.device == "cuda" and os.environ.get("PEC_BENCH_MODELS_COMPILE") == "1"},
                     "sampling": {"prompts_per_step": 2, "group_size": 2, "num_steps": case.num_steps,
                                  "guidance_scale": case.cfg_scale, "sde_window": list(case.window)},
                     "train": {"micro_batch": 4, "lora_rank": rank, "lora_alpha": alpha, "lr": 3e-4,
                               "clip_range": 1e-4},
                     "perceptual": {"spaces": ["bench_frames_conv"], "space": "bench_frames_conv", "k": 1,
                                    "batch_metric": False},
                     "logging": {"tensorboard": False, "progress": False}})
    return Trainer(cfg)


def _report(result_table, case: ModelCase, ours: Measurement, anchor: Measurement) -> None:
    """verl-omni's metric: images (a video's frames) per step / (step time x GPUs), one GPU; per second on CPU."""
    images = 4 * case.frames  # 2 prompts x 2 samples
    unit = "GPU-s" if case.device == "cuda" else "s (CPU)"
    for variant, m in (("ours (Trainer.train_step, grpo)", ours), ("anchor (Flow-GRPO-style loop, eager)", anchor)):
        seconds = m.ms / 1e3
        clips = f", {4 / seconds:.3f} clips/{unit}" if case.frames > 1 else ""
        result_table.add(case.label, variant, m, f"{images / seconds:.2f} images/{unit}{clips}")
    result_table.add_ratio(case.label, f"images/{unit} ours / anchor", anchor.ms / ours.ms)


def _run(case: ModelCase, result_table, benchmark) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _trainer(case, Path(tmp) / "run")
        anchor = FlowGrpoLoop(trainer, cfg_scale=case.cfg_scale, window=list(case.window))
        if case.device == "cuda":  # one side after the other; peak memory includes the shared model
            reps = int(os.environ.get("PEC_BENCH_MODELS_REPS", "2"))
            ours_s, ours_gib = _gpu_median_s(lambda rep: trainer.train_step(rep + 1), reps)
            anchor_s, anchor_gib = _gpu_median_s(anchor.iteration, reps)
            ours, anchor_m = Measurement(ours_s * 1e3, ours_gib), Measurement(anchor_s * 1e3, anchor_gib)
        else:
            medians = _interleaved_medians_s({"ours": lambda rep: trainer.train_step(rep + 1),
                                              "anchor": anchor.iteration}, 1)
            ours, anchor_m = Measurement(medians["ours"] * 1e3), Measurement(medians["anchor"] * 1e3)
        run_benchmark(benchmark, lambda: anchor.iteration(99), rounds=1, warmup_rounds=0)
    _report(result_table, case, ours, anchor_m)


@pytest.mark.parametrize("case", CPU_CASES, ids=[c.kind for c in CPU_CASES])
def test_model_iteration_cpu_tiny(benchmark, result_table, case):
    """The code path of the GPU cases on tiny transformers (no number here says anything about GPUs)."""
    _run(case, result_table, benchmark)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[c.kind for c in GPU_CASES])
def test_model_iteration_gpu(benchmark, result_table, case):
    """Ours against the eager Flow-GRPO-style loop on a real-size random model, in images per GPU-second."""
    _run(case, result_table, benchmark)
    torch.cuda.empty_cache()
