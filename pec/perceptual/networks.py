"""The small networks of the digits world: reward classifier, SimCLR encoder, autoencoder, and the
evaluation-only gold classifier (an MLP) and second SimCLR encoder.

All take images (B, 1, 8, 8) in [0, 1]. They are trained by `pec.pretrain` and stored as
safetensors files whose metadata holds the constructor arguments, so `load_network` rebuilds them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from pec.assets import asset_path


def _conv_trunk(width: int, feature_dim: int) -> nn.Sequential:
    """8x8 -> 4x4 -> 2x2 conv trunk ending in a `feature_dim` vector."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
        nn.Flatten(), nn.Linear(8 * width, feature_dim))


class DigitClassifier(nn.Module):
    """Digit classifier; `features` (the penultimate layer) is the "reward model's space"."""

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "num_classes": num_classes}
        self.trunk = _conv_trunk(width, feature_dim)
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(feature_dim, num_classes))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, feature_dim) features of images in [0, 1]."""
        return self.trunk(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) logits."""
        return self.head(self.features(images))


class SimCLREncoder(nn.Module):
    """Self-supervised encoder (SimCLR); `features` is the representation before the projection head."""

    def __init__(self, width: int = 32, feature_dim: int = 64, projection_dim: int = 32) -> None:
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "projection_dim": projection_dim}
        self.trunk = _conv_trunk(width, feature_dim)
        self.projection = nn.Sequential(nn.SiLU(), nn.Linear(feature_dim, feature_dim), nn.SiLU(),
                                        nn.Linear(feature_dim, projection_dim))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, feature_dim) representation of images in [0, 1]."""
        return self.trunk(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, projection_dim) projections, the space the contrastive loss is computed in."""
        return self.projection(self.features(images))


class Autoencoder(nn.Module):
    """Denoising autoencoder with a small latent; `features` is the latent code."""

    def __init__(self, width: int = 16, latent_dim: int = 16) -> None:
        super().__init__()
        self.config = {"width": width, "latent_dim": latent_dim}
        self.encoder = _conv_trunk(width, latent_dim)
        self.decoder = nn.Sequential(nn.Linear(latent_dim, 128), nn.SiLU(), nn.Linear(128, 64))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim) latent codes of images in [0, 1]."""
        return self.encoder(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstructions (B, 1, 8, 8) as logits of [0, 1] pixel values."""
        return self.decoder(self.features(images)).reshape(-1, 1, 8, 8)


class GoldClassifier(nn.Module):
    """The "gold" digit classifier: an MLP on the pixels (another architecture than the reward classifier's
    conv net), trained by `pec.pretrain` on digits the reward classifier never saw. Evaluation only: reward
    hacking of the trained classifier shows as a gap between its reward and this one's (Gao et al. 2023)."""

    def __init__(self, hidden: int = 256, num_classes: int = 10) -> None:
        super().__init__()
        self.config = {"hidden": hidden, "num_classes": num_classes}
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.SiLU(), nn.Dropout(0.2),
                                   nn.Linear(hidden, hidden // 2), nn.SiLU())
        self.head = nn.Linear(hidden // 2, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, hidden // 2) penultimate features of images in [0, 1]."""
        return self.trunk(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) logits."""
        return self.head(self.features(images))


# File name (without .safetensors) -> class. "simclr_eval" is a second SimCLR encoder (another seed), the
# evaluation-only perceptual space; "gold" the evaluation-only classifier.
NETWORKS: dict[str, type[nn.Module]] = {"classifier": DigitClassifier, "simclr": SimCLREncoder,
                                        "autoencoder": Autoencoder, "gold": GoldClassifier,
                                        "simclr_eval": SimCLREncoder}


def save_network(network: nn.Module, path: str | Path) -> None:
    """Store weights and constructor config (in the safetensors metadata) at `path`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in network.state_dict().items()}
    save_file(tensors, str(path), metadata={"config": json.dumps(network.config)})


def load_network(name: str, device: str | torch.device = "cpu", directory: str | Path | None = None) -> nn.Module:
    """Load the shipped network `name` (one of NETWORKS), frozen and in eval mode, on `device`."""
    if name not in NETWORKS:
        raise ValueError(f"name must be one of {sorted(NETWORKS)}, got {name!r}")
    path = asset_path(f"{name}.safetensors", directory)
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    network = NETWORKS[name](**config)
    network.load_state_dict(state)
    return network.to(device).eval().requires_grad_(False)
