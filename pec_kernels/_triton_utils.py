"""Small helpers shared by the Triton kernels: availability and interpreter detection."""
from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when triton imports (it ships with CUDA builds of torch)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where kernels run on CPU tensors (slowly, fp32 only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable_on(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors on `device`: CUDA, or CPU under the interpreter."""
    if not triton_available():
        return False
    if device.type == "cuda":
        return not interpreting()
    return device.type == "cpu" and interpreting()
