"""Loading of the optional CUDA extension `pec_kernels._C` (built from csrc/).

The extension registers its ops as `torch.ops.pec.<name>`. It is found in this order:
1. `pec_kernels._C`, compiled by `pip install --no-build-isolation -e .`;
2. a JIT build of csrc/ with ninja (`torch.utils.cpp_extension.load`), cached in TORCH_EXTENSIONS_DIR,
   run only when asked for: by `backend="cuda"`, or for every backend with PEC_JIT_BUILD=1 (then the
   first call that looks for the CUDA ops builds them). A capability check (`cuda_ops_available()`,
   `backend="auto"`) never starts a build by itself: a build takes minutes. PEC_NO_JIT=1 forbids it.
Failure never propagates to `import pec_kernels`: `cuda_ops_available()` answers False and the
"auto" backends fall back to Triton or torch. `backend="cuda"` raises with the reason.
Once the ops are loaded, their fake (meta) implementations are registered (pec_kernels._fake), so
torch.compile can trace them.
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
_import_error: str | None = None
_jit_result: bool | None = None  # None: no JIT build tried in this process


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


def jit_build_requested() -> bool:
    """True when PEC_JIT_BUILD=1 asks for the JIT build of csrc/ on first use, whatever the backend."""
    return os.environ.get("PEC_JIT_BUILD") == "1"


@functools.lru_cache(maxsize=None)
def _imported() -> bool:
    """True when the prebuilt pec_kernels._C imports (cheap; never builds)."""
    global _import_error, _load_error
    try:
        importlib.import_module("pec_kernels._C")
    except ImportError as exc:
        _import_error = str(exc)
        _load_error = (f"pec_kernels._C is not importable ({exc}); the JIT build of csrc/ runs only for "
                       "backend='cuda' or with PEC_JIT_BUILD=1")
        return False
    _loaded()
    return True


def _jit_built() -> bool:
    """Build csrc/ with ninja, once per process (torch caches the build on disk); False with the reason
    on failure. Only cuda_ops_available(build=True) or PEC_JIT_BUILD=1 get here."""
    global _jit_result, _load_error
    if _jit_result is not None:
        return _jit_result
    reason = f"pec_kernels._C is not importable ({_import_error})"
    if os.environ.get("PEC_NO_JIT") == "1":
        _load_error = reason + "; JIT build disabled by PEC_NO_JIT=1"
        return False  # not cached: the variable may be unset later
    if torch.version.cuda is None or not torch.cuda.is_available():
        _load_error = reason + "; no CUDA device to JIT-build it for"
        return False
    try:
        _jit_build()
    except Exception as exc:  # a broken toolchain must not break the Triton/torch backends
        _load_error = reason + f"; JIT build failed: {exc}"
        warnings.warn(f"pec_kernels: CUDA backend unavailable: {_load_error}", RuntimeWarning, stacklevel=3)
        _jit_result = False
        return False
    _loaded()
    _jit_result = True
    return True


def _loaded() -> None:
    from pec_kernels import _fake

    _fake.register()


def cuda_ops_available(build: bool = False) -> bool:
    """True when the ops of csrc/ are registered under torch.ops.pec.

    Never builds unless `build=True` (what backend="cuda" passes) or PEC_JIT_BUILD=1; without either,
    a missing pec_kernels._C just answers False, at once (True after an earlier JIT build succeeded).
    """
    if _imported() or _jit_result:
        return True
    if not (build or jit_build_requested()):
        return False
    return _jit_built()


def require_cuda_ops() -> None:
    """Raise a RuntimeError that says why, when backend="cuda" was asked for but cannot be used
    (JIT-building csrc/ first when the prebuilt extension is missing)."""
    if not cuda_ops_available(build=True):
        raise RuntimeError(f"backend='cuda' is unavailable: {_load_error}. Build it with "
                           "`pip install --no-build-isolation -e .` or use backend='triton'/'torch'.")


def extension_status() -> str:
    """A one-line description of where the CUDA ops come from, for logs and bug reports (never builds)."""
    if cuda_ops_available():
        return "pec_kernels._C loaded"
    return f"CUDA extension unavailable: {_load_error}"
