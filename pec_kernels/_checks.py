"""Input validation shared by the public ops. Every failure is a ValueError naming the argument."""
from __future__ import annotations

from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, value: object, *, ndims: Iterable[int] | None = None,
                 dtypes: Iterable[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    """Check that `value` is a tensor of an allowed rank and dtype, with no empty dimension."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndims is not None:
        ndims = tuple(ndims)
        if value.dim() not in ndims:
            raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dimensions, "
                             f"got shape {tuple(value.shape)}")
    dtypes = tuple(dtypes)
    if value.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {value.dtype}")
    if value.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(value.shape)}")
    return value


def check_mask(name: str, mask: object, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """Check that `mask` is a bool tensor shaped like `like` without its last dimension (one entry per
    row of `like`), on its device."""
    check_tensor(name, mask, dtypes=(torch.bool,))
    if mask.shape != like.shape[:-1]:
        raise ValueError(f"{name} must have shape {tuple(like.shape[:-1])} (one entry per row of {like_name}, "
                         f"whose shape is {tuple(like.shape)}), got {tuple(mask.shape)}")
    check_same_device(**{like_name: like, name: mask})
    return mask


def check_finite(name: str, value: torch.Tensor) -> None:
    """Raise a ValueError when `value` holds NaN or Inf. Costs one host synchronisation, so the public
    ops take check_finite=False for callers that check once per step themselves. Under torch.compile
    it is a device-side assert instead (torch._assert_async: no graph break, no sync; a failure raises
    a RuntimeError with the same message when the compiled code runs). One reduction (aminmax), no
    temporary of the input's size."""
    message = f"{name} contains NaN or Inf values"
    low, high = torch.aminmax(value)  # NaN propagates, ±Inf lands in low or high; no N·D temporary
    finite = torch.isfinite(low) & torch.isfinite(high)
    if torch.compiler.is_compiling():
        torch._assert_async(finite, message)
        return
    if not bool(finite):
        raise ValueError(message)


def check_index_range(name: str, index: torch.Tensor, upper: int, upper_name: str) -> None:
    """Raise when `index` holds values outside [0, upper). Costs one host synchronisation, so callers
    skip it for indices their own kernels produced; skipped while a CUDA graph is being captured."""
    if index.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    low, high = torch.aminmax(index)
    if bool((low < 0) | (high >= upper)):  # the one read; more only to word the error
        raise ValueError(f"{name} must hold row numbers in [0, {upper_name}) = [0, {upper}), "
                         f"got values in [{int(low)}, {int(high)}]")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """Check that all given tensors live on one device; return it."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    first_name, first = next(iter(devices.items()))
    for k, d in devices.items():
        if d != first:
            raise ValueError(f"{k} is on {d} but {first_name} is on {first}: move them to one device")
    return first


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    """Check that `value` is one of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
