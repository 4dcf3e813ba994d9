"""Tiny random-weight Wan checkpoints in the real on-disk layout (no downloads): WanPipeline folders written
by `save_pretrained`, with a UMT5 text encoder built from transformers' config class, a T5 tokenizer over a
tiny vocabulary, WanTransformer3DModel(s), AutoencoderKLWan and Wan's UniPC scheduler (flow shift 3).

- `tiny_wan_folder(tmp, "wan21")`: Wan2.1 T2V (one transformer, the Wan2.1 VAE: 16 channels, 8x space);
- `tiny_wan_folder(tmp, "wan22")`: Wan2.2 T2V A14B (two experts, boundary_ratio 0.875);
- `tiny_wan_folder(tmp, "ti2v")`: Wan2.2 TI2V-5B (the Wan2.2 VAE: 48 channels, 16x space with its 2x2
  patchify; expand_timesteps).
The VAEs are diffusers' own test sizes (base_dim 3, one block per level), so 5 frames at 32x32 px decode
in well under a second.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tests._tiny_diffusers import t5_tokenizer

TEXT_DIM = 32


def _transformer(channels: int, seed: int):
    import diffusers

    torch.manual_seed(seed)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=channels,
        out_channels=channels, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=1, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def _vae(kind: str):
    import diffusers

    torch.manual_seed(3)
    small = {"base_dim": 3, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1, "temperal_downsample": [False, True, True]}
    if kind != "ti2v":  # the Wan2.1 VAE's config, with its real per-channel latents_mean / latents_std
        return diffusers.AutoencoderKLWan(z_dim=16, **small)
    generator = torch.Generator().manual_seed(4)  # per-channel statistics of the Wan2.2 VAE's kind
    mean = (torch.randn(48, generator=generator) * 0.2).tolist()
    std = (torch.rand(48, generator=generator) + 0.5).tolist()
    return diffusers.AutoencoderKLWan(z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
                                      scale_factor_spatial=16, scale_factor_temporal=4, latents_mean=mean,
                                      latents_std=std, **small)


def tiny_wan_pipeline(kind: str = "wan21"):
    """A WanPipeline of tiny random components: `kind` is 'wan21', 'wan22' (two experts) or 'ti2v'."""
    import diffusers
    import transformers

    if kind not in ("wan21", "wan22", "ti2v"):
        raise ValueError(f"kind must be wan21, wan22 or ti2v, got {kind!r}")
    torch.manual_seed(0)
    text_encoder = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=64, d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8)).eval()
    channels = 48 if kind == "ti2v" else 16
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  num_train_timesteps=1000, flow_shift=3.0)
    extra = {"transformer_2": _transformer(channels, 2), "boundary_ratio": 0.875} if kind == "wan22" else {}
    return diffusers.WanPipeline(tokenizer=t5_tokenizer(), text_encoder=text_encoder, vae=_vae(kind),
                                 scheduler=scheduler, transformer=_transformer(channels, 1),
                                 expand_timesteps=kind == "ti2v", **extra)


def tiny_wan_folder(tmp: Path, kind: str = "wan21") -> Path:
    """`tiny_wan_pipeline(kind)` saved with `save_pretrained` to tmp/kind; returns the folder."""
    folder = tmp / kind
    tiny_wan_pipeline(kind).save_pretrained(folder)
    return folder
