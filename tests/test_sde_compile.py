"""The SDE Triton kernels compile for an H100/H200 (sm_90), as tests/test_knn_compile.py does for kNN.

The interpreter runs the kernels' logic on CPU but does not type-check them the way the compiler does
(constexpr branches, bf16 loads and stores, int64 offsets). Compiled in a subprocess without
TRITON_INTERPRET, for a named target (ptxas ships with Triton), with the launch's constexprs.
"""
from __future__ import annotations

import pytest

from _sm90 import assert_compiles_for_sm90

pytestmark = pytest.mark.slow

_SCRIPT = r"""
import torch
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from pec_kernels.sde import triton_backend as tb

LATENTS = {"x_ptr", "v0_ptr", "v1_ptr", "v2_ptr", "target_ptr", "vref_ptr", "prev_ptr", "mean_ptr", "gmean_ptr",
           "gprev_ptr", "dx_ptr", "dv0_ptr", "dv1_ptr", "dv2_ptr"}
FLOATS = {"eta", "inv_norm", "n_over_norm"}

def arg_type(name):
    if name.endswith("_ptr"):
        return "*bf16" if name in LATENTS else "*fp32"
    if name.endswith("_val") or name in FLOATS:
        return "fp32"
    return "i32"

def build(fn, consts, num_warps):
    signature = {name: ("constexpr" if name in consts else arg_type(name)) for name in fn.arg_names}
    compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", 90, 32),
            options={"num_warps": num_warps})

info = torch.finfo(torch.float32)
step = dict(KIND=0, COMPUTE=tl.float32, EPS=info.eps, TINY=info.tiny)
block, tiles, _ = tb._launch_shape(8, 4096)
for ptrs, rollout, store_mean in ((1, True, False), (31, False, True)):
    build(tb._sde_forward_kernel, dict(NV=2, ROLLOUT=rollout, HAS_REF=True, STORE_MEAN=store_mean, PTRS=ptrs,
                                       BLOCK=block, TILES=tiles, **step), 4)
build(tb._sde_finalize_kernel, dict(HAS_REF=True, PTRS=3, BLOCK_C=256, **step), 1)
build(tb._sde_backward_kernel, dict(NV=3, HAS_GLP=True, HAS_GKL=True, HAS_GMEAN=True, HAS_GPREV=True, NEED_DX=True,
                                    NEED_DV0=True, NEED_DV1=True, NEED_DV2=True, PTRS=7, BLOCK=block, TILES=tiles,
                                    **step), 4)
print("compiled")
"""


def test_sde_triton_kernels_compile_for_sm90():
    assert_compiles_for_sm90(_SCRIPT)
