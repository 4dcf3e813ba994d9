"""Perceptual spaces: frozen encoders images (B, C, H, W) in [0, 1] -> (B, D) float32, differentiable.

`ENCODERS.build(name, device=..., directory=..., paths=...)`:
- the embedded world's "classifier", "simclr", "autoencoder" (8x8 digits, shipped weights), and
  "simclr_eval", a second SimCLR encoder (another seed) that only evaluation uses (`EVAL_ONLY_SPACES`:
  the regulariser may not use it, so diversity measured there is out of the regulariser's reach);
- real images: "dino" (DINOv2), "clip" (open_clip image tower), "pickscore" (PickScore's image tower),
  from local weights or hub ids (`--paths.*`, `pec.hub`); `check_spaces` validates their paths from config
  files first.
Videos (B, F, C, H, W): any of them wrapped in `VideoSpace` (`build_space(..., video_pool=...)`), which
builds a video's feature from its frames' features.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from pec.config import Config
from pec.models import is_video_model
from pec.perceptual.encoders import FeatureEncoder, build_encoder, check_images
from pec.perceptual.real import CHECKS, SPACES, BackboneSpace
from pec.perceptual.video import VideoSpace
from pec.registry import Registry

ENCODERS: Registry[nn.Module] = Registry("perceptual encoder")
EVAL_ONLY_SPACES = ("simclr_eval",)
EMBEDDED_SPACES = ("classifier", "simclr", "autoencoder", *EVAL_ONLY_SPACES)  # the digits world's spaces
for _name in EMBEDDED_SPACES:
    ENCODERS.register(_name)(partial(build_encoder, _name))
for _name, _factory in SPACES.items():
    ENCODERS.register(_name)(_factory)


def check_spaces(names: Sequence[str], paths: object = None) -> None:
    """ValueError for an unknown space or a missing / wrong local folder of a real one (config files only)."""
    for name in names:
        if name not in ENCODERS.names():
            raise ValueError(f"--perceptual.spaces: unknown perceptual encoder {name!r}; "
                             f"choose from {ENCODERS.names()}")
        if name in CHECKS:
            CHECKS[name](paths)


def build_space(name: str, device: str = "cpu", directory: object = None, paths: object = None,
                video_pool: str | None = None, video_frames: int = 4) -> nn.Module:
    """The perceptual encoder `name` on `device` (embedded assets from `directory`, real weights from `paths`);
    with `video_pool` ('mean' or 'concat', a video model's run) it takes videos: `VideoSpace` over
    `video_frames` frames of each clip."""
    space = ENCODERS.build_with_options(name, {"paths": paths}, device=device, directory=directory)
    return space if video_pool is None else VideoSpace(space, video_pool, video_frames)


def space_for_run(name: str, cfg: Config, device: str | torch.device) -> nn.Module:
    """The perceptual space `name` as a run of `cfg` uses it (the trainer's and the evaluator's): its weights from
    `cfg.assets` / `cfg.paths`, and for a video model pooled over frames (`perceptual.video_pool`,
    `perceptual.video_frames`)."""
    pool = ({"video_pool": cfg.perceptual.video_pool, "video_frames": cfg.perceptual.video_frames}
            if is_video_model(cfg.model.name) else {})
    return build_space(name, device=device, directory=cfg.assets, paths=cfg.paths, **pool)


__all__ = ["ENCODERS", "EMBEDDED_SPACES", "EVAL_ONLY_SPACES", "build_space", "FeatureEncoder", "BackboneSpace", "build_encoder", "check_images",
           "check_spaces", "space_for_run", "VideoSpace"]
