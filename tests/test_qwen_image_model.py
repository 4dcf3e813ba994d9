"""Qwen-Image (`--model.name qwen_image`) on a tiny random QwenImagePipeline saved in the real on-disk layout
(tests/_tiny_qwen.py; no downloads), loaded through the same code a user runs: one guided step against
the pipeline's own (negative prompt, true CFG, the norm rescale; float32 and bfloat16), the timesteps it
passes, its schedule and decode, padded prompt batches, LoRA / full fine-tuning, and two steps of
`python -m pec.train` from the shipped config."""
import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("open_clip")

from _tiny_diffusers import tiny_clip_folder, tiny_dino_folder, tiny_open_clip_folder  # noqa: E402
from _tiny_qwen import tiny_qwen_image_folder  # noqa: E402
from diffusers import QwenImagePipeline  # noqa: E402

import pec  # noqa: E402
from pec.checks import check_run  # noqa: E402
from pec.config import Config, parse_config  # noqa: E402
from pec.models.base import PromptBatch  # noqa: E402
from pec.models.qwen_image import QWEN_IMAGE_LORA_TARGETS, QwenImageFlowModel  # noqa: E402
from pec.policy import Policy  # noqa: E402
from pec.sampling import sample  # noqa: E402
from pec.train import main as train_main  # noqa: E402
from pec_kernels import cfg_velocity, guided_sde_step  # noqa: E402

PROMPT = "a photo of a cat"
CONFIGS = Path(pec.__file__).parent / "configs"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_qwen_image_folder(tmp_path_factory.mktemp("qwen"))


def _pipeline(folder, dtype):
    return QwenImagePipeline.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)


def _run_pipeline(pipe, steps=3, output_type="latent"):
    """The pipeline's own call with Qwen's true CFG, recording every transformer call (its keyword
    arguments and output) and every scheduler step (model_output, sample, prev_sample)."""
    record = {"calls": [], "outputs": [], "steps": []}
    hooks = [pipe.transformer.register_forward_pre_hook(
                 lambda m, a, kw: record["calls"].append({k: v.clone() if torch.is_tensor(v) else v
                                                          for k, v in kw.items()}), with_kwargs=True),
             pipe.transformer.register_forward_hook(lambda m, a, o: record["outputs"].append(o[0].clone()))]
    step = pipe.scheduler.step

    def recording_step(model_output, t, latents, **kwargs):
        out = step(model_output, t, latents, **kwargs)
        record["steps"].append((model_output.clone(), latents.clone(), out[0].clone()))
        return out

    pipe.scheduler.step = recording_step
    try:
        record["result"] = pipe(PROMPT, negative_prompt=" ", true_cfg_scale=4.0, height=32, width=32,
                                num_inference_steps=steps, output_type=output_type,
                                generator=torch.Generator().manual_seed(0)).images
    finally:
        del pipe.scheduler.step
        for hook in hooks:
            hook.remove()
    return record


