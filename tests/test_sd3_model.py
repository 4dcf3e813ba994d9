"""The diffusers SD3 adapter on tiny random pipelines saved in the real on-disk layout (no downloads)."""
import copy
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from _tiny_diffusers import tiny_sd3_folder, tiny_sd3_pipeline  # noqa: E402

from pec.config import ModelConfig  # noqa: E402
from pec.models import check_model_config  # noqa: E402
from pec.models.sd3 import SD3FlowModel  # noqa: E402
from pec.models.schedules import schedule_sigmas  # noqa: E402
from pec.sampling import sample  # noqa: E402


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return tiny_sd3_folder(tmp_path_factory.mktemp("sd3"))


def test_sd3_adapter_contract(tmp_path):
    pipe = tiny_sd3_pipeline(tmp_path)
    model = SD3FlowModel(pipe, resolution=16)
    assert model.sample_shape == (4, 8, 8)
    prompts = model.encode_prompts(["a photo of a cat", ""])
    assert prompts.embeds.shape[0] == 2 and prompts.pooled.shape == (2, 64)
    assert not torch.equal(prompts.embeds[0], prompts.embeds[1])
    latents = torch.randn(2, *model.sample_shape)
    v = model.velocity(latents, torch.tensor([1.0, 0.5]), prompts)
    assert v.shape == latents.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    latents.requires_grad_(True)
    images = model.decode(latents)
    assert images.shape == (2, 3, 16, 16)
    images.sum().backward()
    assert torch.isfinite(latents.grad).all() and latents.grad.abs().sum() > 0
    # Only the transformer trains; the text encoders are not submodules (model.to() leaves them be).
    assert all(not p.requires_grad for p in pipe.vae.parameters())
    assert all(not p.requires_grad for p in pipe.text_encoder.parameters())
    assert any(p.requires_grad for p in model.transformer.parameters())
    assert not any(n.startswith("pipeline") or "text_encoder" in n for n, _ in model.named_parameters())


def test_sd3_adapter_rejects_bad_resolution(tmp_path):
    with pytest.raises(ValueError, match="resolution"):
        SD3FlowModel(tiny_sd3_pipeline(tmp_path), resolution=13)


def test_load_from_folder_schedule_cache_and_decode_batches(sd3_folder):
    model = SD3FlowModel.from_pretrained(str(sd3_folder), dtype="float32", device="cpu", resolution=32, vae_batch=2)
    assert model.sample_shape == (4, 16, 16)
    # The sigma schedule is the one SD3's pipeline uses: the folder's scheduler config (shift 3).
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(str(sd3_folder / "scheduler"))
    assert scheduler.config.shift == 3.0
    scheduler.set_timesteps(6)
    assert torch.allclose(model.schedule(6), scheduler.sigmas.float())
    assert not torch.allclose(model.schedule(6), schedule_sigmas(6))  # the embedded model's unshifted one
    # Each prompt is encoded once; the cache answers exactly what a fresh encode gives.
    first = model.encode_prompts(["a red car", "a dog", "a red car"])
    assert model.prompt_cache.misses == 2
    again = model.encode_prompts(["a dog", "a red car"])
    assert model.prompt_cache.misses == 2
    assert torch.equal(again.embeds[1], first.embeds[0]) and torch.equal(again.pooled[0], first.pooled[1])
    fresh = model._encode(["a dog"], torch.device("cpu"))
    assert torch.allclose(fresh.embeds[0], again.embeds[0])
    # Micro-batched decoding gives what one batch gives.
    latents = torch.randn(5, *model.sample_shape)
    with torch.no_grad():
        chunked = model.decode(latents)
        model.vae_batch = 0
        whole = model.decode(latents)
    assert torch.allclose(chunked, whole, atol=1e-5)


def test_without_t5_and_reference_copy_shares_encoders(sd3_folder):
    model = SD3FlowModel.from_pretrained(str(sd3_folder), dtype="float32", device="cpu", resolution=16, t5=False)
    assert model.pipeline.text_encoder_3 is None
    batch = model.encode_prompts(["a cat"])
    assert torch.isfinite(batch.embeds).all()
    reference = copy.deepcopy(model)
    assert reference.transformer is not model.transformer and reference.vae is model.vae
    assert reference.pipeline.text_encoder is model.pipeline.text_encoder
    assert reference.prompt_cache is model.prompt_cache


def test_bf16_weights_give_float32_velocity(tmp_path):
    model = SD3FlowModel(tiny_sd3_pipeline(tmp_path).to(dtype=torch.bfloat16), resolution=16,
                         gradient_checkpointing=True)
    assert model.transformer.dtype == torch.bfloat16 and model.transformer.is_gradient_checkpointing
    prompts = model.encode_prompts(["a cat", ""])
    v = model.velocity(torch.randn(2, *model.sample_shape), torch.tensor([0.9, 0.3]), prompts)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()


def _capture_timesteps(transformer) -> tuple[list[torch.Tensor], object]:
    """The `timestep` argument of every forward of `transformer` (and the hook's handle)."""
    seen = []
    handle = transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["timestep"].clone()), with_kwargs=True)
    return seen, handle


def test_bf16_timesteps_are_the_pipelines_float32_timesteps(sd3_folder):
    # In float32 the adapter's old rounding to the weights' dtype changed nothing: only bfloat16 shows it.
    model = SD3FlowModel.from_pretrained(str(sd3_folder), dtype="bfloat16", device="cpu", resolution=16)
    pipe = model.pipeline
    ours, handle = _capture_timesteps(model.transformer)
    sample(model, ["a photo of a cat"], num_steps=5, guidance_scale=4.5, eta=0.7, seed=0)
    handle.remove()
    theirs, handle = _capture_timesteps(pipe.transformer)
    pipe("a photo of a cat", height=16, width=16, num_inference_steps=5, guidance_scale=4.5, output_type="latent",
         generator=torch.Generator().manual_seed(0))
    handle.remove()
    assert len(ours) == len(theirs) == 5
    for a, b in zip(ours, theirs):
        assert b.dtype == torch.float32 and torch.equal(a, b), (a, b)
    # The case matters: bf16 rounding would have changed some of them.
    assert any(not torch.equal(b.to(torch.bfloat16).float(), b) for b in theirs)


def test_folder_checks_name_the_option(sd3_folder, tmp_path):
    cfg = ModelConfig(name="sd3", path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="--model.path.*not a folder"):
        check_model_config(cfg)
    cfg.path = str(tmp_path)
    with pytest.raises(ValueError, match="--model.path.*no model_index.json"):
        check_model_config(cfg)
    cfg.path = str(sd3_folder)
    check_model_config(cfg)
    cfg.name = "flux"
    with pytest.raises(ValueError, match="holds a StableDiffusion3Pipeline.*--model.name"):
        check_model_config(cfg)
    cfg.name, cfg.resolution = "sd3", 500
    with pytest.raises(ValueError, match="--model.resolution"):
        check_model_config(cfg)
    # A transformer of another architecture in an SD3 folder.
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for item in sd3_folder.iterdir():
        (wrong / item.name).symlink_to(item)
    (wrong / "transformer").unlink()
    (wrong / "transformer").mkdir()
    (wrong / "transformer" / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    cfg.resolution, cfg.path = 512, str(wrong)
    with pytest.raises(ValueError, match="FluxTransformer2DModel.*another architecture"):
        check_model_config(cfg)
