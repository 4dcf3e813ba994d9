"""PickScore (Kirstain et al. 2023): a CLIP-H fine-tuned on human preferences, as PickScore_v1 ships it
(a transformers CLIPModel folder; its processor is laion/CLIP-ViT-H-14-laion2B-s32B-b79K's).

score = logit_scale * cos(image, prompt) / 26, Flow-GRPO's scaling (raw PickScores sit near 20-23).
"""
from __future__ import annotations

import torch

from pec.perceptual.backbones import HFClip, backbone_dtype, load_hf_clip
from pec.rewards.base import ImageReward

PICKSCORE_SCALE = 26.0


class PickScoreReward(ImageReward):
    """PickScore / 26 of each (image, prompt) pair."""

    def __init__(self, clip: HFClip) -> None:
        super().__init__()
        self.clip = clip

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        sims = (self.clip.image_features(images) * self.clip.text_features(prompts)).sum(-1)
        return self.clip.logit_scale * sims / PICKSCORE_SCALE


def build_pickscore_reward(device: str | torch.device = "cpu", directory: object = None,
                           paths: object = None) -> PickScoreReward:
    """PickScore from --paths.pickscore (and --paths.pickscore_processor), on `device`."""
    clip = load_hf_clip(getattr(paths, "pickscore", None), "--paths.pickscore", device, backbone_dtype(device),
                        processor=getattr(paths, "pickscore_processor", None))
    return PickScoreReward(clip)
