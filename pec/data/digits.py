"""scikit-learn's handwritten digits as the embedded model's training set.

1,797 real 8x8 digits with pixel values 0..16, shipped inside scikit-learn (no download). The
embedded flow model works directly in pixel space: images are mapped to [-1, 1] for training and
`EmbeddedFlowModel.decode` maps them back to [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGE_SHAPE = (1, 8, 8)
NUM_CLASSES = 10
_MAX_PIXEL = 16.0


@dataclass
class Digits:
    """The digits data set as tensors: images (N, 1, 8, 8) in [-1, 1] and labels (N,) int64 in 0..9."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def split(self, val_fraction: float, seed: int = 0) -> tuple[Digits, Digits]:
        """A seeded random (train, validation) split."""
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        n_val = int(round(val_fraction * len(self)))
        val, train = perm[:n_val], perm[n_val:]
        return Digits(self.images[train], self.labels[train]), Digits(self.images[val], self.labels[val])


def load_digits() -> Digits:
    """All 1,797 digits, images scaled from 0..16 to [-1, 1]."""
    from sklearn.datasets import load_digits as sk_load_digits

    raw = sk_load_digits()
    images = torch.as_tensor(raw.images, dtype=torch.float32).reshape(-1, *IMAGE_SHAPE)
    images = images / _MAX_PIXEL * 2.0 - 1.0
    return Digits(images, torch.as_tensor(raw.target, dtype=torch.int64))


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Map images from [-1, 1] (model space) to [0, 1] (image space)."""
    return (images + 1.0) * 0.5


def augment(images: torch.Tensor, generator: torch.Generator | None = None, *, max_shift: int = 1,
            max_rotation: float = 0.2, max_scale: float = 0.1, noise_std: float = 0.05) -> torch.Tensor:
    """Random small affine jitter (shift, rotation, scale) and pixel noise of images in [0, 1].

    Used to make the reward classifier robust to generated samples and as the view generator of the
    self-supervised encoder. Border pixels are filled with 0 (background).
    """
    b = images.shape[0]

    def symmetric(*shape: int) -> torch.Tensor:  # uniform in [-1, 1)
        return torch.rand(*shape, generator=generator, device=images.device) * 2 - 1

    angle = symmetric(b) * max_rotation
    scale = 1.0 + symmetric(b) * max_scale
    shift = symmetric(b, 2) * (2.0 * max_shift / images.shape[-1])  # affine_grid's [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(images, grid, padding_mode="zeros", align_corners=False)
    noise = torch.randn(out.shape, generator=generator, device=images.device) * noise_std
    return (out + noise).clamp(0.0, 1.0)
