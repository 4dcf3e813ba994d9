"""Perceptual spaces (DESIGN.md §5): frozen encoders images (B, C, H, W) in [0, 1] -> (B, D) float32.

`ENCODERS.build(name, device=...)` loads the shipped weights from pec/assets (never downloads).
A new space (e.g. DINOv2 or CLIP for SD3.5) plugs in by registering a factory under a new name.
"""
from __future__ import annotations

from functools import partial

from pec.perceptual.encoders import FeatureEncoder, build_encoder, check_images
from pec.registry import Registry

ENCODERS: Registry[FeatureEncoder] = Registry("perceptual encoder")
for _name in ("classifier", "simclr", "autoencoder"):
    ENCODERS.register(_name)(partial(build_encoder, _name))

__all__ = ["ENCODERS", "FeatureEncoder", "build_encoder", "check_images"]
