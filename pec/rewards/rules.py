"""Rule-based rewards computed from pixels, the embedded analogues of Flow-GRPO's rule rewards.

- "contrast": mean |2x − 1| over pixels, in [0, 1]. Rewards crisp, saturated strokes over grey blur
  (a sharpness / aesthetic-like preference that needs no model).
- "smoothness": 1 − mean absolute difference between neighbouring pixels, in [0, 1]. The analogue of
  JPEG compressibility: fewer edges score higher, so pushed hard it thins or erases strokes.
Both ignore the prompt, so they are reward-hacking-prone exactly like compressibility rewards. They take
images of any size and 1 or 3 channels.
- "temporal_smoothness" (videos only): 1 − mean absolute difference between consecutive frames, in [0, 1];
  VBench's temporal-flickering score without its 0-255 scale. Pushed hard it freezes the clip (no motion).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pec.perceptual.backbones import check_real_images
from pec.rewards.digit import check_prompts
from pec.video import check_videos


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


class TemporalSmoothnessReward(nn.Module):
    """reward(videos (B, F, C, H, W), prompts) -> (B,) 1 − mean |frame t+1 − frame t| of the clips clamped to
    [0, 1]; it scores videos only (`needs_video`), of at least 2 frames.

    Registered as its own factory: the options a factory gets (device, directory, paths, ...) are accepted and
    unused (it has no weights), and the registry's entry is the class, whose `needs_video` is read before
    anything is built."""

    takes_video = True
    needs_video = True

    def __init__(self, **options: object) -> None:
        super().__init__()

    @torch.no_grad()
    def forward(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_videos(videos)
        check_prompts(videos, prompts)
        if videos.shape[1] < 2:
            raise ValueError(f"temporal_smoothness needs clips of at least 2 frames, got {videos.shape[1]} (set "
                             f"--reward_video.frames to 0 or 2 or more)")
        x = videos.float().clamp(0, 1)
        return 1 - (x[:, 1:] - x[:, :-1]).abs().flatten(1).mean(dim=1)
