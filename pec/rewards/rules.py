"""Rule-based rewards computed from pixels, the embedded analogues of Flow-GRPO's rule rewards.

- "contrast": mean |2x − 1| over pixels, in [0, 1]. Rewards crisp, saturated strokes over grey blur
  (a sharpness / aesthetic-like preference that needs no model).
- "smoothness": 1 − mean absolute difference between neighbouring pixels, in [0, 1]. The analogue of
  JPEG compressibility: fewer edges score higher, so pushed hard it thins or erases strokes.
Both ignore the prompt, so they are reward-hacking-prone exactly like compressibility rewards. They take
images of any size and 1 or 3 channels.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pec.perceptual.backbones import check_real_images
from pec.rewards.digit import check_prompts


class ContrastReward(nn.Module):
    """reward(images, prompts) -> (B,) mean |2x − 1| of the images clamped to [0, 1]."""

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_real_images(images)
        check_prompts(images, prompts)
        return (images.float().clamp(0, 1) * 2 - 1).abs().mean(dim=(1, 2, 3))


class SmoothnessReward(nn.Module):
    """reward(images, prompts) -> (B,) 1 − mean |neighbour difference| of the images clamped to [0, 1]."""

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_real_images(images)
        check_prompts(images, prompts)
        x = images.float().clamp(0, 1)
        dx = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1)
        dy = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1)
        return 1 - torch.cat([dx, dy], dim=1).mean(dim=1)
