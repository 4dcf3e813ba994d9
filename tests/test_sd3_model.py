"""The diffusers SD3 adapter on a tiny randomly initialised pipeline (no downloads)."""
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from pec.models.sd3 import SD3FlowModel  # noqa: E402


def _tiny_tokenizer(tmp_path):
    words = ["a", "photo", "of", "cat", "dog"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in words:
        vocab[w + "</w>"] = len(vocab)
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"),
                                   model_max_length=77)


def _tiny_pipeline(tmp_path):
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    clip_config = transformers.CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
        num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=100, projection_dim=32,
        hidden_act="gelu")
    vae = diffusers.AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 4), layers_per_block=1,
        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035)
    tok = _tiny_tokenizer(tmp_path)
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=vae, text_encoder=transformers.CLIPTextModelWithProjection(clip_config), tokenizer=tok,
        text_encoder_2=transformers.CLIPTextModelWithProjection(clip_config), tokenizer_2=tok,
        text_encoder_3=None, tokenizer_3=None)


def test_sd3_adapter_contract(tmp_path):
    pipe = _tiny_pipeline(tmp_path)
    model = SD3FlowModel(pipe, resolution=16)
    assert model.sample_shape == (4, 8, 8)
    prompts = model.encode_prompts(["a photo of a cat", ""])
    assert prompts.embeds.shape[0] == 2 and prompts.pooled.shape == (2, 64)
    assert not torch.equal(prompts.embeds[0], prompts.embeds[1])
    latents = torch.randn(2, *model.sample_shape)
    v = model.velocity(latents, torch.tensor([1.0, 0.5]), prompts)
    assert v.shape == latents.shape and torch.isfinite(v).all()
    latents.requires_grad_(True)
    images = model.decode(latents)
    assert images.shape == (2, 3, 16, 16)
    images.sum().backward()
    assert torch.isfinite(latents.grad).all() and latents.grad.abs().sum() > 0
    # Only the transformer trains.
    assert all(not p.requires_grad for p in pipe.vae.parameters())
    assert any(p.requires_grad for p in model.transformer.parameters())


def test_sd3_adapter_rejects_bad_resolution(tmp_path):
    with pytest.raises(ValueError, match="resolution"):
        SD3FlowModel(_tiny_pipeline(tmp_path), resolution=13)