def test_tokenizer_drops_exactly_the_template_prefix(folder):
    """The tiny tokenizer splits the chat template's prefix into 34 tokens, as Qwen2.5-VL's does, so the
    pipeline's drop_idx leaves the prompt and the template's suffix."""
    pipe = _pipeline(folder, torch.float32)
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    embeds, mask = pipe.encode_prompt([PROMPT, " "], device="cpu")
    assert embeds.shape[:2] == (2, 10) and mask.sum(1).tolist() == [10, 6]  # prompt + 5 suffix tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_guided_step_is_the_pipelines(folder, dtype):
    """Step 1 of 3 (sigma 0.58 under Qwen-Image's shifted schedule): the adapter's velocities in one
    [negative; prompt] batch (prompts of 6 and 10 tokens, padded and masked), `cfg_velocity` /
    `guided_sde_step` with cfg_renorm and eta 0 (an Euler step), against the pipeline's two forwards, its
    true CFG with the rescale, and its scheduler step.

    float32: velocities and the step within 1e-5. bfloat16: the transformer's outputs agree bit for bit;
    the pipeline combines and rescales in bf16 while `cfg_velocity` works in float32 on the same bf16
    velocities, so the combined velocity and x' agree to bf16 rounding, 2^-7 relative (a few bf16 ulps)."""
    pipe = _pipeline(folder, dtype)
    model = QwenImageFlowModel(pipe, resolution=32, max_sequence_length=512)
    record = _run_pipeline(pipe)
    assert model.cfg_renorm
    assert torch.equal(model.schedule(3), pipe.scheduler.sigmas.float())
    sigmas = model.schedule(3)
    cond_call, neg_call = record["calls"][2], record["calls"][3]  # step 1: the prompt's forward, then the negative's
    x = cond_call["hidden_states"]
    assert neg_call["encoder_hidden_states"].shape[1] == 6 and cond_call["encoder_hidden_states"].shape[1] == 10
    seen = []
    hook = model.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].clone()),
                                                       with_kwargs=True)
    prompts = PromptBatch.cat([model.encode_prompts([""]), model.encode_prompts([PROMPT])])
    with torch.no_grad():
        v_uncond, v_cond = model.velocity(torch.cat([x, x]), sigmas[1].expand(2), prompts).chunk(2)
    hook.remove()
    assert prompts.mask is not None and prompts.mask.sum(1).tolist() == [6, 10]
    assert torch.equal(seen[0], cond_call["timestep"].expand(2)) and seen[0].dtype == dtype
    pipe_cond, pipe_neg = record["outputs"][2].float(), record["outputs"][3].float()
    pipe_v, pipe_x, pipe_prev = record["steps"][1]
    v = cfg_velocity(v_uncond, v_cond, 4.0, cfg_renorm=True)
    out = guided_sde_step(x, v_uncond, v_cond, 4.0, sigmas[1], sigmas[2], noise=torch.zeros_like(x), eta=0.0,
                          cfg_renorm=True)
    assert torch.equal(pipe_x, x) and out.prev_sample.dtype == pipe_prev.dtype == dtype
    if dtype == torch.float32:
        for name, ours, theirs in (("v_cond", v_cond, pipe_cond), ("v_uncond", v_uncond, pipe_neg),
                                   ("v", v, pipe_v), ("prev_sample", out.prev_sample, pipe_prev)):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        # The rescale is what makes the step the pipeline's: plain CFG misses it by far more than 1e-5.
        assert (cfg_velocity(v_uncond, v_cond, 4.0) - pipe_v).abs().max() > 1e-3
    else:
        assert torch.equal(v_cond, pipe_cond) and torch.equal(v_uncond, pipe_neg)
        scale = pipe_v.float().abs().max().item()
        torch.testing.assert_close(v, pipe_v.float(), rtol=2 ** -7, atol=2 ** -7 * scale)
        torch.testing.assert_close(out.prev_sample.float(), pipe_prev.float(), rtol=2 ** -7, atol=2 ** -7 * scale)


def test_bf16_timesteps_are_the_pipelines_at_every_step(folder):
    """QwenImagePipeline passes t.to(latents dtype) / 1000; the adapter builds the same tensor bit for bit
    through the sampler at every step (its dtype included). Only bfloat16 shows the rounding."""
    pipe = _pipeline(folder, torch.bfloat16)
    model = QwenImageFlowModel(pipe, resolution=32)
    ours = []
    hook = model.transformer.register_forward_pre_hook(lambda m, a, kw: ours.append(kw["timestep"].clone()),
                                                       with_kwargs=True)
    sample(model, [PROMPT], num_steps=4, guidance_scale=4.0, eta=1.2, seed=0)
    hook.remove()
    theirs = [call["timestep"] for call in _run_pipeline(pipe, steps=4)["calls"][::2]]
    assert len(ours) == len(theirs) == 4
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b.expand(2)), (a, b)
    # The case matters: sigma as a float32 timestep (no rounding through t in bf16) differs at some step.
    assert any(not torch.equal(s.reshape(1), t.float()) for s, t in zip(model.schedule(4), theirs))


