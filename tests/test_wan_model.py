"""The Wan adapter (`--model.name wan`) on tiny random WanPipeline folders in the real on-disk layout (no
downloads): Wan2.1 T2V, Wan2.2 T2V A14B (two experts) and Wan2.2 TI2V-5B, loaded through the code a user
runs, against diffusers' own WanPipeline (velocity, decode, schedule and the expert hooks, tested directly;
`pec.train` and `pec.evaluate` runs on these folders: tests/test_wan_train.py)."""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from _tiny_wan import tiny_wan_folder  # noqa: E402

import pec  # noqa: E402
from pec.checks import check_run  # noqa: E402
from pec.config import Config, ModelConfig, parse_config  # noqa: E402
from pec.models import MODELS, check_model_config  # noqa: E402
from pec.models.wan import WAN_LORA_TARGETS, WanExperts, WanFlowModel  # noqa: E402
from pec.policy import Policy  # noqa: E402

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wan")
    return {kind: tiny_wan_folder(tmp, kind) for kind in ("wan21", "wan22", "ti2v")}


def _load(folder, **kwargs) -> WanFlowModel:
    options = {"dtype": "float32", "device": "cpu", "resolution": 32, "frames": 5, "max_sequence_length": 8}
    return WanFlowModel.from_pretrained(str(folder), **{**options, **kwargs})


def _flow_sigmas(num_steps: int, shift: float) -> np.ndarray:
    """UniPC's use_flow_sigmas schedule written out: linspace(1, 1/1000, N + 1)[:N] shifted, then a 0."""
    s = np.linspace(1, 1 / 1000, num_steps + 1)[:-1]
    return np.append(shift * s / (1 + (shift - 1) * s), 0.0)


def test_schedule_is_the_unipc_flow_sigmas_of_the_folder(folders):
    model = _load(folders["wan21"])
    unipc = diffusers.UniPCMultistepScheduler.from_pretrained(str(folders["wan21"] / "scheduler"))
    assert unipc.config.use_flow_sigmas and unipc.config.flow_shift == 3.0
    unipc.set_timesteps(10)
    sigmas = model.schedule(10)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (11,)
    # The same sigmas, except UniPC's 1 - 1e-6 start (kept off 1 for its log-SNR): an Euler step starts at 1.
    assert torch.equal(sigmas[1:], unipc.sigmas[1:]) and sigmas[0] == 1 and unipc.sigmas[0] < 1
    assert np.allclose(sigmas.numpy(), _flow_sigmas(10, 3.0), atol=1e-6)
    # Not FlowMatchEulerDiscreteScheduler's own sigmas at that shift (linspace from 1 to its shifted minimum).
    euler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    euler.set_timesteps(10)
    assert not torch.allclose(sigmas, euler.sigmas, atol=1e-4)
    # --model.flow_shift (diffusers' 5.0 at 720p) replaces the folder's.
    shifted = _load(folders["wan21"], flow_shift=5.0).schedule(10)
    assert np.allclose(shifted.numpy(), _flow_sigmas(10, 5.0), atol=1e-6)


def _pipeline_steps(pipe, sample_shape, guidance_scale, guidance_scale_2, num_steps=2):
    """Run `pipe` (its scheduler swapped for FlowMatchEulerDiscreteScheduler at its flow shift) and record each
    step: (guided velocity, latents, sigma) from scheduler.step, and each transformer forward (expert,
    timestep, output) in order."""
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=pipe.scheduler.config.flow_shift)
    steps, forwards = [], []
    original = pipe.scheduler.step

    def step(model_output, timestep, sample, **kwargs):
        steps.append((model_output.clone(), sample.clone()))
        return original(model_output, timestep, sample, **kwargs)

    pipe.scheduler.step = step
    hooks = _record(pipe, forwards)
    latents = torch.randn(1, *sample_shape, generator=torch.Generator().manual_seed(0))
    pipe(PROMPT, height=32, width=32, num_frames=5, num_inference_steps=num_steps, guidance_scale=guidance_scale,
         guidance_scale_2=guidance_scale_2, max_sequence_length=8, latents=latents, output_type="latent")
    for hook in hooks:
        hook.remove()
    return [(v, x, pipe.scheduler.sigmas[i].item()) for i, (v, x) in enumerate(steps)], forwards


def _record(pipe, into: list) -> list:
    """Forward hooks on the pipeline's transformer(s) appending (expert index, timestep, output)."""
    experts = [pipe.transformer] + ([pipe.transformer_2] if pipe.transformer_2 is not None else [])
    return [t.register_forward_hook(lambda m, args, kwargs, out, i=i: into.append(
        (i, kwargs["timestep"].clone(), out[0].clone())), with_kwargs=True) for i, t in enumerate(experts)]


