"""Aesthetic Predictor v2.5 (discus0434/aesthetic-predictor-v2-5), the paper's Aesthetic column: an MLP head
(`aesthetic_predictor_v2_5.pth`) on the L2-normalised pooled output (the attention-pooling head) of the
SigLIP vision tower google/siglip-so400m-patch14-384, as that package's `AestheticPredictorV2_5Model`
computes it. Scores are on its 1-10 scale (5.5+ reads as good).

Both parts come from local paths or hub ids (`pec.hub`): --paths.aesthetic_v25 (the head file) and
--paths.aesthetic_v25_siglip (a transformers folder of the SigLIP model or its vision tower, with its
preprocessor_config.json). The SigLIP
preprocessing runs in torch: resize to the processor's height x width (no crop; antialiased bicubic, where
the processor resizes with PIL's bicubic), clamp to [0, 1], normalise with the processor's mean / std.
The tower runs in bf16 on a GPU, its pooled output and the head in float32. Tables made with this reward
say "Aesthetic Predictor v2.5 (SigLIP so400m MLP)".
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pec.hub import load_options
from pec.perceptual.backbones import FrozenBackbone, _config, _folder, backbone_dtype, check_real_images
from pec.rewards.aesthetic import AestheticReward, check_aesthetic_head, head_state, load_head, scoring_mlp

V25_DROPOUT = (0.5, 0.5, 0.5, 0.2)
V25_HEAD = "the Aesthetic Predictor v2.5 head (aesthetic_predictor_v2_5.pth of discus0434/aesthetic-predictor-v2-5)"
SIGLIP = ("a transformers SigLIP folder (google/siglip-so400m-patch14-384: config.json, preprocessor_config.json "
          "and weights)")
SIGLIP_TYPES = ("siglip", "siglip_vision_model")
HEAD_OPTION = "--paths.aesthetic_v25"
SIGLIP_OPTION = "--paths.aesthetic_v25_siglip"


class AestheticV25Head(nn.Module):
    """The v2.5 MLP: Linear layers hidden -> 1024 -> 128 -> 64 -> 16 -> 1 with a dropout after each but the
    last (state-dict keys scoring_head.0, .2, .4, .6, .8, as the released .pth stores them)."""

    def __init__(self, dim: int = 1152) -> None:
        super().__init__()
        self.scoring_head = scoring_mlp(dim, V25_DROPOUT)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.scoring_head(embeddings).squeeze(-1)


@dataclass(frozen=True)
class SiglipPreprocess:
    """SigLIP's image processor in torch: resize to (height, width), clamp to [0, 1], normalise."""

    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] (grey is repeated to RGB) -> normalised (B, 3, height, width) float32."""
        check_real_images(images)
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[2:]) != (self.height, self.width):
            x = F.interpolate(x, size=(self.height, self.width), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0.0, 1.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


@dataclass(frozen=True)
class SiglipFolder:
    """What a checked SigLIP folder holds: its path, the vision tower's width and the preprocessing."""

    path: Path
    dim: int
    preprocess: SiglipPreprocess


def check_siglip(path: str | Path | None, option: str = SIGLIP_OPTION) -> SiglipFolder:
    """Validate a SigLIP folder from its config files only (config.json: a SigLIP model or vision tower with
    the attention-pooling head; preprocessor_config.json: size height / width, image_mean, image_std)."""
    import transformers

    folder = _folder(path, option, SIGLIP)
    _config(folder, option, SIGLIP, SIGLIP_TYPES)
    config = transformers.SiglipVisionConfig.from_pretrained(str(folder), **load_options(folder, weights=False))
    if not getattr(config, "vision_use_head", True):
        raise ValueError(f"{option}: {folder} has vision_use_head false (no pooled output); it must be {SIGLIP}")
    file = folder / "preprocessor_config.json"
    if not file.is_file():
        raise ValueError(f"{option}: {folder} has no preprocessor_config.json; it must be {SIGLIP}")
    proc = json.loads(file.read_text())
    size, mean, std = proc.get("size") or {}, proc.get("image_mean"), proc.get("image_std")
    if "height" not in size or "width" not in size or len(mean or ()) != 3 or len(std or ()) != 3:
        raise ValueError(f"{option}: {file} must give size {{height, width}}, a 3-value image_mean and image_std "
                         f"(SiglipImageProcessor's), got size {size}, image_mean {mean}, image_std {std}")
    return SiglipFolder(folder, config.hidden_size,
                        SiglipPreprocess(int(size["height"]), int(size["width"]), tuple(mean), tuple(std)))


