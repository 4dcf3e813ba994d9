"""FLUX.2 dev and klein on tiny random pipelines saved in the real on-disk layouts (no downloads): the
`flux2` adapter against diffusers' own Flux2Pipeline / Flux2KleinPipeline `__call__` (one guided step, the
schedule, the timesteps of a whole sampler run and the decoded image), LoRA on Flow-Factory's targets,
full fine-tuning, and two steps of `python -m pec.train` from the shipped klein config, shrunk."""
import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from _tiny_diffusers import tiny_dino_folder  # noqa: E402
from _tiny_flux2 import tiny_flux2_folder  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline  # noqa: E402

import pec  # noqa: E402
from pec.checks import check_run  # noqa: E402
from pec.config import Config, ModelConfig, parse_config  # noqa: E402
from pec.models import check_model_config  # noqa: E402
from pec.models.flux import pack_latents, unpack_latents  # noqa: E402
from pec.models.flux2 import FLUX2_LORA_TARGETS, Flux2FlowModel  # noqa: E402
from pec.policy import Policy  # noqa: E402
from pec.sampling import cfg_velocities, sample  # noqa: E402
from pec.train import main as train_main  # noqa: E402

PROMPT = "a photo of a cat"
# Text tokens: dev's prompt follows FLUX.2's system message (54 tokens with the tiny tokenizer), klein's is 26.
SEQ = {"dev": 64, "klein-base": 32}
PIPELINES = {"dev": diffusers.Flux2Pipeline, "klein-base": diffusers.Flux2KleinPipeline}
CFG = {"dev": 1.0, "klein-base": 4.0}  # dev: distilled guidance 4.0 instead (the pipeline's default)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flux2")
    base = tiny_flux2_folder(tmp, "klein")
    # FLUX.2-klein-4B/9B are klein-base's layout with is_distilled set in model_index.json.
    distilled = tmp / "flux2-klein-distilled"
    distilled.mkdir()
    for item in base.iterdir():
        if item.name != "model_index.json":
            (distilled / item.name).symlink_to(item)
    index = json.loads((base / "model_index.json").read_text())
    (distilled / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    return {"dev": tiny_flux2_folder(tmp, "dev"), "klein-base": base, "klein": distilled,
            "dino": tiny_dino_folder(tmp)}


def _load(folders, variant, dtype):
    model = Flux2FlowModel.from_pretrained(str(folders[variant]), dtype=dtype, device="cpu", resolution=32,
                                           max_sequence_length=SEQ[variant], guidance=4.0)
    pipe = PIPELINES[variant].from_pretrained(str(folders[variant]), torch_dtype=getattr(torch, dtype),
                                              local_files_only=True)
    return model, pipe


def test_packing_is_flux1s_and_ids_are_the_pipelines():
    """FLUX.2 patchifies 2x2 then flattens the grid: token for token FLUX.1's packing."""
    z = torch.randn(2, 4, 6, 8)
    tokens = Flux2Pipeline._pack_latents(Flux2Pipeline._patchify_latents(z))
    assert torch.equal(tokens, pack_latents(z)) and torch.equal(unpack_latents(tokens, 6, 8), z)


def _capture_timesteps(transformer) -> tuple[list[torch.Tensor], object]:
    """The `timestep` argument of every forward of `transformer` (and the hook's handle)."""
    seen = []
    handle = transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["timestep"].clone()), with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", ["dev", "klein-base"])
