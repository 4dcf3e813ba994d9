"""Which kNN backend runs a call: a small dispatch table over modules with one shared contract.

Every backend module (torch_backend, triton_backend, cuda) provides, on x (G, n, D) and reference
(G, M, D), (1, M, D) (a bank shared by all groups) or None (self mode), contiguous, with knn_entropy's
masked rows already zeroed; `scale` is a RowScale (the cosine metric: every row is read as
row · its inverse norm, which the Triton and CUDA kernels do as they load it, with no normalised copy)
or None:
  select(x, reference, k, shift=None, *, valid=None, scale=None) -> (G, n, k) int64, candidates ascending
      by distance (may rank in low precision); shift (G|1, 1, D), for float32/64 inputs: subtracted from
      the (scaled) x and candidates before ranking (the Triton kernels do it as they load, allocating
      nothing of size N·D); valid (G|1, m) bool: only these candidates are chosen ahead of others, a row
      with fewer than k of them gets in-range indices of masked ones (knn_entropy discards such rows);
  pair_distances(x, reference, index, *, check_index=True, scale=None) -> (G, n, k) float32 exact
      ‖x_i − c_j‖ (float64 for float64 inputs);
  pair_grad(x, reference, index, coef, *, check_index=True, scale=None) -> (grad_x (G, n, D),
      grad_reference (G|1, M, D) or None), float32, with grad_x_i += Σ_j coef_ij (x_i − c_j) and
      grad_c_j −= coef_ij (x_i − c_j) (in the scaled rows when scale is given);
      check_index=True checks that index holds candidate numbers (one host synchronisation); knn_entropy
      passes False, since its indices come from the backend's own select;
  supports(x, reference, k) -> bool, and why_unsupported(x, reference, k) -> str | None (the reason);
  EXACT_SELECT: bool; when True the module also has select_with_distances(x, reference, k, *, valid=None,
      scale=None) -> (index, distance) ranking by the exact fp32 distances it returns (no centring, no
      second distance pass).
Modules are imported lazily, so a missing Triton, CUDA extension or cuda.py never breaks an import.
"""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch

from pec_kernels._extension import require_cuda_ops

BACKENDS = ("auto", "cuda", "triton", "torch")
_MODULES = {
    "torch": "pec_kernels.knn.torch_backend",
    "triton": "pec_kernels.knn.triton_backend",
    "cuda": "pec_kernels.knn.cuda",
}


def _auto_order(device: torch.device) -> tuple[str, ...]:
    """The optional backends `auto` tries before torch on `device`, fastest first (tests patch this)."""
    return ("cuda", "triton") if device.type == "cuda" else ()


#: The modules of the backends named by the last `candidates` call, for `module_of` (a global dict, so
#: that torch.compile can read it while tracing).
_LOADED: dict[str, ModuleType] = {}


def _import(name: str) -> ModuleType:
    try:
        _LOADED[name] = importlib.import_module(_MODULES[name])
    except ImportError as exc:
        raise RuntimeError(f"backend={name!r} is unavailable: {exc}") from exc
    return _LOADED[name]


def _auto_candidate(name: str, x: torch.Tensor, reference: torch.Tensor | None, k: int) -> ModuleType | None:
    """The backend if it loads and takes these inputs; a broken optional backend only costs a warning.
    Its capability check never builds anything (the CUDA JIT build runs only when asked for)."""
    try:
        module = _import(name)
    except RuntimeError:  # not installed: nothing to say
        return None
    try:
        return module if module.supports(x, reference, k) else None
    except Exception as exc:  # "auto" must never fail where the torch backend works
        warnings.warn(f"pec_kernels.knn: backend {name!r} skipped: {exc!r}", RuntimeWarning, stacklevel=3)
        return None


@torch.compiler.assume_constant_result
def candidates(backend: str, x: torch.Tensor, reference: torch.Tensor | None, k: int) -> tuple[str, ...]:
    """The chain of backend names to run these (validated, grouped) inputs on, fastest first; their
    modules are then `module_of(name)`.

    "auto": on CUDA the CUDA kernels when they take the shape, then Triton when usable, then torch;
    on any other device torch alone. knn_entropy runs the chain with pec_kernels._fallback, so a
    faster backend that fails at run time falls back to the next one. An explicit backend is a chain
    of one, and one that cannot run raises: RuntimeError when it is not installed or built, ValueError
    (naming `backend`) when it does not take these inputs. torch.compile runs this once while tracing
    and keeps the answer (it depends only on the inputs' metadata).
    """
    if backend == "auto":
        chain = []
        for name in _auto_order(x.device):
            if _auto_candidate(name, x, reference, k) is not None:
                chain.append(name)
        _import("torch")
        return (*chain, "torch")
    if backend == "cuda":
        if x.device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got x on {x.device}")
        require_cuda_ops()
    module = _import(backend)
    if not module.supports(x, reference, k):
        raise ValueError(f"backend={backend!r} does not take these inputs: "
                         f"{module.why_unsupported(x, reference, k)}")
    return (backend,)


def module_of(name: str) -> ModuleType:
    """The module of a backend named by `candidates`."""
    return _LOADED[name]


def resolve(backend: str, x: torch.Tensor, reference: torch.Tensor | None, k: int) -> ModuleType:
    """The module `backend` runs these inputs on first (the head of `candidates`)."""
    return module_of(candidates(backend, x, reference, k)[0])
