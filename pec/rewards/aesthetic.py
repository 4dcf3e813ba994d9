"""The LAION aesthetic predictor as Flow-GRPO uses it: an MLP head (`sac+logos+ava1-l14-linearMSE.pth`)
on the L2-normalised image embedding of CLIP ViT-L/14 (a transformers CLIPModel folder,
openai/clip-vit-large-patch14). Scores are on the AVA 1-10 scale.

The paper's Aesthetic column uses Aesthetic Predictor v2.5 (SigLIP-based): that is the reward
"aesthetic_v25" (`pec.rewards.aesthetic_v25`), which shares this module's MLP and head-file loading.
Tables made with this reward say "LAION aesthetic v2 (CLIP-L/14 MLP)".
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from torch import nn

from pec.hub import resolve_path
from pec.perceptual.backbones import backbone_dtype, check_hf_clip, load_hf_clip
from pec.rewards.base import ImageReward

HEAD_WIDTHS = (1024, 128, 64, 16, 1)
HEAD_DROPOUT = (0.2, 0.2, 0.1, 0.0)
LAION_HEAD = "the LAION aesthetic head (sac+logos+ava1-l14-linearMSE.pth)"


def scoring_mlp(dim: int, dropout: tuple[float, ...]) -> nn.Sequential:
    """Linear layers dim -> 1024 -> 128 -> 64 -> 16 -> 1, with nn.Dropout(dropout[i]) after the i-th one where
    dropout[i] > 0: the layout (and so the state-dict indices) of both released aesthetic heads."""
    layers: list[nn.Module] = []
    widths = (dim,) + HEAD_WIDTHS
    for i in range(len(HEAD_WIDTHS)):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(dropout) and dropout[i] > 0:
            layers.append(nn.Dropout(dropout[i]))
    return nn.Sequential(*layers)


class AestheticHead(nn.Module):
    """The improved-aesthetic-predictor MLP: Linear layers 768 -> 1024 -> 128 -> 64 -> 16 -> 1 (state-dict
    keys layers.0, layers.2, layers.4, layers.6, layers.7, as the released .pth stores them)."""

    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.layers = scoring_mlp(dim, HEAD_DROPOUT)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


def check_aesthetic_head(path: str | Path | None, option: str = "--paths.aesthetic", what: str = LAION_HEAD) -> Path:
    """ValueError (naming `option` and `what` it must be) unless `path` is a head checkpoint file (local, or a
    hub file ORG/NAME/FILE[:REVISION] resolved through huggingface_hub's cache: `pec.hub`); its local path."""
    if not path:
        raise ValueError(f"{option} is empty: give {what}")
    file = resolve_path(path, option, "file")
    if not file.is_file():
        raise ValueError(f"{option}: {file} is not a file; it must be {what}")
    return file


def head_state(path: str | Path, option: str, what: str = LAION_HEAD) -> dict[str, torch.Tensor]:
    """The tensors of a head file (.pth, loaded with weights_only=True, or .safetensors); checked as
    `check_aesthetic_head`; a file that is no state dict raises ValueError naming `option`."""
    file = check_aesthetic_head(path, option, what)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{option}: {file} does not load as a state dict ({str(err).splitlines()[0][:160]}); it "
                         f"must be {what}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{option}: {file} holds a {type(state).__name__}, not a state dict; it must be {what}")
    return state


def check_aesthetic(paths: object) -> None:
    """Before loading: the head file, the CLIP folder, and that the head reads that CLIP's embedding width
    (the head is a 3 MB file; the CLIP width comes from its config.json)."""
    head = head_state(getattr(paths, "aesthetic", None), "--paths.aesthetic")
    folder = check_hf_clip(getattr(paths, "aesthetic_clip", None), "--paths.aesthetic_clip")
    width = json.loads((folder / "config.json").read_text()).get("projection_dim")
    first = head.get("layers.0.weight")
    if first is None or first.dim() != 2:
        raise ValueError("--paths.aesthetic is not a LAION aesthetic head (no 2-d layers.0.weight)")
    if first.shape[1] != width:
        raise ValueError(f"--paths.aesthetic reads {first.shape[1]}-d embeddings but --paths.aesthetic_clip gives "
                         f"{width}-d ones: use CLIP ViT-L/14 (openai/clip-vit-large-patch14) with this head")


def load_head(head: nn.Module, path: str | Path, option: str, what: str, fits: str) -> nn.Module:
    """`head` filled (strictly) from the state dict in `path`, frozen in eval mode. Tensors of other names or
    shapes raise ValueError naming `option`: "`option`: FILE is not `fits` (...); it must be `what`"."""
    file = check_aesthetic_head(path, option, what)
    try:
        head.load_state_dict(head_state(file, option, what))
    except RuntimeError as err:
        raise ValueError(f"{option}: {file} is not {fits} ({str(err).splitlines()[0][:160]}); it must be "
                         f"{what}") from None
    return head.eval().requires_grad_(False)


def load_aesthetic_head(path: str | Path, dim: int, option: str = "--paths.aesthetic") -> AestheticHead:
    """The head from its .pth / .safetensors state dict; a head of other shapes raises ValueError."""
    return load_head(AestheticHead(dim), path, option, LAION_HEAD,
                     f"an aesthetic head for {dim}-d CLIP embeddings (check --paths.aesthetic_clip is CLIP ViT-L/14)")


class AestheticReward(ImageReward):
    """head(encoder.image_features(images)), float32: the LAION head on the normalised CLIP ViT-L/14 image
    embedding, or (`pec.rewards.aesthetic_v25`) the v2.5 head on the normalised SigLIP pooled output."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.head(self.encoder.image_features(images))


def build_aesthetic_reward(device: str | torch.device = "cpu", directory: object = None,
                           paths: object = None) -> AestheticReward:
    """The aesthetic reward from --paths.aesthetic (head) and --paths.aesthetic_clip (CLIP ViT-L/14)."""
    head_path = check_aesthetic_head(getattr(paths, "aesthetic", None))
    clip = load_hf_clip(getattr(paths, "aesthetic_clip", None), "--paths.aesthetic_clip", device,
                        backbone_dtype(device))
    return AestheticReward(clip, load_aesthetic_head(head_path, clip.dim).to(device))