class SiglipEncoder(FrozenBackbone):
    """A frozen transformers SiglipVisionModel with torch preprocessing: images -> its L2-normalised pooled
    output (B, hidden) float32."""

    def __init__(self, model: nn.Module, preprocess: SiglipPreprocess) -> None:
        super().__init__(model, preprocess, model.config.hidden_size)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, hidden) normalised pooled features, differentiable in `images`."""
        pooled = self.model(pixel_values=self.pixels(images)).pooler_output
        return F.normalize(pooled.float(), dim=-1)


def load_siglip(path: str | Path, option: str = SIGLIP_OPTION, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> SiglipEncoder:
    """The vision tower of a SigLIP folder (a SiglipModel's, as google/siglip-so400m-patch14-384 ships, or a
    SiglipVisionModel's), frozen, on `device`; a folder that lacks any of the tower's weights raises ValueError."""
    import transformers

    folder = check_siglip(path, option)
    model, info = transformers.SiglipVisionModel.from_pretrained(str(folder.path), torch_dtype=dtype,
                                                                 output_loading_info=True, **load_options(folder.path))
    if info["missing_keys"] or info["mismatched_keys"]:
        lacking = sorted(info["missing_keys"]) + [str(k[0] if isinstance(k, tuple) else k)
                                                  for k in info["mismatched_keys"]]
        raise ValueError(f"{option}: {folder.path} lacks or mismatches {len(lacking)} vision-tower weights (e.g. "
                         f"{lacking[0]}); it must be {SIGLIP}")
    return SiglipEncoder(model, folder.preprocess).to(device)


def load_v25_head(path: str | Path, dim: int, option: str = HEAD_OPTION) -> AestheticV25Head:
    """The v2.5 head from its .pth / .safetensors state dict, in float32; other names or shapes raise ValueError."""
    return load_head(AestheticV25Head(dim), path, option, V25_HEAD,
                     f"a v2.5 head for {dim}-d SigLIP features (check {SIGLIP_OPTION} is siglip-so400m-patch14-384)")


def check_aesthetic_v25(paths: object) -> None:
    """Before loading: the head file, the SigLIP folder, and that the head reads that tower's width (the head
    is a 3 MB file; the width comes from config.json)."""
    head = head_state(getattr(paths, "aesthetic_v25", None), HEAD_OPTION, V25_HEAD)
    width = check_siglip(getattr(paths, "aesthetic_v25_siglip", None)).dim
    first = head.get("scoring_head.0.weight")
    if first is None or first.dim() != 2:
        raise ValueError(f"{HEAD_OPTION} is not an Aesthetic Predictor v2.5 head (no 2-d scoring_head.0.weight); "
                         f"it must be {V25_HEAD}")
    if first.shape[1] != width:
        raise ValueError(f"{HEAD_OPTION} reads {first.shape[1]}-d features but {SIGLIP_OPTION} gives {width}-d "
                         f"ones: use google/siglip-so400m-patch14-384 with this head")


def build_aesthetic_v25_reward(device: str | torch.device = "cpu", directory: object = None,
                               paths: object = None) -> AestheticReward:
    """The v2.5 aesthetic reward from --paths.aesthetic_v25 (head) and --paths.aesthetic_v25_siglip (SigLIP)."""
    head_path = check_aesthetic_head(getattr(paths, "aesthetic_v25", None), HEAD_OPTION, V25_HEAD)
    encoder = load_siglip(getattr(paths, "aesthetic_v25_siglip", None), SIGLIP_OPTION, device,
                          backbone_dtype(device))
    return AestheticReward(encoder, load_v25_head(head_path, encoder.dim).to(device))
