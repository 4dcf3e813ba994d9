"""open_clip rewards: `clipscore` (prompt alignment of any open_clip model) and `hpsv2` (Human
Preference Score v2 / v2.1: an open_clip ViT-H-14 fine-tuned on human preferences).

Both are the cosine similarity of the normalised image and prompt embeddings: HPSv2's score as its
reference code computes it (about 0.2-0.35), and CLIPScore without its 2.5 * max(., 0) rescaling.
The models load from an hf-hub-style folder (open_clip_config.json + weights; local or a hub id) or a
checkpoint file (local or ORG/NAME/FILE) plus its architecture (`--paths.hpsv2 HPS_v2.1_compressed.pt
--paths.hpsv2_arch ViT-H-14`).
"""
from __future__ import annotations

import torch

from pec.perceptual.backbones import OpenClip, backbone_dtype, load_open_clip
from pec.rewards.base import ImageReward


class ClipSimilarityReward(ImageReward):
    """cos(image, prompt) in an open_clip model's joint space."""

    def __init__(self, clip: OpenClip) -> None:
        super().__init__()
        self.clip = clip

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (self.clip.image_features(images) * self.clip.text_features(prompts)).sum(-1)


def build_clipscore_reward(device: str | torch.device = "cpu", directory: object = None,
                           paths: object = None) -> ClipSimilarityReward:
    """CLIPScore from --paths.clip (--paths.clip_arch for a checkpoint file), on `device`."""
    return ClipSimilarityReward(load_open_clip(getattr(paths, "clip", None), "--paths.clip",
                                               getattr(paths, "clip_arch", None), device, backbone_dtype(device)))


def build_hpsv2_reward(device: str | torch.device = "cpu", directory: object = None,
                       paths: object = None) -> ClipSimilarityReward:
    """HPSv2 from --paths.hpsv2 (--paths.hpsv2_arch, default ViT-H-14, for a checkpoint file), on `device`."""
    return ClipSimilarityReward(load_open_clip(getattr(paths, "hpsv2", None), "--paths.hpsv2",
                                               getattr(paths, "hpsv2_arch", None), device, backbone_dtype(device)))
