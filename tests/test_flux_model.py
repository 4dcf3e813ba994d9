"""FLUX.1 and SD3 end to end on tiny random pipelines saved in the real on-disk layouts (no downloads):
the FLUX adapter against diffusers' own FluxPipeline helpers, and `python -m pec.train` two steps with
PEC, PCGS-guided and a multi-reward for both models, through the same loading code a user runs."""
import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("open_clip")

from _tiny_diffusers import (tiny_clip_folder, tiny_dino_folder, tiny_flux_folder, tiny_open_clip_folder,  # noqa: E402
                             tiny_sd3_folder)
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift  # noqa: E402

import pec  # noqa: E402
from pec.checks import check_run  # noqa: E402
from pec.config import Config, parse_config  # noqa: E402
from pec.models.flux import FLUX_LORA_TARGETS, FluxFlowModel, image_ids, pack_latents, unpack_latents  # noqa: E402
from pec.policy import Policy  # noqa: E402
from pec.sampling import sample  # noqa: E402
from pec.train import main as train_main  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    return {"flux": tiny_flux_folder(tmp), "sd3": tiny_sd3_folder(tmp), "clip": tiny_open_clip_folder(tmp),
            "dino": tiny_dino_folder(tmp), "pickscore": tiny_clip_folder(tmp)}


@pytest.fixture(scope="module")
def flux(world):
    return FluxFlowModel.from_pretrained(str(world["flux"]), dtype="float32", device="cpu", resolution=32,
                                         max_sequence_length=8, guidance=3.5)


def test_packing_and_ids_match_flux_pipeline():
    latents = torch.randn(2, 16, 6, 4)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 4))
    assert torch.equal(unpack_latents(packed, 6, 4), latents)
    assert torch.equal(image_ids(3, 2), FluxPipeline._prepare_latent_image_ids(1, 3, 2, "cpu", torch.float32))


def test_schedule_is_flux_pipelines_dynamic_shift(flux):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(flux.scheduler_config)
    assert scheduler.config.use_dynamic_shifting
    tokens = flux.sample_shape[0]
    assert tokens == (32 // flux.vae_scale_factor // 2) ** 2 == flux.image_seq_len
    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    scheduler.set_timesteps(sigmas=torch.linspace(1, 1 / 5, 5).numpy(), mu=mu)
    assert torch.allclose(flux.schedule(5), scheduler.sigmas.float())
    assert flux.schedule(5)[0] == 1 and flux.schedule(5)[-1] == 0


def test_velocity_uses_the_guidance_embedding_and_decode_unpacks(flux):
    prompts = flux.encode_prompts(["a photo of a cat", ""])
    assert prompts.embeds.shape == (2, 8, 32) and prompts.pooled.shape == (2, 32)
    latents = torch.randn(2, *flux.sample_shape)
    sigma = torch.tensor([1.0, 0.4])
    v = flux.velocity(latents, sigma, prompts)
    assert v.shape == latents.shape == (2, 64, 16) and v.dtype == torch.float32
    flux.guidance = 1.0
    try:
        assert not torch.allclose(flux.velocity(latents, sigma, prompts), v)
    finally:
        flux.guidance = 3.5
    # decode = the VAE on the unpacked latents mapped back by the VAE's scale and shift.
    with torch.no_grad():
        images = flux.decode(latents)
        vae = flux.vae
        z = unpack_latents(latents, 16, 16) / vae.config.scaling_factor + vae.config.shift_factor
        expected = (vae.decode(z).sample + 1) / 2
    assert images.shape == (2, 3, 32, 32) and torch.allclose(images, expected, atol=1e-5)


def test_bf16_timestep_and_guidance_are_the_pipelines(world):
    # FluxPipeline passes t.to(latents dtype) / 1000 (t the scheduler's float32 timestep) and a float32
    # guidance; the adapter builds the same tensors bit for bit. Only bfloat16 shows a difference.
    pipe = FluxPipeline.from_pretrained(str(world["flux"]), torch_dtype=torch.bfloat16, local_files_only=True)
    model = FluxFlowModel(pipe, resolution=32, max_sequence_length=8, guidance=3.5)
    captured = {"ours": [], "pipeline": []}

    def capture(into):
        return lambda module, args, kwargs: into.append((kwargs["timestep"].clone(), kwargs["guidance"].clone()))

    handle = model.transformer.register_forward_pre_hook(capture(captured["ours"]), with_kwargs=True)
    sample(model, ["a photo of a cat"], num_steps=6, guidance_scale=1.0, eta=0.9, seed=0)
    handle.remove()
    handle = pipe.transformer.register_forward_pre_hook(capture(captured["pipeline"]), with_kwargs=True)
    pipe("a photo of a cat", height=32, width=32, num_inference_steps=6, guidance_scale=3.5, max_sequence_length=8,
         output_type="latent", generator=torch.Generator().manual_seed(0))
    handle.remove()
    assert len(captured["ours"]) == len(captured["pipeline"]) == 6
    for (t, g), (t_ref, g_ref) in zip(captured["ours"], captured["pipeline"]):
        assert torch.equal(t, t_ref) and torch.equal(g, g_ref) and g.dtype == torch.float32, (t, t_ref)
    # The case matters: sigma rounded to bfloat16 (the adapter's old timestep) differs at some step.
    sigmas = model.schedule(6)[:-1]
    assert any(not torch.equal(s.to(torch.bfloat16).reshape(1), t_ref)
               for s, (t_ref, _) in zip(sigmas, captured["pipeline"]))


def test_lora_on_flow_grpos_flux_targets(world):
    cfg = Config()
    cfg.model.name, cfg.model.path, cfg.model.resolution, cfg.model.dtype = "flux", str(world["flux"]), 32, "float32"
    policy = Policy(cfg, torch.device("cpu"))
    names = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    adapted = {n.split(".lora_")[0] for n in names}
    for target in ("attn.to_q", "attn.add_k_proj", "ff.net.2", "ff_context.net.0.proj"):
        assert any(n.endswith(target) for n in adapted), target
    assert "attn.to_q" in FLUX_LORA_TARGETS and policy.model.transformer.is_gradient_checkpointing


def _train(world, tmp_path, name, resolution, extra):
    run_dir = tmp_path / f"{name}-run"
    train_main(["--model.name", name, "--model.path", str(world[name]), "--model.resolution", str(resolution),
                "--model.dtype", "float32", "--model.max_sequence_length", "8", "--device", "cpu",
                "--reward", "jpeg:1.0,clipscore:0.5", "--paths.clip", str(world["clip"]),
                "--paths.dino", str(world["dino"]), "--perceptual.spaces", "dino", "clip", "--perceptual.space",
                "dino", "--sampling.prompts_per_step", "2", "--sampling.group_size", "3", "--sampling.num_steps",
                "2", "--train.steps", "2", "--train.micro_batch", "3", "--logging.progress", "false",
                "--logging.tensorboard", "false", "--logging.grid_samples", "2", "--run-dir", str(run_dir), *extra])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert all(torch.isfinite(torch.tensor(float(row[k]))) for k in ("reward_mean", "loss", "perc_knn/dino",
                                                                         "perc_knn/clip", "grad_norm"))
    assert abs(rows[0]["first_update_ratio_dev"]) < 1e-4
    assert rows[0]["grad_norm"] > 0
    return rows


@pytest.mark.parametrize("name,resolution", [("flux", 32), ("sd3", 16)])
def test_train_two_steps_pec_and_pcgs_guided(world, tmp_path, name, resolution):
    cfg_scale = ["--sampling.guidance_scale", "1" if name == "flux" else "2"]
    prompts = tmp_path / "prompts.jsonl"  # --data.prompts: its 90% train split is what the run samples
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["a photo of a cat", "a red car", "a blue dog",
                                                                       "a dog", "a cat", "a car"]))
    rows = _train(world, tmp_path, name, resolution,
                  ["--method", "pec", "--pec.lambda", "0.05", "--data.prompts", str(prompts), *cfg_scale])
    assert all(row["shaped_reward_mean"] != row["reward_mean"] for row in rows)  # PEC's bonus is there
    # PCGS-guided; SD3 also fully fine-tuned with a KL to its reference copy (which shares the text encoders).
    full = ["--train.lora", "false", "--train.kl_beta", "0.01"] if name == "sd3" else []
    rows = _train(world, tmp_path / "g", name, resolution,
                  ["--method", "pcgs", "--pcgs.form", "guided", *cfg_scale, *full])
    assert name == "flux" or all(row["kl"] >= 0 for row in rows)


