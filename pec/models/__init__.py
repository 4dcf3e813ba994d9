"""Flow models by name (`--model.name`): `embedded` (the tiny digits model), `sd3` (SD3 / SD3.5),
`flux` (FLUX.1-dev), `flux2` (FLUX.2 dev and klein), `qwen_image` (Qwen-Image) and `wan` (Wan2.1 /
Wan2.2 text-to-video).

`MODELS` builds a model from its `ModelConfig`; a model plugs in with `register_model(name, check)`:
a loader `(cfg, device, empty_transformer=False) -> FlowModel` (with `empty_transformer`, the transformer
is built on the meta device and left unread, for `pec.distributed.load_sharded_transformer`) and,
optionally, a check `(cfg, guidance_scale) -> Path | None` that validates its options and folder from
config files only and returns the folder, so that `check_model_config` refuses a wrong path before any
weight loads. Loaders import their model module when called: naming a model never imports diffusers
pipelines it does not use.

`--model.path` is a local folder or a hub id resolved through huggingface_hub's cache at `--model.revision`
(`pec.hub`); `check_model_config` pins the revision of a hub id to the commit it resolved to.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from pec.config import ModelConfig
from pec.hub import is_hub_id
from pec.models.base import FlowModel
from pec.registry import Registry

MODELS: Registry[FlowModel] = Registry("model")
ModelCheck = Callable[[ModelConfig, float], Path | None]
_CHECKS: dict[str, ModelCheck] = {}
# The models that make videos: their `decode` gives frames (B, F, C, H, W), which the rewards, perceptual
# spaces and grids take on a few frames of each clip (`pec.video`).
VIDEO_MODELS = ("wan",)


def register_model(name: str, check: ModelCheck | None = None
                   ) -> Callable[[Callable[..., FlowModel]], Callable[..., FlowModel]]:
    """Decorator: register a loader `(cfg: ModelConfig, device) -> FlowModel` under `name`, with its
    config check (see the module docstring)."""
    if check is not None:
        _CHECKS[name] = check
    return MODELS.register(name)


def is_video_model(name: str) -> bool:
    """Whether the model `name` (`--model.name`) makes videos (`VIDEO_MODELS`), known before anything loads."""
    return name in VIDEO_MODELS


def check_model_config(cfg: ModelConfig, guidance_scale: float = 1.0) -> None:
    """ValueError, naming the option, for an unknown model, a missing / wrong folder or bad options.

    A hub id's revision is pinned: `cfg.revision` becomes the commit the id resolved to (the snapshot
    folder's name), so that the run's config.yaml names that snapshot and a resume or `pec.evaluate` loads
    the same weights, whatever the branch has become since.

    Args:
        cfg: the run's model options (its `revision` is set for a hub id).
        guidance_scale: the sampler's CFG scale (FLUX.1-dev is guidance-distilled: it must be 1).
    """
    if cfg.name not in MODELS.names():
        raise ValueError(f"--model.name must be one of {MODELS.names()}, got {cfg.name!r}")
    check = _CHECKS.get(cfg.name)
    folder = check(cfg, guidance_scale) if check is not None else None
    if folder is not None and is_hub_id(cfg.path):
        cfg.revision = folder.name


def check_diffusers_options(cfg: ModelConfig) -> None:
    """The options every diffusers model shares that option metadata cannot state: the dtype's name, a
    resolution that is a multiple of 16, the text-encoder placement."""
    from pec.models.diffusers_model import TEXT_ENCODER_PLACEMENTS, resolve_dtype

    resolve_dtype(cfg.dtype)
    if cfg.resolution % 16:
        raise ValueError(f"--model.resolution must be a positive multiple of 16, got {cfg.resolution}")
    if cfg.text_encoders not in TEXT_ENCODER_PLACEMENTS:
        raise ValueError(f"--model.text_encoders must be one of {TEXT_ENCODER_PLACEMENTS}, got {cfg.text_encoders!r}")


def _check_embedded(cfg: ModelConfig, guidance_scale: float) -> Path | None:
    """A hub id (or a revision) is resolved here; a local folder is read when the model loads."""
    from pec.models.embedded import EmbeddedFlowModel

    return EmbeddedFlowModel.check_path(cfg.path, cfg.revision) if cfg.revision or is_hub_id(cfg.path) else None


def _check_sd3(cfg: ModelConfig, guidance_scale: float) -> Path:
    from pec.models.sd3 import SD3FlowModel

    check_diffusers_options(cfg)
    return SD3FlowModel.check_path(cfg.path, cfg.t5, cfg.revision)


def _check_flux(cfg: ModelConfig, guidance_scale: float) -> Path:
    from pec.models.flux import FluxFlowModel

    check_diffusers_options(cfg)
    if guidance_scale != 1:
        raise ValueError(f"--sampling.guidance_scale must be 1 for flux (FLUX.1-dev is guidance-distilled: it "
                         f"has no CFG forward); set the distilled guidance with --model.guidance, got "
                         f"{guidance_scale}")
    return FluxFlowModel.check_path(cfg.path, cfg.revision)


def _check_flux2(cfg: ModelConfig, guidance_scale: float) -> Path:
    from pec.models.flux2 import Flux2FlowModel

    check_diffusers_options(cfg)
    folder = Flux2FlowModel.check_path(cfg.path, cfg.revision)
    variant = Flux2FlowModel.folder_variant(folder)
    if guidance_scale != 1 and variant != "klein-base":
        why = ("FLUX.2-dev is guidance-distilled: it has no CFG forward; set its distilled guidance with "
               "--model.guidance" if variant == "dev" else
               "this FLUX.2-klein is step-distilled (is_distilled in its model_index.json): its pipeline "
               "ignores CFG; klein-base folders take CFG")
        raise ValueError(f"--sampling.guidance_scale must be 1 for flux2 ({why}), got {guidance_scale}")
    return folder


def _check_qwen_image(cfg: ModelConfig, guidance_scale: float) -> Path:
    from pec.models.qwen_image import QwenImageFlowModel, check_max_sequence_length

    check_diffusers_options(cfg)
    check_max_sequence_length(cfg.max_sequence_length)
    return QwenImageFlowModel.check_path(cfg.path, cfg.revision)


def _check_wan(cfg: ModelConfig, guidance_scale: float) -> Path:
    from pec.models.wan import WanFlowModel

    check_diffusers_options(cfg)
    return WanFlowModel.check_path(cfg.path, frames=cfg.frames, resolution=cfg.resolution,
                                   train_experts=cfg.train_experts, guidance_scale_2=cfg.guidance_scale_2,
                                   revision=cfg.revision)


@register_model("embedded", check=_check_embedded)
def _embedded(cfg: ModelConfig, device: torch.device, empty_transformer: bool = False) -> FlowModel:
    from pec.models.embedded import EMBEDDED_DIR, EmbeddedFlowModel

    return EmbeddedFlowModel.from_pretrained(cfg.path or EMBEDDED_DIR, device=device,
                                             empty_transformer=empty_transformer, revision=cfg.revision)


@register_model("sd3", check=_check_sd3)
def _sd3(cfg: ModelConfig, device: torch.device, empty_transformer: bool = False) -> FlowModel:
    from pec.models.diffusers_model import model_kwargs
    from pec.models.sd3 import SD3FlowModel

    return SD3FlowModel.from_pretrained(cfg.path, device=str(device), t5=cfg.t5,
                                        empty_transformer=empty_transformer, **model_kwargs(cfg))


@register_model("flux", check=_check_flux)
def _flux(cfg: ModelConfig, device: torch.device, empty_transformer: bool = False) -> FlowModel:
    from pec.models.diffusers_model import model_kwargs
    from pec.models.flux import FluxFlowModel

    return FluxFlowModel.from_pretrained(cfg.path, device=str(device), guidance=cfg.guidance,
                                         empty_transformer=empty_transformer, **model_kwargs(cfg))


@register_model("flux2", check=_check_flux2)
def _flux2(cfg: ModelConfig, device: torch.device, empty_transformer: bool = False) -> FlowModel:
    from pec.models.diffusers_model import model_kwargs
    from pec.models.flux2 import Flux2FlowModel

    return Flux2FlowModel.from_pretrained(cfg.path, device=str(device), guidance=cfg.guidance,
                                          empty_transformer=empty_transformer, **model_kwargs(cfg))


@register_model("qwen_image", check=_check_qwen_image)
def _qwen_image(cfg: ModelConfig, device: torch.device, empty_transformer: bool = False) -> FlowModel:
    from pec.models.diffusers_model import model_kwargs
    from pec.models.qwen_image import QwenImageFlowModel

    return QwenImageFlowModel.from_pretrained(cfg.path, device=str(device), negative_prompt=cfg.negative_prompt,
                                              empty_transformer=empty_transformer, **model_kwargs(cfg))


@register_model("wan", check=_check_wan)
def _wan(cfg: ModelConfig, device: torch.device, empty_transformer: bool = False) -> FlowModel:
    from pec.models.diffusers_model import model_kwargs
    from pec.models.wan import WanFlowModel

    return WanFlowModel.from_pretrained(cfg.path, device=str(device), frames=cfg.frames, flow_shift=cfg.flow_shift,
                                        guidance_scale_2=cfg.guidance_scale_2, train_experts=cfg.train_experts,
                                        empty_transformer=empty_transformer, **model_kwargs(cfg))
