"""The "digit" reward: the reward classifier's probability of the prompted digit.

Like PickScore, it is a learned preference-like score: RL on it pulls every sample toward the most
recognisable prototype of its digit, collapsing diversity.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from pec.data.prompts import prompt_digit
from pec.perceptual.encoders import check_images
from pec.perceptual.networks import load_network


def check_prompts(images: torch.Tensor, prompts: Sequence[str]) -> None:
    """ValueError unless there is one prompt string per image."""
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        raise ValueError(f"prompts must be a sequence of {images.shape[0]} strings (one per image), "
                         f"got {prompts!r:.80}")


class DigitReward(nn.Module):
    """reward(images (B, 1, 8, 8) in [0, 1], prompts) -> (B,) float32 probability of the prompted digit."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(images)
        check_prompts(images, prompts)
        digits = torch.tensor([prompt_digit(p) for p in prompts]).to(images.device, non_blocking=True)
        probs = self.classifier(images.float()).float().softmax(-1)
        return probs.gather(1, digits[:, None]).squeeze(1)


def build_digit_reward(device: str | torch.device = "cpu", directory: str | Path | None = None,
                       paths: object = None) -> DigitReward:
    """The digit reward over the shipped classifier, on `device` (`paths` is unused: no real weights)."""
    return DigitReward(load_network("classifier", device, directory)).to(device)
