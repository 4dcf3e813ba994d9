"""The shared part of the real-image rewards: input checks, batching and the backbone dtype.

A reward maps images (B, C, H, W) in [0, 1] and B prompts to (B,) float32 scores, without grad.
Real rewards score `batch_size` images at a time on the images' device; their frozen backbones run in
bf16 on a GPU (features are upcast to float32 before any similarity or head), float32 on the CPU.
"""
from __future__ import annotations

import abc
from collections.abc import Sequence

import torch
from torch import nn

from pec.perceptual.backbones import check_real_images
from pec.rewards.digit import check_prompts

DEFAULT_BATCH = 32


class ImageReward(nn.Module, abc.ABC):
    """reward(images (B, C, H, W) in [0, 1], prompts) -> (B,) float32, scored `batch_size` at a time."""

    batch_size: int = DEFAULT_BATCH

    def train(self, mode: bool = True) -> ImageReward:
        """Stays in eval mode: rewards are frozen."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_real_images(images)
        check_prompts(images, prompts)
        prompts = list(prompts)
        out = [self.score(images[i:i + self.batch_size], prompts[i:i + self.batch_size]).float()
               for i in range(0, images.shape[0], self.batch_size)]
        return torch.cat(out).to(images.device)

    @abc.abstractmethod
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(b,) scores of one batch (inputs already checked)."""