def test_guided_steps_and_decode_match_the_pipeline(folders, variant, dtype):
    """The pipeline's own `__call__` (dev: distilled guidance 4; klein-base: true CFG 4 with "" as negative),
    3 steps, against the adapter: the schedule and every transformer timestep of a sampler run torch.equal
    (bfloat16 shows the rounding: sigma rounded to bf16 would differ at some step), dev's float32 guidance
    and the text ids torch.equal; the first step's velocities (the sampler's CFG forward) within 1e-5 in
    float32, and in bfloat16 within 2 bf16 ulps of the velocity's scale (2^-7 relative); the decoded images
    within 1e-5, or one bf16 ulp of [0.5, 1) (2^-8: the pipeline's postprocess rounds x / 2 + 0.5 to bf16)."""
    model, pipe = _load(folders, variant, dtype)
    assert model.variant == variant and model.sample_shape == (64, 16)
    assert torch.equal(model.img_ids, pipe._prepare_latent_ids(torch.zeros(1, 16, 8, 8))[0])
    x = torch.randn(1, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    seen, final = [], {}
    hook = pipe.transformer.register_forward_hook(
        lambda m, a, kw, out: seen.append((kw["timestep"].clone(), kw["guidance"], kw["txt_ids"], out[0].float())),
        with_kwargs=True)
    images = pipe(prompt=PROMPT, height=32, width=32, num_inference_steps=3, guidance_scale=4.0,
                  latents=x.transpose(1, 2).reshape(1, 16, 8, 8), max_sequence_length=SEQ[variant],
                  output_type="pt", callback_on_step_end=lambda p, i, t, kw: final.update(kw) or {}).images
    hook.remove()
    sigmas = model.schedule(3)
    assert torch.equal(sigmas, pipe.scheduler.sigmas)  # compute_empirical_mu, not FLUX.1's calculate_shift

    theirs = [t for t, *_ in seen][::2 if variant == "klein-base" else 1]  # klein: cond, uncond per step
    ours, handle = _capture_timesteps(model.transformer)
    sample(model, [PROMPT], num_steps=3, guidance_scale=CFG[variant], eta=0.7, seed=0)
    handle.remove()
    assert len(ours) == len(theirs) == 3
    for t, t_ref in zip(ours, theirs):
        assert t.dtype == getattr(torch, dtype) and torch.equal(t, t_ref.expand_as(t)), (t, t_ref)
    assert dtype == "float32" or any(not torch.equal(s.to(torch.bfloat16).reshape(1), t_ref)
                                     for s, t_ref in zip(sigmas[:-1], theirs))

    inputs = []
    hook = model.transformer.register_forward_pre_hook(
        lambda m, a, kw: inputs.append((kw["guidance"], kw["txt_ids"])), with_kwargs=True)
    cond, uncond = model.encode_prompts([PROMPT]), model.encode_prompts([""])
    with torch.no_grad():
        v_uncond, v_cond = cfg_velocities(model, x, sigmas[:1], cond, uncond, None, CFG[variant])
    hook.remove()
    guidance, txt_ids = inputs[0]
    assert torch.equal(txt_ids, seen[0][2][0])
    if variant == "dev":
        assert guidance.dtype == torch.float32 and torch.equal(guidance, seen[0][1])
        expected_cond, expected_uncond = seen[0][3], None
    else:  # the pipeline's cond forward, then its uncond forward with "" (no guidance input)
        assert guidance is None and seen[0][1] is None and seen[1][1] is None
        expected_cond, expected_uncond = seen[0][3], seen[1][3]
    tol = 1e-5 if dtype == "float32" else 2 ** -7 * expected_cond.abs().max()
    assert (v_cond - expected_cond).abs().max() <= tol
    if expected_uncond is not None:
        assert not torch.allclose(v_uncond, v_cond)
        assert (v_uncond - expected_uncond).abs().max() <= tol
    # The decoded image of the pipeline's final latents: batch-norm statistics undone, unpacked, VAE.
    with torch.no_grad():
        ours_images = model.decode(final["latents"].float()).clamp(0, 1)
    assert (ours_images - images).abs().max() <= (1e-5 if dtype == "float32" else 2 ** -8)


def test_lora_targets_full_fine_tuning_and_checkpointing(folders):
    cfg = Config()
    cfg.model.name, cfg.model.path, cfg.model.resolution = "flux2", str(folders["klein-base"]), 32
    cfg.model.dtype, cfg.model.max_sequence_length = "float32", 32
    policy = Policy(cfg, torch.device("cpu"))
    names = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    adapted = {n.split(".lora_")[0] for n in names}
    for target in FLUX2_LORA_TARGETS:  # each of Flow-Factory's targets is in the tiny transformer
        assert any(n.endswith(target) for n in adapted), target
    assert policy.model.transformer.is_gradient_checkpointing
    cfg.train.lora = False
    full = Policy(cfg, torch.device("cpu")).model
    assert all(p.requires_grad for p in full.transformer.parameters())
    assert not any(p.requires_grad for p in full.vae.parameters())
    prompts = full.encode_prompts([PROMPT])
    full.velocity(torch.randn(1, *full.sample_shape), torch.tensor([0.7]), prompts).square().mean().backward()
    grads = [p.grad for p in full.transformer.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_cfg_is_refused_for_dev_and_distilled_klein_only(folders):
    for variant in ("dev", "klein"):
        with pytest.raises(ValueError, match="--sampling.guidance_scale must be 1 for flux2"):
            check_model_config(ModelConfig(name="flux2", path=str(folders[variant])), guidance_scale=4.0)
        check_model_config(ModelConfig(name="flux2", path=str(folders[variant])), guidance_scale=1.0)
    check_model_config(ModelConfig(name="flux2", path=str(folders["klein-base"])), guidance_scale=4.0)


@pytest.mark.parametrize("name", ["flux2_klein", "flux2_klein_pec"])
def test_shipped_klein_configs_validate(folders, name):
    config = Path(pec.__file__).parent / "configs" / f"{name}.yaml"
    cfg = parse_config(["--config", str(config), "--model.path", str(folders["klein"]),
                        "--paths.dino", str(folders["dino"]), "--perceptual.spaces", "dino",
                        "--perceptual.space", "dino", "--reward", "jpeg:1.0"])
    check_run(cfg)
    assert cfg.model.name == "flux2" and cfg.method == ("pec" if name.endswith("pec") else "grpo")
    assert (cfg.sampling.num_steps, cfg.sampling.group_size, cfg.sampling.eta, cfg.train.lora_rank) == (4, 16, 0.5, 64)


def test_train_two_steps_from_the_shipped_klein_pec_config(folders, tmp_path):
    run_dir, prompts = tmp_path / "run", tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car\na blue dog\na dog\n")  # a small grid to sample
    train_main(["--config", str(Path(pec.__file__).parent / "configs" / "flux2_klein_pec.yaml"),
                "--model.path", str(folders["klein"]), "--model.resolution", "32", "--model.dtype", "float32",
                "--model.max_sequence_length", "32", "--device", "cpu", "--reward", "jpeg:1.0",
                "--paths.dino", str(folders["dino"]), "--perceptual.spaces", "dino", "--perceptual.space", "dino",
                "--sampling.group_size", "3", "--perceptual.k", "2", "--train.steps", "2", "--train.micro_batch", "3",
                "--train.lora_rank", "4", "--train.lora_alpha", "8", "--logging.progress", "false",
                "--logging.tensorboard", "false", "--logging.grid_samples", "2", "--data.prompts", str(prompts),
                "--run-dir", str(run_dir)])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert all(torch.isfinite(torch.tensor(float(row[k]))) for k in ("reward_mean", "loss", "grad_norm"))
        assert row["shaped_reward_mean"] != row["reward_mean"]  # PEC's bonus is there
    assert abs(rows[0]["first_update_ratio_dev"]) < 1e-4 and rows[0]["grad_norm"] > 0
