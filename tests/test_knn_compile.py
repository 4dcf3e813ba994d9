"""The knn Triton kernels compile for an H100/H200 (sm_90) with the block configs the GPU path uses.

The interpreter runs the kernels' logic on CPU but does not type-check them the way the compiler does
(loop-carried types, tl.dot operand dtypes, bf16). Triton compiles for a named target without a GPU
(ptxas ships with it), in a subprocess, because this test session imports the kernels interpreted.
"""
from __future__ import annotations

import pytest

from _sm90 import assert_compiles_for_sm90

pytestmark = pytest.mark.slow

_SCRIPT = r"""
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from pec_kernels.knn import triton_backend as tb, triton_kernels as kernels

TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

def arg_types(fn, dtype, out):
    types = {}
    for name in fn.arg_names:
        if name in ("x_ptr", "c_ptr"):
            types[name] = "*" + TL[dtype]
        elif name == "idx_ptr":
            types[name] = "*i64"
        elif name == "c_valid_ptr":
            types[name] = "*i1"
        elif name == "out_ptr":
            types[name] = out
        elif name.endswith("_ptr"):
            types[name] = "*fp32"
        else:
            types[name] = "i32"
    return types

def build(fn, dtype, out, consts, num_warps=4):
    types = arg_types(fn, dtype, out)
    signature = {name: ("constexpr" if name in consts else types[name]) for name in fn.arg_names}
    return compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps})

SM90_SHARED = 227 * 1024  # the most shared memory one block may use on sm_90
# (dtype, k, D, self mode, masked and cosine): float32 streams D (and is centred in the kernel); 16-bit at
# D <= 512 keeps the query tile on chip (RESIDENT_D), larger D streams it. "masked and cosine" adds the
# candidate mask (knn_entropy's `valid`) and the rows' inverse norms applied as they load (metric="cosine").
for dtype, k, dim, self_mode, extras in [(torch.float32, 5, 512, True, False), (torch.bfloat16, 64, 512, False, False),
                                         (torch.bfloat16, 5, 512, True, False), (torch.float16, 5, 1024, True, False),
                                         (torch.float32, 5, 512, True, True), (torch.bfloat16, 5, 512, False, True),
                                         (torch.bfloat16, 5, 1024, True, True)]:
    kp = tb._slots(k)
    shift = dtype == torch.float32  # knn_entropy centres float32 inputs in the kernel
    config = tb._select_config(dtype, kp, dim, shift)
    num_warps = config.pop("num_warps")
    assert (config["RESIDENT_D"] > 0) == (dtype != torch.float32 and dim <= 512), config
    kernel = build(kernels.knn_select_kernel, dtype, "*i64",
                   dict(K=k, KP=kp, SELF=self_mode, HAS_SHIFT=shift, HAS_SCALE=extras, HAS_VALID=extras, **config),
                   num_warps)
    assert kernel.metadata.shared <= SM90_SHARED, (dtype, k, dim, kernel.metadata.shared)
    block_r, block_d = tb._row_norm_blocks()
    build(kernels.row_sq_norm_kernel, dtype, "*fp32",
          dict(HAS_SHIFT=shift, HAS_SCALE=extras, BLOCK_R=block_r, BLOCK_D=block_d))
for scaled in (False, True):
    block_p, block_d = tb._pair_distance_blocks()
    build(kernels.pair_distance_kernel, torch.bfloat16, "*fp32",
          dict(K=5, HAS_SCALE=scaled, BLOCK_P=block_p, BLOCK_D=block_d))
    block_r, block_d = tb._pair_grad_blocks()
    build(kernels.pair_grad_kernel, torch.bfloat16, None,
          dict(K=7, SELF=True, HAS_SCALE=scaled, BLOCK_R=block_r, BLOCK_D=block_d))
print("compiled")
"""


def test_triton_kernels_compile_for_sm90():
    assert_compiles_for_sm90(_SCRIPT)
