"""JPEG compressibility / incompressibility (Flow-GRPO's rule rewards), on images of any size.

Each image is quantised to 8 bits and saved as JPEG (quality 95) with PIL; the reward is the file
size in kB divided by 500, negated for compressibility (`jpeg`), as is for incompressibility
(`jpeg_incompressibility`). Needs no weights; ignores the prompt (a reward-hacking-prone rule).
"""
from __future__ import annotations

import io

import torch

from pec.rewards.base import ImageReward

QUALITY = 95
SCALE_KB = 500.0


def jpeg_sizes_kb(images: torch.Tensor, quality: int = QUALITY) -> torch.Tensor:
    """(B,) float32 JPEG file sizes in kB of images (B, C, H, W) in [0, 1], C = 1 or 3."""
    from PIL import Image

    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegReward(ImageReward):
    """-size/500 (compressibility, `sign` -1) or +size/500 (incompressibility, `sign` +1), size in kB."""

    def __init__(self, sign: float = -1.0) -> None:
        super().__init__()
        if sign not in (-1.0, 1.0):
            raise ValueError(f"sign must be -1 (compressibility) or 1 (incompressibility), got {sign}")
        self.sign = sign

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.sign * jpeg_sizes_kb(images) / SCALE_KB