# bfloat16 on the two-expert model (whose high-noise expert is Wan2.1's code path) and TI2V-5B's per-token
# timesteps; bf16 matmuls are slow on CPUs, so Wan2.1 runs in float32 only.
@pytest.mark.parametrize("kind,dtype", [("wan21", torch.float32), ("wan22", torch.float32), ("ti2v", torch.float32),
                                        ("wan22", torch.bfloat16), ("ti2v", torch.bfloat16)],
                         ids=["wan21-fp32", "wan22-fp32", "ti2v-fp32", "wan22-bf16", "ti2v-bf16"])
def test_one_guided_step_matches_the_pipeline(folders, kind, dtype):
    """Each step of WanPipeline (Euler at the folder's shift, CFG 4; Wan2.2: guidance_scale_2 3 for the
    low-noise expert, steps on both sides of the boundary) against the adapter at the same latents and
    sigma: the expert `expert_at` picks, the transformer's timestep tensor (torch.equal, float32; TI2V-5B:
    one per token), its outputs (bit for bit), and the guided velocity: within 1e-5 in float32; in bfloat16
    within 2^-7 relative + 2^-7 absolute, because WanPipeline combines CFG in bf16 and we in float32."""
    pipe = diffusers.WanPipeline.from_pretrained(str(folders[kind]), torch_dtype=dtype, local_files_only=True)
    two = kind == "wan22"
    model = WanFlowModel(pipe, resolution=32, frames=5, max_sequence_length=8, guidance_scale_2=3.0 if two else None)
    steps, theirs = _pipeline_steps(pipe, model.sample_shape, 4.0, 3.0 if two else None)
    assert len(steps) == 2 and len(theirs) == 4
    cond, uncond = model.encode_prompts([PROMPT]), model.encode_prompts([""])
    ours, experts = [], []
    hooks = _record(pipe, ours)
    for v_pipe, latents, sigma in steps:
        expert = model.expert_at(sigma)
        experts.append(expert)
        with model.use_expert(expert):  # the pipeline runs cond, then uncond
            v_cond = model.velocity(latents, torch.tensor([sigma]), cond)
            v_uncond = model.velocity(latents, torch.tensor([sigma]), uncond)
        scale = model.expert_guidance_scale(expert, 4.0)
        v = v_uncond + scale * (v_cond - v_uncond)
        assert v.dtype == torch.float32 and v.shape == latents.shape
        if dtype == torch.float32:
            assert torch.allclose(v, v_pipe, rtol=0, atol=1e-5), (v - v_pipe).abs().max()
        else:
            assert torch.allclose(v, v_pipe.float(), rtol=2 ** -7, atol=2 ** -7), (v - v_pipe.float()).abs().max()
    for hook in hooks:
        hook.remove()
    assert [e for e, _, _ in ours] == [e for e, _, _ in theirs] == [x for x in experts for _ in range(2)]
    assert experts == ([0, 1] if two else [0, 0])  # Wan2.2: t = 1000 >= 875, then 8.98 < 875
    for (_, t, out), (_, t_ref, out_ref) in zip(ours, theirs):
        assert t.dtype == torch.float32 and torch.equal(t, t_ref), (t, t_ref)
        assert torch.equal(out, out_ref)
    if kind == "ti2v":  # one timestep per latent token: 2 latent frames x (2/2) x (2/2) patches
        assert theirs[0][1].shape == (1, 2)


def test_experts_switch_velocity_and_guidance(folders):
    model = _load(folders["wan22"], guidance_scale_2=3.0)
    assert model.num_experts == 2 and isinstance(model.transformer, WanExperts)
    assert model.expert_at(1.0) == 0 and model.expert_at(0.875) == 0 and model.expert_at(0.8749) == 1
    assert model.expert_guidance_scale(0, 4.0) == 4.0 and model.expert_guidance_scale(1, 4.0) == 3.0
    prompts = model.encode_prompts([PROMPT])
    latents, sigma = torch.randn(1, *model.sample_shape), torch.tensor([0.5])
    high = model.velocity(latents, sigma, prompts)  # expert 0 outside any context
    with model.use_expert(1):
        low = model.velocity(latents, sigma, prompts)
        with model.use_expert(0):
            assert torch.equal(model.velocity(latents, sigma, prompts), high)
        assert torch.equal(model.velocity(latents, sigma, prompts), low)
    assert not torch.allclose(high, low)
    with pytest.raises(ValueError, match="expert index"):
        with model.use_expert(2):
            pass
    assert _load(folders["wan22"]).expert_guidance_scale(1, 4.0) == 4.0  # no guidance_scale_2: WanPipeline's rule
    # One expert: the FlowModel defaults' answers.
    single = _load(folders["wan21"])
    assert single.num_experts == 1 and single.expert_at(0.1) == 0 and single.expert_guidance_scale(0, 4.5) == 4.5
    with pytest.raises(ValueError, match="expert index"):
        with single.use_expert(1):
            pass