def test_flux_refuses_cfg_and_a_wrong_reward_before_loading(world, tmp_path):
    base = ["--model.name", "flux", "--model.path", str(world["flux"]), "--run-dir", str(tmp_path / "r")]
    with pytest.raises(SystemExit, match="guidance_scale must be 1 for flux"):
        train_main(base + ["--sampling.guidance_scale", "4.5"])
    with pytest.raises(SystemExit, match="unknown reward 'pickscor'"):
        train_main(base + ["--reward", "pickscor:1.0"])
    with pytest.raises(SystemExit, match="--paths.pickscore is empty"):
        train_main(base + ["--reward", "pickscore:1.0,jpeg:0.1"])
    assert not (tmp_path / "r").exists()


PAPER_RUNS = {"": ("pec", "pickscore", 0.05), "_dino": ("pec", "dino", 0.10), "_pcgs": ("pcgs", "pickscore", 0.05)}


@pytest.mark.parametrize("variant", list(PAPER_RUNS))
@pytest.mark.parametrize("model", ["flow_grpo_sd35", "flow_grpo_flux"])
def test_shipped_real_model_configs_validate(world, model, variant):
    """The README's commands for the paper's runs, on tiny folders in place of the real weights; the
    variants are a few lines over their base config."""
    name = model + variant
    config = Path(pec.__file__).parent / "configs" / f"{name}.yaml"
    model_dir = world["flux" if "flux" in name else "sd3"]
    cfg = parse_config(["--config", str(config), "--model.path", str(model_dir),
                        "--paths.pickscore", str(world["pickscore"]), "--paths.dino", str(world["dino"]),
                        "--paths.clip", str(world["clip"])])
    check_run(cfg)
    method, space, lam = PAPER_RUNS[variant]
    assert cfg.method == method and cfg.reward == "pickscore" and cfg.perceptual.space == space
    assert (cfg.pec.lambda_ if method == "pec" else cfg.pcgs.lambda_) == lam
    assert cfg.model.resolution == 512 and cfg.model.dtype == "bfloat16" and cfg.model.gradient_checkpointing


@pytest.mark.parametrize("name,billions", [("sd3.5-medium", (2.2, 2.6)), ("flux-dev", (11.8, 12.0))])
def test_real_transformer_shapes_have_the_real_sizes(name, billions):
    """The configs GPU benchmarks build with random weights (on 'meta': no memory here)."""
    from pec.models.shapes import random_transformer

    model = random_transformer(name)
    count = sum(p.numel() for p in model.parameters()) / 1e9
    assert billions[0] < count < billions[1], count
