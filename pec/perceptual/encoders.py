"""Perceptual spaces of the digits world, the embedded analogues of the paper's PickScore / DINO / CLIP.

- "classifier": penultimate features of the reward classifier (the reward model's own space, as
  PickScore's image tower is for the PickScore reward).
- "simclr": an independently trained self-supervised encoder (SimCLR with digit augmentations, as
  DINO is self-supervised).
- "autoencoder": the latent code of a denoising autoencoder (a generic, reconstruction-driven space).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pec.data.digits import IMAGE_SHAPE
from pec.perceptual.networks import load_network


def check_images(images: object, name: str = "images") -> torch.Tensor:
    """ValueError unless `images` is a float tensor of shape (B, 1, 8, 8)."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of shape (B, 1, 8, 8), got {type(images).__name__}")
    if images.dim() != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE or images.shape[0] == 0:
        raise ValueError(f"{name} must have shape (B, 1, 8, 8) with B >= 1, got {tuple(images.shape)}")
    return images


class FeatureEncoder(nn.Module):
    """A frozen network's `features` as a perceptual encoder: images (B, 1, 8, 8) in [0, 1] -> (B, D) fp32.

    Differentiable with respect to the images (PCGS guidance backpropagates through it); its own
    parameters do not require grad.
    """

    def __init__(self, network: nn.Module, dim: int) -> None:
        super().__init__()
        self.network = network.eval().requires_grad_(False)
        self.dim = dim

    def train(self, mode: bool = True) -> FeatureEncoder:
        """Stays in eval mode: the encoder is frozen."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features (B, dim) float32."""
        check_images(images)
        return self.network.features(images.float()).float()


def build_encoder(name: str, device: str | torch.device = "cpu", directory: str | Path | None = None,
                  paths: object = None) -> FeatureEncoder:
    """The perceptual encoder over the shipped network `name`, on `device` (`paths`: unused, no real weights)."""
    network = load_network(name, device, directory)
    dim = network.config.get("feature_dim", network.config.get("latent_dim"))
    return FeatureEncoder(network, dim)