def test_flow_model_expert_defaults_are_a_single_expert():
    embedded = MODELS.build("embedded", cfg=ModelConfig(), device=torch.device("cpu"))
    assert embedded.expert_at(0.9) == embedded.expert_at(0.1) == 0
    assert embedded.expert_guidance_scale(0, 2.5) == 2.5
    with embedded.use_expert(0):
        pass


@pytest.mark.parametrize("kind", ["wan21", "ti2v"])
def test_decode_is_the_pipelines_video_in_frames(folders, kind):
    """Frames (B, F, 3, H, W) in [0, 1]: WanPipeline's decode (latents / (1 / latents_std) + latents_mean, then
    the VAE); one video per VAE call (--model.vae_batch 1) gives what one call on the batch gives."""
    model = _load(folders[kind], vae_batch=1)
    assert model.vae.dtype == torch.float32  # whatever --model.dtype: diffusers' Wan recommendation
    grad = kind == "wan21"  # differentiable in the latents, through the checkpointed micro-batch
    latents = (torch.randn(1 if grad else 2, *model.sample_shape) * 0.5).requires_grad_(grad)
    frames = model.decode(latents)
    if grad:
        (frames * torch.randn_like(frames)).sum().backward()
        assert torch.isfinite(latents.grad).all() and latents.grad.abs().sum() > 0
    with torch.no_grad():
        vae = model.vae
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
    assert frames.shape == (latents.shape[0], 5, 3, 32, 32) and frames.dtype == torch.float32
    assert torch.allclose(frames, (video.permute(0, 2, 1, 3, 4) + 1) / 2, atol=1e-5)
    assert frames.min() >= 0 and frames.max() <= 1


def test_prompts_are_umt5_states_encoded_once(folders):
    model = _load(folders["wan21"])
    first = model.encode_prompts(["a red car", "a dog", "a red car"])
    assert model.prompt_cache.misses == 2 and first.embeds.shape == (3, 8, 32) and first.pooled.shape == (3, 0)
    again = model.encode_prompts(["a dog", "a red car", ""])
    assert model.prompt_cache.misses == 3 and torch.equal(again.embeds[0], first.embeds[1])
    expected, _ = model.pipeline.encode_prompt(["a red car", ""], do_classifier_free_guidance=False,
                                               max_sequence_length=8, device="cpu")
    assert torch.equal(again.embeds[1], expected[0]) and torch.equal(again.embeds[2], expected[1])
    assert (expected[1, 1:] == 0).all()  # "" is one token (</s>), zero-padded as WanPipeline pads
    assert next(model.pipeline.text_encoder.parameters()).device.type == "cpu"
    assert not any("text_encoder" in n for n, _ in model.named_parameters())


def _policy(folder, **options) -> Policy:
    cfg = Config()
    cfg.model.name, cfg.model.path, cfg.model.resolution, cfg.model.frames = "wan", str(folder), 32, 5
    cfg.model.dtype, cfg.model.max_sequence_length = "float32", 8
    for key, value in options.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return Policy(cfg, torch.device("cpu"))


def _trainable_experts(model) -> set[int]:
    return {int(n.split(".")[2]) for n, p in model.named_parameters() if p.requires_grad}


