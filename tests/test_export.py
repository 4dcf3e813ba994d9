"""`python -m pec.export` on tiny runs of every real model in the real on-disk layouts (no downloads), each export
loaded by diffusers' own pipeline class and compared with our sampler on the same noise and ODE schedule.

Each model trains one step through `pec.train`'s main (in-process, a high learning rate so that the training
moves the samples far more than the tolerance: a test that a missing or mis-scaled LoRA would fail), then:
- the LoRA export goes into `PipelineClass.from_pretrained(base).load_lora_weights(export)` (Wan2.2 A14B: the
  low-noise expert's file too, `weight_name="transformer_2/..."` with `load_into_transformer_2=True`), and the
  merged export into `DiffusionPipeline.from_pretrained(export)`;
- both pipelines run 2 Euler steps (Wan's UniPC swapped for FlowMatchEulerDiscreteScheduler at its flow shift,
  as tests/test_wan_model.py does, and our sampler given the same sigmas) from our initial noise, CFG off; their
  latents after the last step must equal ours (the run's checkpoint in the trainer's Policy, `pec.sampling.sample`
  at eta 0) within TOL and their images (output_type "pt": decoded by the pipeline's own code) the images our
  model decodes within IMAGE_TOL, in float32. Measured: the LoRA exports bit for bit, the merged ones within
  4.8e-7 (latents) and 5.7e-6 (images, TI2V's VAE), while the training moves the latents by 0.022 to 0.63.
SD3, FLUX.1, FLUX.2 dev (Flux2Pipeline) and klein (Flux2KleinPipeline), Qwen-Image, Wan2.1, Wan2.2 A14B (two
experts) and Wan2.2 TI2V-5B are tested with both the LoRA and the merged export, and a full-fine-tuning Wan2.2
A14B run's export (both transformers); `pec.sample` on an SD3 merged export and a Wan2.2 LoRA export (videos)
against `pec.sample` on the run. The embedded model, a two-process run and milestones: tests/test_sample.py.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from _tiny_diffusers import tiny_dino_folder, tiny_flux_folder, tiny_sd3_folder  # noqa: E402
from _tiny_flux2 import tiny_flux2_folder  # noqa: E402
from _tiny_qwen import tiny_qwen_image_folder  # noqa: E402
from _tiny_wan import tiny_wan_folder  # noqa: E402

from pec.export import LORA_WEIGHTS, check_out, export, load_run, write_export  # noqa: E402
from pec.sample import main as sample_main  # noqa: E402
from pec.sampling import sample  # noqa: E402
from pec.train import main as train_main  # noqa: E402

PROMPT = "a photo of a cat"
STEPS = 2
# float32 on both sides: the LoRA export matches bit for bit or nearly (the same modules run); the merged one
# differs by rounding only (W + s B A applied once instead of W x + s B (A x)).
TOL = 1e-5
EFFECT = 100 * TOL  # the trained adapters must move the pipeline's latents by more than this
IMAGE_TOL = 5e-5  # images in [0, 1], decoded by the pipeline's VAE code and by ours from those latents


@dataclass
class Spec:
    """How one model trains tiny, and how its pipeline takes our noise and gives back latents."""

    model: str  # --model.name
    build: Callable[[Path], Path]
    resolution: int
    pipeline: str
    train: list[str] = field(default_factory=list)
    call: dict = field(default_factory=dict)
    to_input: Callable[[torch.Tensor, object], torch.Tensor] = lambda x, model: x
    euler: bool = False  # swap the pipeline's scheduler for FlowMatchEulerDiscreteScheduler at its flow shift


def _flux2_input(x, model):
    """Packed tokens (1, h*w, C) -> Flux2KleinPipeline's `latents` (1, C, h, w) (it packs them itself)."""
    side = int(x.shape[1] ** 0.5)
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


_WAN = dict(train=["--model.max_sequence_length", "8", "--model.frames", "5"],
            call={"guidance_scale": 1.0, "num_frames": 5, "max_sequence_length": 8}, euler=True)
