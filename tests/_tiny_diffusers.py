"""Tiny random-weight checkpoints in the real on-disk layouts, built offline (no downloads).

- `tiny_sd3_folder` / `tiny_flux_folder`: diffusers pipeline folders written by `save_pretrained`
  (model_index.json, transformer/, vae/, text_encoder*/, tokenizer*/, scheduler/), with CLIP BPE
  tokenizers from a tiny vocabulary and a T5 tokenizer built with the `tokenizers` library.
- `tiny_clip_folder`: a transformers CLIPModel + CLIPProcessor folder (PickScore_v1's layout).
- `tiny_dino_folder`: a transformers Dinov2Model folder with its image processor config.
- `tiny_open_clip_folder`: an open_clip hf-hub-style folder (open_clip_config.json + weights).
Each is loaded by the same code a user runs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "car", "handwritten", "0", "1", "2", "3"]


def clip_tokenizer(folder: Path):
    """A CLIPTokenizer over a tiny vocabulary (whole words and single letters), saved nowhere."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in WORDS:
        vocab[w + "</w>"] = len(vocab)
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                                      pad_token="<|endoftext|>")


def t5_tokenizer():
    """A T5 tokenizer (fast, `tokenizers` backend): a Unigram model over a tiny vocabulary, as T5's."""
    import tokenizers
    import transformers
    from tokenizers import models, pre_tokenizers

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS]
    pieces += [(ch, -5.0) for ch in "\u2581abcdefghijklmnopqrstuvwxyz0123456789"]
    tok = tokenizers.Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    return transformers.T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", extra_ids=0)


def _clip_text_config(projection_dim: int = 32):
    import transformers

    return transformers.CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
        num_attention_heads=4, num_hidden_layers=1, vocab_size=100, projection_dim=projection_dim,
        hidden_act="gelu", max_position_embeddings=77)


def _t5_encoder(d_model: int):
    import transformers

    return transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=64, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0))


def _vae(latent_channels: int, shift: float, scale: float):
    import diffusers

    return diffusers.AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 4), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=shift, scaling_factor=scale)


def tiny_sd3_pipeline(tmp: Path, t5: bool = True):
    """A StableDiffusion3Pipeline with tiny random components (VAE factor 2, patch 1)."""
    import diffusers
    import transformers

    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    tok = clip_tokenizer(tmp / "_clip_tok")
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(4, 0.0609, 1.5035), text_encoder=transformers.CLIPTextModelWithProjection(_clip_text_config()),
        tokenizer=tok, text_encoder_2=transformers.CLIPTextModelWithProjection(_clip_text_config()), tokenizer_2=tok,
        text_encoder_3=_t5_encoder(32) if t5 else None, tokenizer_3=t5_tokenizer() if t5 else None)


def tiny_sd3_folder(tmp: Path, t5: bool = True) -> Path:
    """`tiny_sd3_pipeline` saved with `save_pretrained` to tmp/sd3; returns the folder."""
    folder = tmp / "sd3"
    tiny_sd3_pipeline(tmp, t5).save_pretrained(folder)
    return folder


def tiny_flux_folder(tmp: Path) -> Path:
    """A FluxPipeline with tiny random components (guidance embedding on) saved to tmp/flux."""
    import diffusers
    import transformers

    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
        max_shift=1.15)
    pipe = diffusers.FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=_vae(4, 0.1159, 0.3611),
        text_encoder=transformers.CLIPTextModel(_clip_text_config()), tokenizer=clip_tokenizer(tmp / "_clip_tok"),
        text_encoder_2=_t5_encoder(32), tokenizer_2=t5_tokenizer())
    folder = tmp / "flux"
    pipe.save_pretrained(folder)
    return folder


def tiny_clip_folder(tmp: Path, name: str = "pickscore", image_size: int = 32, projection_dim: int = 16) -> Path:
    """A transformers CLIPModel + CLIPProcessor folder (PickScore_v1's layout), tiny."""
    import transformers

    torch.manual_seed(1)
    config = transformers.CLIPConfig(
        text_config=_clip_text_config(projection_dim).to_dict(),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
                           image_size=image_size, patch_size=8, projection_dim=projection_dim),
        projection_dim=projection_dim)
    folder = tmp / name
    transformers.CLIPModel(config).save_pretrained(folder)
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": image_size},
                                                      crop_size={"height": image_size, "width": image_size})
    transformers.CLIPProcessor(image_processor=image_processor,
                               tokenizer=clip_tokenizer(tmp / f"_{name}_tok")).save_pretrained(folder)
    return folder


def tiny_dino_folder(tmp: Path, image_size: int = 28) -> Path:
    """A transformers Dinov2Model folder with its image processor config, tiny."""
    import transformers

    torch.manual_seed(2)
    config = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, image_size=image_size, patch_size=14)
    folder = tmp / "dino"
    transformers.Dinov2Model(config).save_pretrained(folder)
    transformers.BitImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size},
                                   image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
                                   ).save_pretrained(folder)
    return folder


TINY_OPEN_CLIP = {"embed_dim": 16,
                  "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def tiny_open_clip_folder(tmp: Path, name: str = "open_clip") -> Path:
    """An open_clip hf-hub-style folder: open_clip_config.json + open_clip_model.safetensors, tiny."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(3)
    model = open_clip.CLIP(**TINY_OPEN_CLIP)
    folder = tmp / name
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_OPEN_CLIP,
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def tiny_open_clip_checkpoint(tmp: Path, name: str = "hps.pt") -> tuple[Path, Path]:
    """An HPSv2-style checkpoint file ({'state_dict': ...}) and its architecture as an open_clip model
    config JSON file; returns (checkpoint, architecture json)."""
    import open_clip

    torch.manual_seed(4)
    model = open_clip.CLIP(**TINY_OPEN_CLIP)
    tmp.mkdir(parents=True, exist_ok=True)
    checkpoint = tmp / name
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    arch = tmp / "tiny-clip-arch.json"
    arch.write_text(json.dumps(TINY_OPEN_CLIP))
    return checkpoint, arch
