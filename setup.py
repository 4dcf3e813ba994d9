"""Build script for PEC.

`pip install --no-build-isolation -e .` with a CUDA build of torch and nvcc compiles csrc/ into
`pec_kernels._C`. Anything else (CPU-only torch, no nvcc, or pip's default build isolation, which
hides the installed torch) installs the pure-Python package and prints one line saying why the
extension was skipped; `pec_kernels` then JIT-compiles csrc/ with ninja on first use on a GPU.

Environment knobs:
  PEC_SKIP_CUDA_BUILD=1   never build the extension here.
  CUDA_HOME               the CUDA toolkit (default: found from nvcc, then /usr/local/cuda).
  TORCH_CUDA_ARCH_LIST    target architectures (default "9.0": H100/H200).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _skip(reason: str) -> tuple[list, dict]:
    print(f"pec: CUDA extension skipped ({reason}); Triton/torch backends only, "
          "csrc/ is JIT-compiled on first use on a GPU.", file=sys.stderr)
    return [], {}


def _find_cuda_home() -> str | None:
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def nvidia_wheel_include_dirs() -> list[str]:
    """Header folders of the CUDA wheels torch depends on (cublas, cusparse, ...), which a minimal
    toolkit lacks. Found next to torch, so a virtual environment that sees them works too."""
    try:
        import nvidia
    except ImportError:
        return []
    return sorted({d for root in nvidia.__path__ for d in glob.glob(os.path.join(root, "cu*", "include"))})


def cuda_extension() -> tuple[list, dict]:
    """Return (ext_modules, cmdclass) for pec_kernels._C, or empty ones with a one-line reason."""
    if os.environ.get("PEC_SKIP_CUDA_BUILD") == "1":
        return _skip("PEC_SKIP_CUDA_BUILD=1")
    try:
        import torch
    except ImportError:
        return _skip("torch is not importable in the build environment; "
                     "use `pip install --no-build-isolation -e .` to build it now")
    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} is a CPU-only build")
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        return _skip("nvcc not found; set CUDA_HOME")
    # cpp_extension reads CUDA_HOME at import time.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    include_dirs = [os.path.join(ROOT, "csrc")] + nvidia_wheel_include_dirs()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    ext = CUDAExtension(
        name="pec_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": ["-O3"],
                            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
    )
    print(f"pec: building CUDA extension pec_kernels._C with {cuda_home} for "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()


def version() -> str:
    """pec.__version__, read from the source (importing pec would import torch)."""
    text = open(os.path.join(ROOT, "pec", "__init__.py")).read()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


setup(
    name="pec",
    version=version(),
    license="Apache-2.0",
    description="Perceptual-entropy RLHF for flow-matching text-to-image models, with fused GPU kernels",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pec", "pec.*", "pec_kernels", "pec_kernels.*"]),
    package_data={"pec": ["assets/*", "assets/**/*", "configs/*.yaml"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "diffusers>=0.30",
        "huggingface_hub>=0.34",  # hub ids (pec.hub): its cache, snapshot_download, and the `hf` command it names
        # Models built with parameters on the meta device (full fine-tuning's shard-by-shard loading), as
        # diffusers' own from_pretrained builds them.
        "accelerate",
        "peft>=0.12",
        "scikit-learn",
        "tqdm",
        "pyyaml",
        "tensorboard",
        "matplotlib",
        # Real models, rewards and perceptual spaces (issue 9): text encoders, PickScore / CLIP / DINOv2
        # through transformers, CLIPScore / HPSv2 / the clip space through open_clip (local-dir: needs 3.x).
        "transformers>=4.46",
        "open_clip_torch>=3.0",
        "pillow",
        # The reward server (pec.rewards.serve): uvicorn serving a starlette app (its module docstring says why).
        "uvicorn>=0.55",
        "h11",  # uvicorn's HTTP parser, whose connection states the server reads
        "starlette>=1.0",
    ],
    extras_require={"dev": ["pytest", "pytest-benchmark", "ninja"],
                    # CPU anchors of benchmarks/bench_knn_cpu_anchors.py (not needed by the package or tests)
                    "bench": ["pytest-benchmark", "faiss-cpu", "scikit-learn"],
                    # --logging.wandb (pec.logging_utils.WandbLog); CI installs it to test the offline mode
                    "wandb": ["wandb>=0.19"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
