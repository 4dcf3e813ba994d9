"""Backend selection for the SDE ops: "cuda" (pec_kernels._C), "triton", "torch" (reference)."""
from __future__ import annotations

from types import ModuleType

import torch

from pec_kernels._extension import cuda_ops_available, require_cuda_ops
from pec_kernels._triton_utils import triton_usable_on

BACKENDS = ("auto", "cuda", "triton", "torch")


def _cuda_sde_ops_loaded() -> bool:
    return cuda_ops_available() and hasattr(torch.ops.pec, "sde_step_fwd")


def _auto_order(device: torch.device, same_dtype: bool) -> tuple[str, ...]:
    """The optional backends `auto` tries before torch, fastest first (tests patch this): on CUDA
    tensors the CUDA kernels when the extension is loaded (never built here) and all latent inputs
    share one dtype (they are compiled per dtype), then Triton; none on CPU (the Triton interpreter
    is far slower than torch)."""
    if device.type != "cuda":
        return ()
    order = ("cuda",) if same_dtype and _cuda_sde_ops_loaded() else ()
    return order + (("triton",) if triton_usable_on(device) else ())


#: The modules of the backends named by the last `candidates` call, for `module_of` (a global dict, so
#: that torch.compile can read it while tracing).
_LOADED: dict[str, ModuleType] = {}


@torch.compiler.assume_constant_result
def candidates(backend: str, device: torch.device, same_dtype: bool) -> tuple[str, ...]:
    """The chain of backend names for `backend` and latent-shaped inputs on `device` (`same_dtype`: all
    of them in one dtype), fastest first; their modules are then `module_of(name)`.

    "auto": the backends of _auto_order, then torch; the ops run the chain with pec_kernels._fallback,
    so a faster backend that fails at run time falls back to the next. An explicit backend is a chain
    of one; one that cannot run raises. torch.compile runs this once while tracing and keeps the answer
    (it depends only on the inputs' metadata).
    """
    chain = _auto_order(device, same_dtype) + ("torch",) if backend == "auto" else (backend,)
    for name in chain:
        _LOADED[name] = _module(name, device, same_dtype)
    return chain


def module_of(name: str) -> ModuleType:
    """The module of a backend named by `candidates`."""
    return _LOADED[name]


def resolve(backend: str, latents: tuple[torch.Tensor, ...]) -> ModuleType:
    """The module `backend` runs these inputs on first (the head of `candidates`)."""
    return module_of(candidates(backend, *placement(latents))[0])


def placement(latents: tuple[torch.Tensor, ...]) -> tuple[torch.device, bool]:
    """(device, whether all latent inputs share one dtype): what `candidates` decides on."""
    return latents[0].device, all(t.dtype == latents[0].dtype for t in latents)


def _module(backend: str, device: torch.device, same_dtype: bool) -> ModuleType:
    """The module of an explicitly named backend, or an error saying why it cannot run."""
    if backend == "torch":
        from pec_kernels.sde import torch_backend
        return torch_backend
    if backend == "triton":
        if not triton_usable_on(device):
            raise ValueError(f"backend='triton' cannot run on {device.type} tensors here "
                             "(it needs a CUDA device, or TRITON_INTERPRET=1 for CPU tensors)")
        from pec_kernels.sde import triton_backend
        return triton_backend
    if device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    if not same_dtype:
        raise ValueError("backend='cuda' needs x, the velocities, noise/prev_sample and v_ref in one dtype: "
                         "cast them or use backend='triton'")
    require_cuda_ops()
    if not _cuda_sde_ops_loaded():
        raise RuntimeError("backend='cuda': pec_kernels._C is loaded but has no sde_step ops; rebuild it with "
                           "`pip install --no-build-isolation -e .`")
    from pec_kernels.sde import cuda_backend
    return cuda_backend
