"""Perceptual spaces of videos: a video's feature built from its frames' features in any image space.

`VideoSpace(space, pool, frames)` encodes the `frames` frames that `pec.video.frame_indices` spreads over
each clip (first and last included; 0 = every frame) with the image space, in one batch, and pools them:
- "mean": the mean of the frames' features (B, D): what the clip shows, not in which order;
- "concat": the frames' features side by side (B, n * D), in time order, so that motion counts: two clips
  of the same frames in another order, or moving at another speed, get different features.
The kNN and Gaussian entropies, the PEC surprisal, PCGS (its reward form reads the features, its guided
form backpropagates through the pooling into the frames) and the diversity metrics then take videos as they
take images. `build_space` wraps a space in it for a video model (`--perceptual.video_pool`,
`--perceptual.video_frames`).
"""
from __future__ import annotations

import torch
from torch import nn

from pec.config import VIDEO_POOLS
from pec.video import spread_frames


class VideoSpace(nn.Module):
    """An image space on videos: (B, F, C, H, W) in [0, 1] -> (B, D) ('mean') or (B, n * D) ('concat'),
    float32, differentiable in the frames (see the module docstring)."""

    def __init__(self, space: nn.Module, pool: str = "concat", frames: int = 4) -> None:
        super().__init__()
        if pool not in VIDEO_POOLS:
            raise ValueError(f"--perceptual.video_pool must be one of {list(VIDEO_POOLS)}, got {pool!r}")
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 0:
            raise ValueError(f"--perceptual.video_frames must be an int >= 0 (0 = every frame), got {frames!r}")
        self.space, self.pool, self.frames = space, pool, frames

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        """The videos' features: their chosen frames encoded in one batch of the image space, then pooled."""
        clips = spread_frames(videos, self.frames)
        b, n = clips.shape[:2]
        feats = self.space(clips.flatten(0, 1)).float().reshape(b, n, -1)
        return feats.mean(dim=1) if self.pool == "mean" else feats.flatten(1)
