"""Tiny random-weight FLUX.2 checkpoints in the real on-disk layouts, built offline (no downloads).

- `tiny_flux2_folder(tmp, "dev")`: a `Flux2Pipeline` folder (Flux2Transformer2DModel with the guidance
  embedding, AutoencoderKLFlux2, a Mistral3ForConditionalGeneration text encoder and a PixtralProcessor
  tokenizer with a chat template), as FLUX.2-dev ships it.
- `tiny_flux2_folder(tmp, "klein")`: a `Flux2KleinPipeline` folder (no guidance embedding, a Qwen3ForCausalLM
  text encoder and a Qwen2 tokenizer with a chat template that takes `enable_thinking`), as FLUX.2-klein-4B
  ships it; `distilled` sets model_index.json's `is_distilled` (klein: true, klein-base: false).

The text encoders have just enough layers for the pipelines' default hidden-state taps (dev 10/20/30,
klein 9/18/27); everything else is a few dozen channels. The VAE's batch-norm statistics are random, so
decoding exercises them. Loaded by the same code a user runs.
"""
from __future__ import annotations

from pathlib import Path

import torch
from _tiny_diffusers import WORDS

TEXT_HIDDEN = 16  # the transformer's joint_attention_dim is 3 x this (three hidden-state taps stacked)
# Chat templates of the same form as the real ones (only the pipeline's own calls need to work).
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{%- for m in messages %}{%- if m['role'] == 'system' %}[SYSTEM_PROMPT]"
    "{{ m['content'][0]['text'] }}[/SYSTEM_PROMPT]{%- else %}[INST]{%- for c in m['content'] %}"
    "{%- if c['type'] == 'text' %}{{ c['text'] }}{%- else %}[IMG]{%- endif %}{%- endfor %}[/INST]{%- endif %}"
    "{%- endfor %}")
QWEN3_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- if enable_thinking is defined and "
    "enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}{%- endif %}")


def _byte_level_vocab(specials: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary (every byte; the tiny WORDS and the words of FLUX.2-dev's system
    message merged into one token each, so that prompts fit in a short max_sequence_length) and its merges."""
    import re

    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(WORDS + re.findall(r"[a-z]+", SYSTEM_MESSAGE.lower())):
        piece = "\u0120"  # "Ġ": a word after a space, as byte-level pre-tokenisation splits it
        for ch in word:
            if piece + ch not in vocab:
                merges.append((piece, ch))
                vocab[piece + ch] = len(vocab)
            piece += ch
    return vocab, merges


def _qwen2_tokenizer(specials: list[str], chat_template: str, **kwargs):
    import transformers

    vocab, merges = _byte_level_vocab(specials)
    tok = transformers.Qwen2Tokenizer(vocab=vocab, merges=merges, **kwargs)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = chat_template
    return tok


def _transformer(guidance_embeds: bool):
    import diffusers

    return diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=3 * TEXT_HIDDEN, timestep_guidance_channels=16,
        axes_dims_rope=(2, 2, 2, 2), guidance_embeds=guidance_embeds)


def _vae():
    """AutoencoderKLFlux2, VAE factor 2, 4 latent channels (16 once patchified 2x2), random BN statistics."""
    import diffusers

    vae = diffusers.AutoencoderKLFlux2(
        block_out_channels=(4, 4), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=1,
        sample_size=32)
    vae.bn.running_mean.copy_(torch.randn(16) * 0.3)
    vae.bn.running_var.copy_(torch.rand(16) + 0.5)
    return vae


def _scheduler():
    import diffusers

    # FLUX.2-dev's and -klein's scheduler_config.json: dynamic shifting (the pipelines compute mu themselves).
    return diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
        max_shift=1.15, time_shift_type="exponential")


def _mistral3():
    import transformers

    text = transformers.MistralConfig(
        vocab_size=512, hidden_size=TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=30, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=128)
    vision = transformers.PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=32, patch_size=8, head_dim=8)
    config = transformers.Mistral3Config(text_config=text, vision_config=vision, spatial_merge_size=1,
                                         image_token_index=3)
    return transformers.Mistral3ForConditionalGeneration(config)


def _pixtral_processor():
    import transformers

    specials = ["<s>", "</s>", "<pad>", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]",
                "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    tok = _qwen2_tokenizer(specials, MISTRAL_TEMPLATE, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                           unk_token=None)
    image_processor = transformers.PixtralImageProcessor(size={"longest_edge": 32}, patch_size=8)
    return transformers.PixtralProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                                         spatial_merge_size=1, chat_template=MISTRAL_TEMPLATE)


def _qwen3():
    import transformers

    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=512, hidden_size=TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=27, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=128))


def tiny_flux2_pipeline(variant: str = "klein", distilled: bool = False):
    """A Flux2Pipeline ('dev') or Flux2KleinPipeline ('klein') with tiny random components."""
    import diffusers

    torch.manual_seed(0)
    if variant == "dev":
        return diffusers.Flux2Pipeline(scheduler=_scheduler(), vae=_vae(), text_encoder=_mistral3(),
                                       tokenizer=_pixtral_processor(), transformer=_transformer(True))
    if variant != "klein":
        raise ValueError(f"variant must be 'dev' or 'klein', got {variant!r}")
    tok = _qwen2_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"], QWEN3_TEMPLATE)
    return diffusers.Flux2KleinPipeline(scheduler=_scheduler(), vae=_vae(), text_encoder=_qwen3(), tokenizer=tok,
                                        transformer=_transformer(False), is_distilled=distilled)


def tiny_flux2_folder(tmp: Path, variant: str = "klein", distilled: bool = False) -> Path:
    """`tiny_flux2_pipeline` saved with `save_pretrained` to tmp/flux2-<variant>; returns the folder."""
    folder = tmp / (f"flux2-{variant}" + ("-distilled" if distilled else ""))
    tiny_flux2_pipeline(variant, distilled).save_pretrained(folder)
    return folder
