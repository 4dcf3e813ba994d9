"""Real image (and text) backbones, shared by the real rewards and perceptual spaces.

- transformers CLIP (`CLIPModel` + `CLIPProcessor` folder: PickScore_v1, openai/clip-vit-large-patch14);
- open_clip (any architecture: a local hf-hub-style folder with open_clip_config.json + weights, or a
  checkpoint file plus its architecture: a built-in name such as ViT-H-14, or a model-config JSON file);
- DINOv2 (transformers `Dinov2Model` folder).

Image preprocessing is done in torch (resize of the short side, centre crop, normalisation), so the
features are differentiable in the images and run batched on the GPU. It follows the models' own
processors up to interpolation details (PIL's bicubic vs torch's antialiased bicubic).

Weights come from a local folder or file, or a Hugging Face hub id resolved through huggingface_hub's cache
(`pec.hub.resolve_path`: ORG/NAME for a folder, ORG/NAME/FILE for a file, ORG/NAME:REVISION; safetensors only
from the hub, never remote code). `check_*` functions read only config files: they validate a path (and
resolve an id) before any weights load. Heavy imports (transformers, open_clip) happen inside the loaders.
"""
from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pec.hub import load_options, resolve_path

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors",
                     "pytorch_model.bin")


def backbone_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 for frozen backbones on a GPU (features are upcast to float32 before any use), else float32."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def check_real_images(images: object, name: str = "images") -> torch.Tensor:
    """ValueError unless `images` is a float tensor (B, C, H, W), B >= 1, C in (1, 3), H, W >= 1."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of shape (B, C, H, W) in [0, 1], "
                         f"got {type(images).__name__}")
    if images.dim() != 4 or images.shape[0] == 0 or images.shape[1] not in (1, 3) or min(images.shape[2:]) < 1:
        raise ValueError(f"{name} must have shape (B, C, H, W) with B >= 1 and C = 1 or 3, got {tuple(images.shape)}")
    return images


@dataclass(frozen=True)
class Preprocess:
    """Torch image preprocessing: resize the short side to `size`, centre-crop `crop`, normalise."""

    size: int
    crop: int
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] (grey is repeated to RGB) -> normalised (B, 3, crop, crop) float32."""
        check_real_images(images)
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[2:]
        scale = self.size / min(h, w)
        new_h, new_w = max(self.crop, round(h * scale)), max(self.crop, round(w * scale))
        if (new_h, new_w) != (h, w):
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        top, left = (new_h - self.crop) // 2, (new_w - self.crop) // 2
        x = x[:, :, top:top + self.crop, left:left + self.crop]
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def _folder(path: str | Path | None, option: str, what: str, layout: str = "model") -> Path:
    """The local folder of `path` (a folder, or a hub id of the `pec.hub` `layout`); ValueError naming `option`."""
    if not path:
        raise ValueError(f"{option} is empty: give the folder (local, or a hub id ORG/NAME) of {what}")
    folder = resolve_path(path, option, layout)
    if not folder.is_dir():
        raise ValueError(f"{option}: {folder} is not a folder; it must be the folder (local, or a hub id ORG/NAME) "
                         f"of {what}")
    return folder


def _config(folder: Path, option: str, what: str, model_types: Sequence[str]) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise ValueError(f"{option}: {folder} has no config.json; it must be the local folder of {what}")
    config = json.loads(file.read_text())
    if config.get("model_type") not in model_types:
        raise ValueError(f"{option}: {folder} holds a {config.get('model_type')!r} model (config.json), not "
                         f"{' / '.join(model_types)}: a checkpoint of another architecture; it must be {what}")
    return config


# ---------------------------------------------------------------------------------------------
# transformers CLIP


def check_hf_clip(path: str | Path | None, option: str, what: str = "a transformers CLIPModel (config.json + "
                  "weights)", processor: str | Path | None = None) -> Path:
    """Validate a transformers CLIP folder (and its processor folder, default the same) from config files;
    return the model's local folder."""
    return _hf_clip_folders(path, option, what, processor)[0]


