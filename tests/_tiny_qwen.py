"""A tiny random-weight Qwen-Image checkpoint in the real on-disk layout, built offline (no downloads).

`tiny_qwen_image_folder(tmp)` writes a diffusers `QwenImagePipeline` folder with `save_pretrained`
(model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/) of:
- a Qwen2Tokenizer (byte-level BPE, Qwen's pre-tokenizer) over a tiny vocabulary whose merges make the
  pipeline's chat-template prefix exactly 34 tokens, as Qwen2.5-VL's tokenizer does (the pipeline drops
  that many), with Qwen's <|im_start|> / <|im_end|> special tokens;
- a Qwen2_5_VLForConditionalGeneration text encoder (1 layer, hidden 32, mrope) with a 1-block vision tower;
- a QwenImageTransformer2DModel (1 block, 2 heads x 8, joint dim 32, in 16 = 4 latent channels x 2x2);
- an AutoencoderKLQwenImage with Qwen-Image's 8x layout (three stages, temporal downsampling on the last
  two) at base dim 8, 4 latent channels, and per-channel latents_mean / latents_std;
- Qwen-Image's own scheduler config (dynamic exponential shift up to 8192 tokens, shift_terminal 0.02).
The folder loads through the same code a user runs.
"""
from __future__ import annotations

from pathlib import Path

import torch

TEMPLATE_WORDS = ("the image by detailing color shape size texture quantity text spatial relationships of objects "
                  "and background").split()
PROMPT_WORDS = "a photo cat dog red blue car handwritten".split()
# Qwen-Image's scheduler_config.json (Qwen/Qwen-Image on the hub).
QWEN_IMAGE_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 8192, "max_shift": 0.9,
                        "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
                        "time_shift_type": "exponential", "use_dynamic_shifting": True}


def qwen_tokenizer():
    """A transformers Qwen2Tokenizer over the bytes plus the template's and a few prompts' words."""
    import transformers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {"<|endoftext|>": 0}
    for char in sorted(ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    merges = []
    words = ["system", "user", "assistant", "Describe"] + ["\u0120" + w for w in TEMPLATE_WORDS + PROMPT_WORDS]
    for word in words:  # a chain of merges builds each word left to right
        for end in range(2, len(word) + 1):
            if word[:end] not in vocab:
                vocab[word[:end]] = len(vocab)
                merges.append((word[:end - 1], word[end - 1]))
    return transformers.Qwen2Tokenizer(vocab=vocab, merges=merges,
                                       additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def _text_encoder(vocab_size: int, eos_token_id: int):
    import transformers

    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
                         bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=0),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0]),
        image_token_id=1, video_token_id=2, vision_start_token_id=3, vision_end_token_id=4)
    return transformers.Qwen2_5_VLForConditionalGeneration(config)


def tiny_qwen_image_pipeline():
    """A QwenImagePipeline with tiny random components (VAE factor 8, 2x2 packing: 16 px per token)."""
    import diffusers

    torch.manual_seed(0)
    tokenizer = qwen_tokenizer()
    transformer = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(2, 2, 4))
    vae = diffusers.AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.05], latents_std=[1.5, 0.8, 2.0, 1.2])
    return diffusers.QwenImagePipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER), vae=vae,
        text_encoder=_text_encoder(len(tokenizer), tokenizer.convert_tokens_to_ids("<|im_end|>")),
        tokenizer=tokenizer, transformer=transformer)


def tiny_qwen_image_folder(tmp: Path) -> Path:
    """`tiny_qwen_image_pipeline` saved with `save_pretrained` to tmp/qwen_image; returns the folder."""
    folder = tmp / "qwen_image"
    tiny_qwen_image_pipeline().save_pretrained(folder)
    return folder
