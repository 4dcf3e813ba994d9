"""Perceptual spaces: frozen encoders images (B, C, H, W) in [0, 1] -> (B, D) float32, differentiable.

`ENCODERS.build(name, device=..., directory=..., paths=...)` (never downloads):
- the embedded world's "classifier", "simclr", "autoencoder" (8x8 digits, shipped weights), and
  "simclr_eval", a second SimCLR encoder (another seed) that only evaluation uses (`EVAL_ONLY_SPACES`:
  the regulariser may not use it, so diversity measured there is out of the regulariser's reach);
- real images: "dino" (DINOv2), "clip" (open_clip image tower), "pickscore" (PickScore's image tower),
  from local weights (`--paths.*`); `check_spaces` validates their paths from config files first.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from torch import nn

from pec.perceptual.encoders import FeatureEncoder, build_encoder, check_images
from pec.perceptual.real import CHECKS, SPACES, BackboneSpace
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


def build_space(name: str, device: str = "cpu", directory: object = None, paths: object = None) -> nn.Module:
    """The perceptual encoder `name` on `device` (embedded assets from `directory`, real weights from `paths`)."""
    return ENCODERS.build_with_options(name, {"paths": paths}, device=device, directory=directory)


__all__ = ["ENCODERS", "EMBEDDED_SPACES", "EVAL_ONLY_SPACES", "build_space", "FeatureEncoder", "BackboneSpace", "build_encoder", "check_images",
           "check_spaces"]