def _hf_clip_folders(path: str | Path | None, option: str, what: str = "a transformers CLIPModel (config.json + "
                     "weights)", processor: str | Path | None = None) -> tuple[Path, Path]:
    """`check_hf_clip`, returning the local folders of the model and of its processor."""
    folder = _folder(path, option, what)
    _config(folder, option, what, ("clip",))
    proc = resolve_path(processor, f"{option}_processor", "processor") or folder
    if not any((proc / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")) or not any(
            (proc / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        raise ValueError(f"{option}: {proc} lacks the CLIPProcessor files (preprocessor_config.json or "
                         f"processor_config.json, and the "
                         f"tokenizer); PickScore_v1 uses those of laion/CLIP-ViT-H-14-laion2B-s32B-b79K: save "
                         f"them to a folder and pass it with {option}_processor")
    return folder, proc


class FrozenBackbone(nn.Module):
    """A frozen pretrained image model with its preprocessing in torch, `dim` features per image; it stays
    in eval mode. The CLIP, DINOv2 and SigLIP wrappers below (and the rewards built on them) share it."""

    def __init__(self, model: nn.Module, preprocess: Callable[[torch.Tensor], torch.Tensor], dim: int) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.dim = dim

    def train(self, mode: bool = True) -> FrozenBackbone:
        """Stays in eval mode: the backbone is frozen."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Where the model's weights live."""
        return next(self.model.parameters()).device

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """`images` (B, 3, H, W) in [0, 1], preprocessed, on the model's device and in its dtype."""
        p = next(self.model.parameters())
        return self.preprocess(images).to(p.device, p.dtype)


class HFClip(FrozenBackbone):
    """A frozen transformers CLIPModel with torch preprocessing and its tokenizer.

    `image_features(images)` / `text_features(prompts)` return projected, L2-normalised float32 features;
    `logit_scale` is the model's learned temperature (exp of the stored log).
    """

    def __init__(self, model: nn.Module, tokenizer, preprocess: Preprocess) -> None:
        super().__init__(model, preprocess, model.config.projection_dim)
        self.tokenizer = tokenizer

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, dim) normalised image embeddings, differentiable in `images`."""
        pooled = self.model.vision_model(pixel_values=self.pixels(images)).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, dim) normalised text embeddings."""
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        out = self.model.text_model(input_ids=tokens["input_ids"].to(self.device),
                                    attention_mask=tokens["attention_mask"].to(self.device))
        return F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())


def load_hf_clip(path: str | Path, option: str, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, processor: str | Path | None = None) -> HFClip:
    """Load a transformers CLIPModel + CLIPProcessor folder (PickScore_v1's layout), frozen, on `device`."""
    import transformers

    folder, proc_folder = _hf_clip_folders(path, option, processor=processor)
    proc = transformers.CLIPProcessor.from_pretrained(str(proc_folder), **load_options(proc_folder, weights=False))
    model = transformers.CLIPModel.from_pretrained(str(folder), torch_dtype=dtype, **load_options(folder))
    ip = proc.image_processor
    size = ip.size.get("shortest_edge", ip.size.get("height"))
    crop = ip.crop_size["height"] if getattr(ip, "crop_size", None) else size
    preprocess = Preprocess(size, crop, tuple(ip.image_mean), tuple(ip.image_std))
    return HFClip(model, proc.tokenizer, preprocess).to(device)


# ---------------------------------------------------------------------------------------------
# open_clip


def _open_clip_arch_config(arch: str, option: str) -> dict:
    """The model config of an open_clip architecture: a JSON file, or a built-in name."""
    if arch.endswith(".json"):
        file = Path(arch).expanduser()
        if not file.is_file():
            raise ValueError(f"{option}_arch: {file} is not a file (an open_clip model-config JSON file)")
        config = json.loads(file.read_text())
        return config.get("model_cfg", config)
    import open_clip

    config = open_clip.get_model_config(arch)
    if config is None:
        raise ValueError(f"{option}_arch: {arch!r} is not an open_clip architecture; choose a built-in name "
                         f"(e.g. ViT-L-14, ViT-H-14) or give a model-config JSON file")
    return config


def check_open_clip(path: str | Path | None, option: str, arch: str | None = None) -> dict:
    """Validate an open_clip checkpoint (folder or file + arch) from config files; return its model config."""
    return _open_clip_source(path, option, arch)[1]


def _open_clip_source(path: str | Path | None, option: str, arch: str | None = None) -> tuple[Path, dict]:
    """`check_open_clip`, returning the local folder or file too (a hub id resolved: `pec.hub`)."""
    what = "an open_clip model: a folder (or hub id ORG/NAME) with open_clip_config.json and weights, or a " \
           f"checkpoint file (or ORG/NAME/FILE) with {option}_arch"
    if not path:
        raise ValueError(f"{option} is empty: give {what}")
    p = resolve_path(path, option, "open_clip")
    if p.is_dir():
        file = p / "open_clip_config.json"
        if not file.is_file():
            raise ValueError(f"{option}: {p} has no open_clip_config.json; it must be {what}")
        config = json.loads(file.read_text())
        if "model_cfg" not in config:
            raise ValueError(f"{option}: {file} has no 'model_cfg'; it must be {what}")
        if not any((p / w).is_file() for w in OPEN_CLIP_WEIGHTS):
            raise ValueError(f"{option}: {p} holds no weights (one of {list(OPEN_CLIP_WEIGHTS)})")
        return p, config["model_cfg"]
    if not p.is_file():
        raise ValueError(f"{option}: {p} does not exist; it must be {what}")
    if not arch:
        raise ValueError(f"{option} is a checkpoint file: give its architecture with {option}_arch (e.g. ViT-H-14)")
    return p, _open_clip_arch_config(arch, option)


class OpenClip(FrozenBackbone):
    """A frozen open_clip model with torch preprocessing and its tokenizer (same interface as `HFClip`)."""

    def __init__(self, model: nn.Module, tokenizer, preprocess: Preprocess, dim: int) -> None:
        super().__init__(model, preprocess, dim)
        self.tokenizer = tokenizer

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, dim) normalised image embeddings, differentiable in `images`."""
        return F.normalize(self.model.encode_image(self.pixels(images)).float(), dim=-1)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, dim) normalised text embeddings."""
        return F.normalize(self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)).float(), dim=-1)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())


