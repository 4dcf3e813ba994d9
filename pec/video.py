"""Videos as the trainer sees them: a video model's `decode` gives (B, F, C, H, W) frames in [0, 1].

The perceptual spaces (`pec.perceptual.VideoSpace`), the rewards (`pec.rewards.VideoReward`) and the sample
grids (`pec.logging_utils.save_image_grid`) each look at a few frames spread over a clip; `frame_indices` is
the one rule that picks them, so all three see the same frames of a clip.
"""
from __future__ import annotations

import torch


def is_video(images: torch.Tensor) -> bool:
    """Whether `images` is a batch of videos (B, F, C, H, W) rather than of images (B, C, H, W)."""
    return images.dim() == 5


def check_videos(videos: object, name: str = "videos") -> torch.Tensor:
    """ValueError unless `videos` is a float tensor (B, F, C, H, W) with B, F >= 1 and C = 1 or 3."""
    if not isinstance(videos, torch.Tensor) or not videos.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of shape (B, F, C, H, W) in [0, 1], "
                         f"got {type(videos).__name__}")
    if videos.dim() != 5 or min(videos.shape[:2]) == 0 or videos.shape[2] not in (1, 3) or min(videos.shape[3:]) < 1:
        raise ValueError(f"{name} must have shape (B, F, C, H, W) with B, F >= 1 and C = 1 or 3, got "
                         f"{tuple(videos.shape)}")
    return videos


def frame_indices(num_frames: int, count: int) -> list[int]:
    """The indices of `count` frames spread evenly over a clip of `num_frames`, first and last included (one
    frame: the middle one); every frame when `count` is 0 or at least `num_frames`."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an int >= 0 (0 = every frame), got {count!r}")
    if count == 0 or count >= num_frames:
        return list(range(num_frames))
    if count == 1:
        return [(num_frames - 1) // 2]
    return [round(i * (num_frames - 1) / (count - 1)) for i in range(count)]


def spread_frames(videos: torch.Tensor, count: int) -> torch.Tensor:
    """(B, n, C, H, W): the `count` frames of each video (B, F, C, H, W) that `frame_indices` picks (a view
    when they are every frame)."""
    check_videos(videos)
    index = frame_indices(videos.shape[1], count)
    return videos if len(index) == videos.shape[1] else videos[:, index]
