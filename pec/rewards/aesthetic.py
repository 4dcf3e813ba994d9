"""The LAION aesthetic predictor as Flow-GRPO uses it: an MLP head (`sac+logos+ava1-l14-linearMSE.pth`)
on the L2-normalised image embedding of CLIP ViT-L/14 (a transformers CLIPModel folder,
openai/clip-vit-large-patch14). Scores are on the AVA 1-10 scale.

The paper's Aesthetic column uses Aesthetic Predictor v2.5 (SigLIP-based), which is not supported
here: tables made with this reward say "LAION aesthetic v2 (CLIP-L/14 MLP)".
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from pec.perceptual.backbones import HFClip, backbone_dtype, check_hf_clip, load_hf_clip
from pec.rewards.base import ImageReward

HEAD_WIDTHS = (1024, 128, 64, 16, 1)
HEAD_DROPOUT = (0.2, 0.2, 0.1, 0.0)


class AestheticHead(nn.Module):
    """The improved-aesthetic-predictor MLP: Linear layers 768 -> 1024 -> 128 -> 64 -> 16 -> 1 (state-dict
    keys layers.0, layers.2, layers.4, layers.6, layers.7, as the released .pth stores them)."""

    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        widths = (dim,) + HEAD_WIDTHS
        for i in range(len(HEAD_WIDTHS)):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < len(HEAD_DROPOUT) and HEAD_DROPOUT[i] > 0:
                layers.append(nn.Dropout(HEAD_DROPOUT[i]))
        self.layers = nn.Sequential(*layers)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


def check_aesthetic_head(path: str | Path | None, option: str = "--paths.aesthetic") -> Path:
    """ValueError (naming `option`) unless `path` is a head checkpoint file."""
    if not path:
        raise ValueError(f"{option} is empty: give the LAION aesthetic head file (sac+logos+ava1-l14-linearMSE.pth)")
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"{option}: {file} is not a file; it must be the LAION aesthetic head "
                         f"(sac+logos+ava1-l14-linearMSE.pth)")
    return file


def _head_state(path: str | Path, option: str) -> dict[str, torch.Tensor]:
    file = check_aesthetic_head(path, option)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    return torch.load(str(file), map_location="cpu", weights_only=True)


def check_aesthetic(paths: object) -> None:
    """Before loading: the head file, the CLIP folder, and that the head reads that CLIP's embedding width
    (the head is a 3 MB file; the CLIP width comes from its config.json)."""
    head = _head_state(getattr(paths, "aesthetic", None), "--paths.aesthetic")
    folder = check_hf_clip(getattr(paths, "aesthetic_clip", None), "--paths.aesthetic_clip")
    width = json.loads((folder / "config.json").read_text()).get("projection_dim")
    first = head.get("layers.0.weight")
    if first is None or first.dim() != 2:
        raise ValueError("--paths.aesthetic is not a LAION aesthetic head (no 2-d layers.0.weight)")
    if first.shape[1] != width:
        raise ValueError(f"--paths.aesthetic reads {first.shape[1]}-d embeddings but --paths.aesthetic_clip gives "
                         f"{width}-d ones: use CLIP ViT-L/14 (openai/clip-vit-large-patch14) with this head")


def load_aesthetic_head(path: str | Path, dim: int, option: str = "--paths.aesthetic") -> AestheticHead:
    """The head from its .pth / .safetensors state dict; a head of other shapes raises ValueError."""
    file = check_aesthetic_head(path, option)
    state = _head_state(file, option)
    head = AestheticHead(dim)
    try:
        head.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{option}: {file} is not an aesthetic head for {dim}-d CLIP embeddings "
                         f"({str(err).splitlines()[0][:160]}); check --paths.aesthetic_clip is CLIP ViT-L/14") from None
    return head.eval().requires_grad_(False)


class AestheticReward(ImageReward):
    """head(normalised CLIP ViT-L/14 image embedding), float32."""

    def __init__(self, clip: HFClip, head: AestheticHead) -> None:
        super().__init__()
        self.clip = clip
        self.head = head

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.head(self.clip.image_features(images))


def build_aesthetic_reward(device: str | torch.device = "cpu", directory: object = None,
                           paths: object = None) -> AestheticReward:
    """The aesthetic reward from --paths.aesthetic (head) and --paths.aesthetic_clip (CLIP ViT-L/14)."""
    head_path = check_aesthetic_head(getattr(paths, "aesthetic", None))
    clip = load_hf_clip(getattr(paths, "aesthetic_clip", None), "--paths.aesthetic_clip", device,
                        backbone_dtype(device))
    return AestheticReward(clip, load_aesthetic_head(head_path, clip.dim).to(device))
