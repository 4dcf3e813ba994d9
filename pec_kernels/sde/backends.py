"""Backend selection for the SDE ops: "cuda" (pec_kernels._C), "triton", "torch" (reference)."""
from __future__ import annotations

from types import ModuleType

import torch

from pec_kernels._extension import cuda_ops_available, require_cuda_ops
from pec_kernels._triton_utils import triton_usable_on

BACKENDS = ("auto", "cuda", "triton", "torch")


def _cuda_sde_ops_loaded() -> bool:
    return cuda_ops_available() and hasattr(torch.ops.pec, "sde_step_fwd")


def resolve(backend: str, latents: tuple[torch.Tensor, ...]) -> ModuleType:
    """The backend module for `backend` and these latent-shaped inputs.

    "auto": CUDA tensors → the CUDA kernels when the extension is built and all latent inputs share
    one dtype (they are compiled per dtype), else Triton; CPU tensors → torch (the Triton
    interpreter is far slower). An explicit backend that cannot run raises.
    """
    device = latents[0].device
    same_dtype = all(t.dtype == latents[0].dtype for t in latents)
    if backend == "auto":
        if device.type == "cuda" and same_dtype and _cuda_sde_ops_loaded():
            backend = "cuda"
        elif device.type == "cuda" and triton_usable_on(device):
            backend = "triton"
        else:
            backend = "torch"
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
        raise ValueError("backend='cuda' needs x, the velocities, noise/prev_sample and v_ref in one dtype, got "
                         f"{sorted({str(t.dtype) for t in latents})}: cast them or use backend='triton'")
    require_cuda_ops()
    if not _cuda_sde_ops_loaded():
        raise RuntimeError("backend='cuda': pec_kernels._C is loaded but has no sde_step ops; rebuild it with "
                           "`pip install --no-build-isolation -e .`")
    from pec_kernels.sde import cuda_backend
    return cuda_backend
