"""The real transformers' shapes (their diffusers `transformer/config.json`), for random-weight GPU
benchmarks and memory estimates without the weights (DESIGN.md §7).

`random_transformer("flux-dev", device="meta")` builds the architecture without allocating it (count
parameters, plan memory); on a GPU it builds random weights of the real size.
"""
from __future__ import annotations

import torch
from torch import nn

# stabilityai/stable-diffusion-3.5-medium (MMDiT-X: dual attention in the first 13 blocks), 2.24B parameters.
SD35_MEDIUM = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
               "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
               "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
               "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm"}
# black-forest-labs/FLUX.1-dev: 19 double- and 38 single-stream blocks, 24 heads x 128, guidance embedding, 11.9B.
FLUX_DEV = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
            "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
            "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}
# Qwen/Qwen-Image: 60 dual-stream blocks, 24 heads x 128, Qwen2.5-VL's 3584-wide text states, 20.4B.
QWEN_IMAGE = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
              "num_attention_heads": 24, "joint_attention_dim": 3584, "axes_dims_rope": (16, 56, 56)}
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers: 30 blocks, 12 heads x 128, feed-forward 8960, UMT5's 4096-wide text states.
WAN21_1_3B = {"patch_size": (1, 2, 2), "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
              "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30,
              "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024}
SHAPES = {"sd3.5-medium": ("SD3Transformer2DModel", SD35_MEDIUM), "flux-dev": ("FluxTransformer2DModel", FLUX_DEV),
          "qwen-image": ("QwenImageTransformer2DModel", QWEN_IMAGE),
          "wan2.1-1.3b": ("WanTransformer3DModel", WAN21_1_3B)}


def random_transformer(name: str, device: str | torch.device = "meta", dtype: torch.dtype = torch.bfloat16
                       ) -> nn.Module:
    """The transformer of `name` (one of SHAPES) with random weights (no storage on the 'meta' device), built
    directly in the dtypes `from_pretrained(torch_dtype=dtype)` gives (Wan keeps some modules in float32),
    so that a 20B model never exists in float32."""
    import diffusers

    from pec.models.diffusers_model import build_in_dtype

    if name not in SHAPES:
        raise ValueError(f"name must be one of {sorted(SHAPES)}, got {name!r}")
    class_name, config = SHAPES[name]
    with torch.device(device):
        return build_in_dtype(getattr(diffusers, class_name), dict(config), dtype)
