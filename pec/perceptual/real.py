"""Perceptual spaces of real images, as in the paper: `dino` (DINOv2), `clip` (an open_clip image tower)
and `pickscore` (PickScore's image tower).

Each maps images (B, C, H, W) in [0, 1], any size, to (B, D) float32 features. They are frozen and
differentiable end to end (preprocessing in torch), so PCGS's guided form can backpropagate through
them. Backbones run in bf16 on a GPU, float32 on the CPU. Weights come from `--paths.*`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pec.perceptual.backbones import (backbone_dtype, check_dino, check_hf_clip, check_open_clip, load_dino,
                                     load_hf_clip, load_open_clip)


class BackboneSpace(nn.Module):
    """A frozen backbone's `image_features` as a perceptual space (B, C, H, W) -> (B, dim) float32."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.dim = backbone.dim

    def train(self, mode: bool = True) -> BackboneSpace:
        """Stays in eval mode: the space is frozen."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.image_features(images).float()


def build_dino_space(device: str | torch.device = "cpu", directory: object = None,
                     paths: object = None) -> BackboneSpace:
    """DINOv2 CLS features from --paths.dino."""
    return BackboneSpace(load_dino(getattr(paths, "dino", None), "--paths.dino", device, backbone_dtype(device)))


def build_clip_space(device: str | torch.device = "cpu", directory: object = None,
                     paths: object = None) -> BackboneSpace:
    """open_clip image embeddings (normalised) from --paths.clip (--paths.clip_arch for a file)."""
    return BackboneSpace(load_open_clip(getattr(paths, "clip", None), "--paths.clip", getattr(paths, "clip_arch", None),
                                        device, backbone_dtype(device)))


def build_pickscore_space(device: str | torch.device = "cpu", directory: object = None,
                          paths: object = None) -> BackboneSpace:
    """PickScore's image embeddings (normalised) from --paths.pickscore."""
    return BackboneSpace(load_hf_clip(getattr(paths, "pickscore", None), "--paths.pickscore", device,
                                      backbone_dtype(device), processor=getattr(paths, "pickscore_processor", None)))


SPACES: dict[str, Callable[..., BackboneSpace]] = {"dino": build_dino_space, "clip": build_clip_space,
                                                   "pickscore": build_pickscore_space}
CHECKS: dict[str, Callable[[object], object]] = {
    "dino": lambda p: check_dino(getattr(p, "dino", None)),
    "clip": lambda p: check_open_clip(getattr(p, "clip", None), "--paths.clip", getattr(p, "clip_arch", None)),
    "pickscore": lambda p: check_hf_clip(getattr(p, "pickscore", None), "--paths.pickscore",
                                         processor=getattr(p, "pickscore_processor", None)),
}