def load_open_clip(path: str | Path, option: str, arch: str | None = None, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> OpenClip:
    """Load any open_clip architecture from a local folder or a checkpoint file (+ arch), frozen, on `device`.

    Goes through `open_clip.create_model` ('local-dir:' for a folder; a built-in or registered
    architecture with `pretrained=file` otherwise), so checkpoints as HPSv2 ships them ({'state_dict':
    ...}, 'module.' prefixes) load as open_clip loads them. Tensors that do not fit the architecture
    raise a ValueError naming `option`.
    """
    import open_clip

    p, model_cfg = _open_clip_source(path, option, arch)
    if p.is_dir():
        name, pretrained = f"local-dir:{p}", None
    elif arch.endswith(".json"):
        open_clip.add_model_config(Path(arch).expanduser())
        name, pretrained = Path(arch).stem, str(p)
    else:
        name, pretrained = arch, str(p)
    try:
        model = open_clip.create_model(name, pretrained=pretrained, require_pretrained=True)
    except (RuntimeError, AssertionError, KeyError) as err:
        raise ValueError(f"{option}: {p} does not fit the open_clip architecture {arch or p.name}: a checkpoint of "
                         f"another architecture; check {option}_arch ({str(err).splitlines()[0][:200]})") from None
    except pickle.UnpicklingError as err:
        raise ValueError(f"{option}: {p} holds more than tensors and loads only with weights_only=False (arbitrary "
                         f"code); re-save its state dict with torch.save({{'state_dict': ...}}) "
                         f"({str(err).splitlines()[0][:120]})") from None
    cfg = model.visual.preprocess_cfg
    size = cfg.get("size", model_cfg["vision_cfg"].get("image_size", 224))
    size = size[0] if isinstance(size, (list, tuple)) else size
    preprocess = Preprocess(size, size, tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD)))
    tokenizer = open_clip.get_tokenizer(name)
    return OpenClip(model.to(dtype), tokenizer, preprocess, model_cfg["embed_dim"]).to(device)


# ---------------------------------------------------------------------------------------------
# DINOv2


def check_dino(path: str | Path | None, option: str = "--paths.dino") -> Path:
    """Validate a transformers DINOv2 folder (or hub id) from its config.json; return its local folder."""
    what = "a transformers DINOv2 model (e.g. facebook/dinov2-base: config.json + weights)"
    folder = _folder(path, option, what)
    _config(folder, option, what, ("dinov2",))
    return folder


class Dino(FrozenBackbone):
    """A frozen DINOv2 backbone: images -> the final-layer-normalised CLS token (B, hidden) float32."""

    def __init__(self, model: nn.Module, preprocess: Preprocess) -> None:
        super().__init__(model, preprocess, model.config.hidden_size)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, hidden) CLS features, differentiable in `images`."""
        return self.model(pixel_values=self.pixels(images)).pooler_output.float()


def load_dino(path: str | Path, option: str = "--paths.dino", device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> Dino:
    """Load a transformers Dinov2Model folder, frozen, on `device`; preprocessing from its processor config
    (default: resize 256, crop 224, ImageNet mean/std, as facebook/dinov2-*)."""
    import transformers

    folder = check_dino(path, option)
    model = transformers.Dinov2Model.from_pretrained(str(folder), torch_dtype=dtype, **load_options(folder))
    size, crop, mean, std = 256, 224, IMAGENET_MEAN, IMAGENET_STD
    proc_file = folder / "preprocessor_config.json"
    if proc_file.is_file():
        proc = json.loads(proc_file.read_text())
        size = proc.get("size", {}).get("shortest_edge", size)
        crop = proc.get("crop_size", {}).get("height", crop)
        mean, std = tuple(proc.get("image_mean", mean)), tuple(proc.get("image_std", std))
    return Dino(model, Preprocess(size, crop, mean, std)).to(device)
