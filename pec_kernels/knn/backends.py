"""Which kNN backend runs a call: a small dispatch table over modules with one shared contract.

Every backend module (torch_backend, triton_backend, cuda) provides, on x (G, n, D) and reference
(G, M, D), (1, M, D) (a bank shared by all groups) or None (self mode), contiguous, already
L2-normalised for the cosine metric:
  select(x, reference, k) -> (G, n, k) int64, candidates ascending by distance (may rank in low precision);
  pair_distances(x, reference, index) -> (G, n, k) float32 exact ‖x_i − c_j‖ (float64 for float64 inputs);
  pair_grad(x, reference, index, coef) -> (grad_x (G, n, D), grad_reference (G|1, M, D) or None), float32,
      with grad_x_i += Σ_j coef_ij (x_i − c_j) and grad_c_j −= coef_ij (x_i − c_j);
  supports(x, reference, k) -> bool, and why_unsupported(x, reference, k) -> str | None (the reason);
  EXACT_SELECT: bool; when True the module also has select_with_distances(x, reference, k) -> (index,
      distance) ranking by the exact fp32 distances it returns (no centring, no second distance pass).
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
_AUTO_ORDER_ON_CUDA = ("cuda", "triton")


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as exc:
        raise RuntimeError(f"backend={name!r} is unavailable: {exc}") from exc


def _auto_candidate(name: str, x: torch.Tensor, reference: torch.Tensor | None, k: int) -> ModuleType | None:
    """The backend if it loads and takes these inputs; a broken optional backend only costs a warning."""
    try:
        module = importlib.import_module(_MODULES[name])
        return module if module.supports(x, reference, k) else None
    except ImportError:
        return None
    except Exception as exc:  # "auto" must never fail where the torch backend works
        warnings.warn(f"pec_kernels.knn: backend {name!r} skipped: {exc!r}", RuntimeWarning, stacklevel=3)
        return None


def resolve(backend: str, x: torch.Tensor, reference: torch.Tensor | None, k: int) -> ModuleType:
    """The backend module for these (validated, grouped) inputs.

    "auto": on CUDA the CUDA kernels when they take the shape, else Triton when usable, else torch;
    on any other device torch. An explicit backend that cannot run raises: RuntimeError when it is not
    installed or built, ValueError (naming `backend`) when it does not take these inputs.
    """
    if backend == "auto":
        if x.device.type == "cuda":
            for name in _AUTO_ORDER_ON_CUDA:
                module = _auto_candidate(name, x, reference, k)
                if module is not None:
                    return module
        return _import("torch")
    if backend == "cuda":
        if x.device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got x on {x.device}")
        require_cuda_ops()
    module = _import(backend)
    if not module.supports(x, reference, k):
        raise ValueError(f"backend={backend!r} does not take these inputs: "
                         f"{module.why_unsupported(x, reference, k)}")
    return module