def test_lora_and_full_fine_tuning_train_the_chosen_experts(folders):
    # LoRA on Flow-Factory's Wan targets, in both experts by default; the reference disables them.
    policy = _policy(folders["wan22"])
    names = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names) and _trainable_experts(policy.model) == {0, 1}
    adapted = {n.split(".lora_")[0].split(".", 5)[-1] for n in names}
    assert adapted == set(WAN_LORA_TARGETS), adapted
    assert policy.model.transformer.is_gradient_checkpointing
    # Only the high-noise expert: the low-noise one carries no adapter.
    policy = _policy(folders["wan22"], model__train_experts="high")
    assert _trainable_experts(policy.model) == {0}
    assert not any("lora_" in n for n, _ in policy.model.transformer.experts[1].named_parameters())
    model, latents = policy.model, torch.randn(1, *policy.model.sample_shape)
    prompts, sigma = model.encode_prompts([PROMPT]), torch.tensor([0.9])
    for p in model.transformer.experts[0].parameters():  # move the adapters off their zero start
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    adapted_v = model.velocity(latents, sigma, prompts)
    with policy.reference() as reference:
        assert not torch.allclose(reference.velocity(latents, sigma, prompts), adapted_v)
    # Full fine-tuning of the low-noise expert alone: its KL reference copies it and shares the frozen one.
    policy = _policy(folders["wan22"], model__train_experts="low", train__lora=False, train__kl_beta=0.01)
    assert _trainable_experts(policy.model) == {1}
    with policy.reference() as reference:
        experts, ref_experts = policy.model.transformer.experts, reference.transformer.experts
        assert ref_experts[0] is experts[0] and ref_experts[1] is not experts[1]
        assert not any(p.requires_grad for p in reference.parameters())
    # Wan2.1: the one transformer, as sd3 / flux.
    policy = _policy(folders["wan21"], train__lora=False)
    assert not isinstance(policy.model.transformer, WanExperts)
    assert all(p.requires_grad for p in policy.model.transformer.parameters())


def test_a_deep_copy_keeps_experts_and_shares_the_frozen_parts(folders):
    model = _load(folders["wan22"], train_experts="high")
    clone = copy.deepcopy(model)
    assert clone.transformer.experts[0] is not model.transformer.experts[0]
    assert clone.transformer.experts[1] is model.transformer.experts[1] and clone.vae is model.vae
    assert clone.prompt_cache is model.prompt_cache


def test_the_model_check_reads_the_folder_and_names_the_option(folders):
    cfg = ModelConfig(name="wan", path=str(folders["wan22"]), resolution=32, frames=5, train_experts="low",
                      guidance_scale_2=3.0)
    check_model_config(cfg, 4.0)
    cfg.path = str(folders["wan21"])
    with pytest.raises(ValueError, match="--model.train_experts low needs a two-expert model"):
        check_model_config(cfg, 4.0)
    cfg.train_experts = "both"
    with pytest.raises(ValueError, match="--model.guidance_scale_2 .* one transformer"):
        check_model_config(cfg, 4.0)
    cfg.guidance_scale_2, cfg.train_experts = None, "all"
    with pytest.raises(ValueError, match=r"--model.train_experts must be one of \('both', 'high', 'low'\)"):
        check_model_config(cfg, 4.0)
    cfg.train_experts, cfg.path, cfg.resolution = "both", str(folders["ti2v"]), 48
    with pytest.raises(ValueError, match="--model.resolution must be a multiple of 32"):
        check_model_config(cfg, 4.0)


@pytest.fixture(scope="module")
def judges(tmp_path_factory):
    pytest.importorskip("open_clip")
    from _tiny_diffusers import tiny_clip_folder, tiny_dino_folder, tiny_open_clip_folder

    tmp = tmp_path_factory.mktemp("judges")
    return {"pickscore": tiny_clip_folder(tmp), "dino": tiny_dino_folder(tmp), "clip": tiny_open_clip_folder(tmp)}


@pytest.mark.parametrize("name", ["wan21_t2v_1.3b", "wan21_t2v_1.3b_pec", "wan22_t2v_a14b", "wan22_t2v_a14b_pec"])
def test_shipped_wan_configs_validate(folders, judges, name):
    """The shipped configs with their peers' settings, on tiny folders in place of the real weights."""
    config = Path(pec.__file__).parent / "configs" / f"{name}.yaml"
    folder = folders["wan22" if "wan22" in name else "wan21"]
    paths = [arg for option, path in judges.items() for arg in (f"--paths.{option}", str(path))]
    cfg = parse_config(["--config", str(config), "--model.path", str(folder), *paths])
    check_run(cfg)  # what `pec.train` checks before any work
    assert cfg.model.name == "wan" and cfg.model.frames == 5 and cfg.train.lora and cfg.train.lora_rank == 64
    assert cfg.method == ("pec" if name.endswith("_pec") else "grpo") and cfg.reward == "pickscore"
    if name.endswith("_pec"):
        assert cfg.perceptual.space == "dino" and cfg.pec.lambda_ == 0.10
    if "wan22" in name:
        assert cfg.model.guidance_scale_2 == 3.0 and cfg.sampling.guidance_scale == 4.0
        assert cfg.model.train_experts == "both"
    else:
        assert cfg.model.flow_shift == 5.0 and cfg.sampling.guidance_scale == 1.0
