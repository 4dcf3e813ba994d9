"""Rewards (DESIGN.md §5): reward(images (B, C, H, W) in [0, 1], prompts) -> (B,) float32, no grad.

`REWARDS.build(name, device=...)` loads any shipped weights from pec/assets (never downloads).
"digit" is the learned, preference-like reward; "contrast" and "smoothness" are rule-based.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pec.registry import Registry
from pec.rewards.digit import DigitReward, build_digit_reward
from pec.rewards.rules import ContrastReward, SmoothnessReward

REWARDS: Registry[nn.Module] = Registry("reward")
REWARDS.register("digit")(build_digit_reward)


@REWARDS.register("contrast")
def build_contrast_reward(device: str | torch.device = "cpu", directory: str | Path | None = None) -> ContrastReward:
    """The contrast reward (no weights; `directory` is accepted for a uniform factory signature)."""
    return ContrastReward().to(device)


@REWARDS.register("smoothness")
def build_smoothness_reward(device: str | torch.device = "cpu",
                            directory: str | Path | None = None) -> SmoothnessReward:
    """The smoothness reward (no weights; `directory` is accepted for a uniform factory signature)."""
    return SmoothnessReward().to(device)


__all__ = ["REWARDS", "DigitReward", "ContrastReward", "SmoothnessReward"]
