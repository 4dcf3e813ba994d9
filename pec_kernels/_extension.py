"""Loading of the optional CUDA extension `pec_kernels._C` (built from csrc/).

The extension registers its ops as `torch.ops.pec.<name>`. It is found in this order:
1. `pec_kernels._C`, compiled by `pip install --no-build-isolation -e .`;
2. a JIT build of csrc/ with ninja (`torch.utils.cpp_extension.load`), cached in
   TORCH_EXTENSIONS_DIR, done once, on first use, and only on a machine with a CUDA device.
Failure never propagates to `import pec_kernels`: `cuda_ops_available()` answers False and the
"auto" backends fall back to Triton or torch. `backend="cuda"` raises with the reason.
"""
from __future__ import annotations

import functools
import glob
import importlib
import os
import warnings

import torch

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
_load_error: str | None = None


def _jit_build() -> None:
    from torch.utils.cpp_extension import load

    sources = sorted(glob.glob(os.path.join(_CSRC, "*.cpp")) + glob.glob(os.path.join(_CSRC, "*.cu")))
    if not sources:
        raise RuntimeError(f"no CUDA sources found under {_CSRC} (a non-editable install ships none)")
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    load(name="pec_kernels_C", sources=sources, extra_include_paths=[_CSRC],
         extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
         is_python_module=False, verbose=False)


@functools.lru_cache(maxsize=None)
def cuda_ops_available() -> bool:
    """True when the ops of csrc/ are registered under torch.ops.pec (building them if needed)."""
    global _load_error
    try:
        importlib.import_module("pec_kernels._C")
        return True
    except ImportError as exc:
        _load_error = f"pec_kernels._C is not importable ({exc})"
    if os.environ.get("PEC_NO_JIT") == "1":
        _load_error += "; JIT build disabled by PEC_NO_JIT=1"
        return False
    if torch.version.cuda is None or not torch.cuda.is_available():
        _load_error += "; no CUDA device to JIT-build it for"
        return False
    try:
        _jit_build()
        return True
    except Exception as exc:  # a broken toolchain must not break the Triton/torch backends
        _load_error += f"; JIT build failed: {exc}"
        warnings.warn(f"pec_kernels: CUDA backend unavailable: {_load_error}", RuntimeWarning, stacklevel=2)
        return False


def require_cuda_ops() -> None:
    """Raise a RuntimeError that says why, when backend="cuda" was asked for but cannot be used."""
    if not cuda_ops_available():
        raise RuntimeError(f"backend='cuda' is unavailable: {_load_error}. Build it with "
                           "`pip install --no-build-isolation -e .` or use backend='triton'/'torch'.")


def extension_status() -> str:
    """A one-line description of where the CUDA ops come from, for logs and bug reports."""
    if cuda_ops_available():
        return "pec_kernels._C loaded"
    return f"CUDA extension unavailable: {_load_error}"