def test_schedule_decode_and_prompt_cache(folder):
    """The dynamic shift of Qwen-Image's scheduler config (mu from the packed tokens, exponential, a
    terminal 0.02), the pipeline's decode (per-channel mean / std, one frame), and prompts cached at their
    own token counts, padded and masked in a batch; "" is the negative prompt."""
    pipe = _pipeline(folder, torch.float32)
    model = QwenImageFlowModel(pipe, resolution=32, vae_batch=1)
    record = _run_pipeline(pipe, steps=4, output_type="pt")
    assert model.sample_shape == (4, 16) and model.image_seq_len == 4 and model.vae_scale_factor == 8
    assert torch.equal(model.schedule(4), pipe.scheduler.sigmas.float())
    assert model.schedule(4)[-2].item() == pytest.approx(0.02)  # shift_terminal
    with torch.no_grad():
        images = model.decode(record["steps"][-1][2])
    assert images.shape == (1, 3, 32, 32)
    torch.testing.assert_close(images.clamp(0, 1), record["result"], rtol=0, atol=1e-5)
    # One image at a time (checkpointed under grad) is the whole batch's decode, and differentiable.
    latents = torch.randn(2, *model.sample_shape, requires_grad=True)
    chunked = model.decode(latents)
    chunked.sum().backward()
    assert torch.isfinite(latents.grad).all() and latents.grad.abs().sum() > 0
    model.vae_batch = 0
    with torch.no_grad():
        torch.testing.assert_close(chunked.detach(), model.decode(latents), rtol=0, atol=1e-5)
    # The prompt cache keeps each prompt at its own length; a batch pads to the longest, with a mask.
    batch = model.encode_prompts([PROMPT, "", "a dog", PROMPT])
    assert batch.embeds.shape[:2] == (4, 10) and batch.pooled is None
    assert batch.mask.sum(1).tolist() == [10, 6, 7, 10]
    negative, _ = pipe.encode_prompt(" ", device="cpu")
    alone = model.encode_prompts([""])
    assert alone.mask is None and torch.equal(alone.embeds, negative)
    assert torch.equal(batch.embeds[1, :6], negative[0]) and not batch.embeds[1, 6:].any()
    assert model.prompt_cache.misses == 3
    # A padded row gives the velocity of the prompt alone (the mask hides the padding).
    x = torch.randn(2, *model.sample_shape)
    with torch.no_grad():
        padded = model.velocity(x, torch.tensor([0.7, 0.7]), batch.index(slice(1, 3)))
        single = model.velocity(x[:1], torch.tensor([0.7]), alone)
    torch.testing.assert_close(padded[:1], single, rtol=0, atol=1e-5)


def test_prompt_batch_without_masks_is_unchanged():
    """SD3 / FLUX batches (one token count, pooled embeddings, no mask) concatenate as before."""
    a = PromptBatch(torch.randn(2, 5, 3), torch.randn(2, 4))
    b = PromptBatch(torch.randn(1, 5, 3), torch.randn(1, 4))
    both = PromptBatch.cat([a, b])
    assert both.mask is None and torch.equal(both.embeds, torch.cat([a.embeds, b.embeds]))
    assert torch.equal(both.pooled, torch.cat([a.pooled, b.pooled]))
    assert both.repeat_interleave(2).index(slice(2, 4)).mask is None
    short = PromptBatch(torch.randn(1, 3, 3), torch.randn(1, 4))
    mixed = PromptBatch.cat([short, b]).repeat_interleave(2)
    assert mixed.mask.tolist() == [[True] * 3 + [False] * 2] * 2 + [[True] * 5] * 2
    assert torch.equal(mixed.index(slice(0, 1)).embeds[0, :3], short.embeds[0]) and torch.equal(mixed.pooled[2],
                                                                                                b.pooled[0])
    with pytest.raises(ValueError, match="pooled embedding or none"):
        PromptBatch.cat([a, PromptBatch(torch.randn(1, 5, 3))])


