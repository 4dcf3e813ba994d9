"""Rewards of videos (B, F, C, H, W) in [0, 1], the frames of a video model's clips.

Two kinds of reward, told apart by their attributes:
- an image reward (any registered one): `VideoReward` scores each of the `frames` frames that
  `pec.video.frame_indices` spreads over a clip (first and last included; 0 = every frame), in one batch
  with the clip's prompt repeated, and gives the clip their mean;
- a reward that takes videos (`takes_video = True`: the rule reward `temporal_smoothness`, the `http` reward,
  whose server gets the frames as `"videos"`) gets those frames as the clip (B, n, C, H, W). One that can
  only score videos also says `needs_video = True`; with an image model it is refused before any model
  loads (`pec.rewards.check_reward_spec`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pec.rewards.digit import check_prompts
from pec.video import spread_frames


def takes_video(reward: nn.Module) -> bool:
    """Whether `reward` scores clips (B, F, C, H, W) itself (its `takes_video` attribute)."""
    return bool(getattr(reward, "takes_video", False))


def needs_video(reward: object) -> bool:
    """Whether `reward` (a reward, or the factory registered for it) scores videos only (`needs_video`)."""
    return bool(getattr(reward, "needs_video", False))


class VideoReward(nn.Module):
    """`reward` on videos (B, F, C, H, W): the mean over `frames` frames of each clip for an image reward, those
    frames as the clip for a reward that takes videos (see the module docstring); (B,) float32, no grad."""

    takes_video = True

    def __init__(self, reward: nn.Module, frames: int = 4) -> None:
        super().__init__()
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 0:
            raise ValueError(f"--reward_video.frames must be an int >= 0 (0 = every frame), got {frames!r}")
        self.reward, self.frames = reward, frames

    @property
    def needs_video(self) -> bool:
        """The wrapped reward's."""
        return needs_video(self.reward)

    @torch.no_grad()
    def forward(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        clips = spread_frames(videos, self.frames)
        check_prompts(clips, prompts)
        if takes_video(self.reward):
            return self.reward(clips, list(prompts)).float()
        b, n = clips.shape[:2]
        scores = self.reward(clips.flatten(0, 1), [p for p in prompts for _ in range(n)]).float()
        return scores.reshape(b, n).mean(dim=1)