SPECS = {
    "sd3": Spec("sd3", lambda tmp: tiny_sd3_folder(tmp), 16, "StableDiffusion3Pipeline",
                ["--model.max_sequence_length", "8"], {"guidance_scale": 1.0, "max_sequence_length": 8}),
    "flux": Spec("flux", tiny_flux_folder, 32, "FluxPipeline", ["--model.max_sequence_length", "8"],
                 {"guidance_scale": 3.5, "max_sequence_length": 8}),  # FLUX.1's distilled guidance = --model.guidance
    # FLUX.2 dev: distilled guidance as FLUX.1's; its prompt follows FLUX.2's system message (54 tiny tokens)
    "flux2-dev": Spec("flux2", lambda tmp: tiny_flux2_folder(tmp, "dev"), 32, "Flux2Pipeline",
                      ["--model.max_sequence_length", "64"], {"guidance_scale": 3.5, "max_sequence_length": 64},
                      to_input=_flux2_input),
    "flux2-klein": Spec("flux2", lambda tmp: tiny_flux2_folder(tmp, "klein"), 32, "Flux2KleinPipeline",
                        ["--model.max_sequence_length", "32"], {"guidance_scale": 1.0, "max_sequence_length": 32},
                        to_input=_flux2_input),
    "qwen_image": Spec("qwen_image", tiny_qwen_image_folder, 32, "QwenImagePipeline", [], {"true_cfg_scale": 1.0}),
    "wan21": Spec("wan", lambda tmp: tiny_wan_folder(tmp, "wan21"), 32, "WanPipeline", **_WAN),
    "wan22": Spec("wan", lambda tmp: tiny_wan_folder(tmp, "wan22"), 32, "WanPipeline", **_WAN),  # A14B: 2 experts
    "ti2v": Spec("wan", lambda tmp: tiny_wan_folder(tmp, "ti2v"), 32, "WanPipeline", **_WAN),  # TI2V-5B, text only
}


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    return tiny_dino_folder(tmp_path_factory.mktemp("dino"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dino):
    """(name, lora) -> (base folder, run folder, export, merged export, `_ours`), each run trained once: a LoRA
    run's LoRA export and its --merge export; a full-fine-tuning run's one export (no --merge) and None. The run
    loads once (`pec.export.load_run`, what `pec.export` does): our sampler runs on it, then it is exported (the
    LoRA before the merge, which fuses the adapters in place)."""
    cache = {}

    def get(name: str, lora: bool = True):
        if (name, lora) not in cache:
            spec, tmp = SPECS[name], tmp_path_factory.mktemp(name)
            base = spec.build(tmp)
            run = tmp / "run"
            train_main(["--model.name", spec.model, "--model.path", str(base), "--model.resolution",
                        str(spec.resolution), "--model.dtype", "float32", *spec.train, "--device", "cpu",
                        "--reward", "contrast", "--paths.dino", str(dino), "--perceptual.spaces", "dino",
                        "--perceptual.space", "dino", "--perceptual.k", "1", "--method", "none",
                        "--sampling.prompts_per_step", "1", "--sampling.group_size", "2", "--sampling.num_steps", "2",
                        "--train.steps", "1", "--train.lora", str(lora).lower(),
                        "--train.lr", "0.05" if lora else "0.01",
                        "--logging.progress", "false", "--logging.tensorboard", "false",
                        "--logging.grid_samples", "1", "--run-dir", str(run)])
            cfg, policy = load_run(str(run))
            ours = _ours(name, policy.model)
            first = tmp / ("lora" if lora else "full")
            write_export(str(run), cfg, policy, check_out(first, False))
            merged = tmp / "merged" if lora else None
            if lora:
                write_export(str(run), cfg, policy, check_out(merged, False), merge=True)
            cache[name, lora] = base, run, first, merged, ours
        return cache[name, lora]

    return get


def _ours(name: str, model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our sampler on `model` (a run's checkpoint): (initial noise in the pipeline's input layout, final latents,
    the images our model decodes from them, clamped to [0, 1] as the pipeline's are)."""
    spec = SPECS[name]
    noise = torch.randn(STEPS + 1, 1, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    sigmas = None
    if spec.euler:
        euler = diffusers.FlowMatchEulerDiscreteScheduler(shift=model.scheduler_config["flow_shift"])
        euler.set_timesteps(STEPS)
        sigmas = euler.sigmas
    with torch.no_grad():
        final = sample(model, [PROMPT], num_steps=STEPS, guidance_scale=1.0, eta=0.0, noise=noise,
                       sigmas=sigmas).latents[-1]
        return spec.to_input(noise[0], model), final, model.decode(final).clamp(0, 1)


def _pipeline(name: str, folder: Path, cls=None):
    """`cls.from_pretrained(folder)` (default: the model's pipeline class) in float32, its scheduler swapped for
    Euler at its flow shift where the model's ships another (Wan's UniPC)."""
    pipe = (cls or getattr(diffusers, SPECS[name].pipeline)).from_pretrained(str(folder), torch_dtype=torch.float32,
                                                                             local_files_only=True)
    if SPECS[name].euler:
        pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=pipe.scheduler.config.flow_shift)
    return pipe


def _run(name: str, pipe, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's own call from `latents`, CFG off: (its latents after the last step, as its
    callback_on_step_end sees them: our layout, e.g. FLUX's packed tokens; its images in [0, 1], a video
    pipeline's frames)."""
    size, seen = SPECS[name].resolution, {}

    def last(pipe, i, t, tensors):
        seen["latents"] = tensors["latents"].clone()
        return {}

    images = pipe(prompt=PROMPT, height=size, width=size, num_inference_steps=STEPS, latents=latents.clone(),
                  output_type="pt", callback_on_step_end=last, return_dict=False, **SPECS[name].call)[0]
    return seen["latents"], images


def _same_as_ours(name: str, pipe, latents: torch.Tensor, ours: torch.Tensor, images: torch.Tensor) -> None:
    """The pipeline's final latents are ours within TOL, and its images (decoded by its own VAE code) ours within
    IMAGE_TOL."""
    theirs, pictures = _run(name, pipe, latents)
    assert theirs.shape == ours.shape and pictures.shape == images.shape
    assert (theirs - ours).abs().max() <= TOL, (theirs - ours).abs().max()
    assert (pictures - images).abs().max() <= IMAGE_TOL, (pictures - images).abs().max()


@pytest.mark.parametrize("name", list(SPECS))
def test_diffusers_loads_the_lora_and_the_merged_export(trained, name):
    base, run, lora, merged, (latents, ours, images) = trained(name)
    pipe = _pipeline(name, base)
    before = _run(name, pipe, latents)[0]
    assert (before - ours).abs().max() > EFFECT, "the adapters barely moved the samples: the test would not see them"
    pipe.load_lora_weights(str(lora))
    two = name == "wan22"  # Wan2.2 A14B: the low-noise expert's LoRA, diffusers' load_into_transformer_2 convention
    if two:
        high_only = _run(name, pipe, latents)[0]
        assert (high_only - ours).abs().max() > EFFECT  # the second file matters
        pipe.load_lora_weights(str(lora), weight_name=f"transformer_2/{LORA_WEIGHTS}", load_into_transformer_2=True)
    _same_as_ours(name, pipe, latents, ours, images)
    whole = _pipeline(name, merged, diffusers.DiffusionPipeline)
    assert type(whole) is type(pipe)
    _same_as_ours(name, whole, latents, ours, images)
    # The model card's snippet: this pipeline class, the LoRA, and the guidance the run sampled with.
    card = (lora / "README.md").read_text()
    assert f"{SPECS[name].pipeline}.from_pretrained({str(base)!r}" in card
    assert f"load_lora_weights({str(lora)!r})" in card
    for key in ("guidance_scale", "true_cfg_scale"):
        if key in SPECS[name].call:
            assert f"{key}={SPECS[name].call[key]}" in card, card


def test_full_fine_tuning_exports_the_trained_transformers(trained):
    """A full-fine-tuning run of Wan2.2 A14B (both experts trained) exports a whole pipeline folder without
    --merge: both transformers as trained, the rest the base's; DiffusionPipeline loads it and samples ours."""
    base, run, full, _, (latents, ours, images) = trained("wan22", lora=False)
    manifest = json.loads((full / "export.json").read_text())
    assert (manifest["kind"], manifest["training"], manifest["merged"]) == ("model", "full", False)
    assert manifest["components"] == ["transformer", "transformer_2"] and manifest["lora"] is None
    assert "full fine-tuning" in (full / "README.md").read_text()
    assert (_run("wan22", _pipeline("wan22", base), latents)[0] - ours).abs().max() > EFFECT
    whole = _pipeline("wan22", full, diffusers.DiffusionPipeline)
    assert type(whole) is diffusers.WanPipeline
    _same_as_ours("wan22", whole, latents, ours, images)


def test_lora_export_layout_and_manifest(trained):
    base, run, lora, merged, _ = trained("wan22")
    manifest = json.loads((lora / "export.json").read_text())
    assert manifest["kind"] == "lora" and manifest["pipeline"] == "WanPipeline" and manifest["step"] == 1
    assert manifest["model"] == {"name": "wan", "path": str(base), "revision": None}
    assert manifest["lora_files"] == {"transformer": LORA_WEIGHTS, "transformer_2": f"transformer_2/{LORA_WEIGHTS}"}
    assert sorted(p.name for p in lora.iterdir()) == ["README.md", "config.yaml", "export.json", LORA_WEIGHTS,
                                                      "transformer_2"]
    assert (lora / "config.yaml").read_text() == (run / "config.yaml").read_text()
    card = (lora / "README.md").read_text()
    assert "load_into_transformer_2=True" in card and "WanPipeline.from_pretrained" in card
    # The merged folder: both experts written, every other component copied (not linked) from the base.
    whole = json.loads((merged / "export.json").read_text())
    assert whole["kind"] == "model" and whole["merged"] and whole["components"] == ["transformer", "transformer_2"]
    for component in ("vae", "text_encoder", "tokenizer", "scheduler"):
        for path in (merged / component).iterdir():
            assert not os.path.samefile(path, base / component / path.name)
    assert "DiffusionPipeline.from_pretrained" in (merged / "README.md").read_text()


def test_link_hard_links_the_base_components(trained, tmp_path):
    base, run, *_ = trained("sd3")
    export(str(run), tmp_path / "linked", merge=True, link=True)
    vae = tmp_path / "linked" / "vae" / "diffusion_pytorch_model.safetensors"
    assert os.path.samefile(vae, base / "vae" / vae.name)
    assert not os.path.samefile(tmp_path / "linked" / "transformer" / vae.name, base / "transformer" / vae.name)


def _pixels(folder: Path) -> dict[str, torch.Tensor]:
    """Each sample file of a `pec.sample` folder as uint8 values (every frame of a GIF)."""
    return {p.name: torch.stack([torch.from_numpy(np.asarray(f.convert("RGB")).copy())
                                 for f in ImageSequence.Iterator(Image.open(p))]).int()
            for p in sorted(folder.glob("p*-k*.*"))}


@pytest.mark.parametrize("name,export_kind", [("sd3", "merged"), ("wan22", "lora")])
def test_pec_sample_on_an_export_is_the_runs_sampler(trained, tmp_path, name, export_kind):
    """`pec.sample EXPORT` needs nothing but the export (its config, and the base model its manifest names) and
    samples what `pec.sample RUN` samples: the LoRA export exactly, the merged one within one step of 8 bits (the
    merge's float32 rounding); a video model's samples are GIFs, its grid frame strips and a GIF."""
    _, run, lora, merged, _ = trained(name)
    source = lora if export_kind == "lora" else merged
    args = ["--prompt", PROMPT, "--n", "2", "--eval.num_steps", "2", "--logging.progress", "false"]
    sample_main([str(run), *args, "--out", str(tmp_path / "run")])
    sample_main([str(source), *args, "--out", str(tmp_path / "export")])
    ours, theirs = _pixels(tmp_path / "run"), _pixels(tmp_path / "export")
    assert list(ours) == list(theirs) == ([f"p000-k00{k}.gif" for k in range(2)] if name == "wan22" else
                                          [f"p000-k00{k}.png" for k in range(2)])
    for key in ours:
        difference = (ours[key] - theirs[key]).abs().max()
        assert difference == 0 if export_kind == "lora" else difference <= 1, (key, difference)
    assert (tmp_path / "export" / "grid.png").is_file()
    assert (tmp_path / "export" / "grid.gif").is_file() == (name == "wan22")