def test_lora_on_flow_grpos_targets_and_full_fine_tuning(folder):
    cfg = Config()
    cfg.model.name, cfg.model.path, cfg.model.resolution, cfg.model.dtype = "qwen_image", str(folder), 32, "float32"
    policy = Policy(cfg, torch.device("cpu"))
    names = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    adapted = {n.split(".lora_")[0] for n in names}
    for target in QWEN_IMAGE_LORA_TARGETS:
        assert any(n.endswith(target) for n in adapted), target
    assert policy.model.transformer.is_gradient_checkpointing
    cfg.train.lora, cfg.train.kl_beta = False, 0.01
    policy = Policy(cfg, torch.device("cpu"))
    model = policy.model
    assert all(p.requires_grad for p in model.transformer.parameters())
    assert not any(p.requires_grad for p in model.vae.parameters())
    x = torch.randn(2, *model.sample_shape)
    model.velocity(x, torch.tensor([0.9, 0.4]), model.encode_prompts([PROMPT, ""])).square().mean().backward()
    block = model.transformer.transformer_blocks[0]  # through the checkpointed block, to the image branch
    for weight in (block.attn.to_q.weight, block.attn.add_k_proj.weight, block.img_mlp.net[2].weight):
        assert weight.grad is not None and weight.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def spaces(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spaces")
    return {"pickscore": tiny_clip_folder(tmp), "dino": tiny_dino_folder(tmp), "clip": tiny_open_clip_folder(tmp)}


@pytest.mark.parametrize("name", ["flow_grpo_qwen_image", "flow_grpo_qwen_image_pec"])
def test_shipped_configs_validate(folder, spaces, name):
    """The README's commands, on the tiny folder in place of the real weights."""
    cfg = parse_config(["--config", str(CONFIGS / f"{name}.yaml"), "--model.path", str(folder),
                        *(f"--paths.{k}={v}" for k, v in spaces.items())])
    check_run(cfg)
    assert cfg.model.name == "qwen_image" and cfg.model.negative_prompt == " " and cfg.reward == "pickscore"
    assert cfg.sampling.guidance_scale == 4.0 and cfg.sampling.eta == 1.2 and cfg.sampling.num_steps == 10
    assert cfg.train.lora_rank == 64 and cfg.train.lora_alpha == 128 and cfg.model.gradient_checkpointing
    assert cfg.method == ("pec" if name.endswith("_pec") else "grpo")
    assert cfg.algorithm == "flow_grpo_fast" and cfg.sampling.sde_window is None
    assert cfg.flow_grpo_fast.window_size == 2 and cfg.flow_grpo_fast.window_range == [0, 5]


def test_train_two_steps_from_the_shipped_pec_config(folder, spaces, tmp_path):
    run_dir = tmp_path / "run"
    train_main(["--config", str(CONFIGS / "flow_grpo_qwen_image_pec.yaml"), "--model.path", str(folder),
                "--model.resolution", "32", "--model.dtype", "float32", "--device", "cpu",
                *(f"--paths.{k}={v}" for k, v in spaces.items()), "--sampling.prompts_per_step", "2",
                "--sampling.group_size", "2", "--perceptual.k", "1", "--sampling.num_steps", "2",
                "--flow_grpo_fast.window_range", "0", "2",
                "--train.steps", "2", "--train.micro_batch", "2", "--logging.progress", "false",
                "--logging.tensorboard", "false", "--logging.grid_samples", "2", "--run-dir", str(run_dir)])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("reward_mean", "loss", "perc_knn/pickscore", "grad_norm"):
            assert torch.isfinite(torch.tensor(float(row[key]))), key
    assert abs(rows[0]["first_update_ratio_dev"]) < 1e-4 and rows[0]["grad_norm"] > 0
