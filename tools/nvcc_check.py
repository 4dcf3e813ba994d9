"""Compile one csrc/ file to an object in a temp dir, to check it without rebuilding the extension.

Usage: python tools/nvcc_check.py csrc/knn_grouped.cu [more files]
Uses the same flags as setup.py (arch 9.0 unless TORCH_CUDA_ARCH_LIST says otherwise).
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import sysconfig
import tempfile

os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
from torch.utils import cpp_extension  # noqa: E402


def main(paths: list[str]) -> int:
    cuda_home = os.environ["CUDA_HOME"]
    import nvidia
    incs = cpp_extension.include_paths(device_type="cuda") + ["csrc"]
    incs += [d for root in nvidia.__path__ for d in glob.glob(os.path.join(root, "cu*", "include"))]
    incs.append(sysconfig.get_paths()["include"])
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0").replace(".", "")
    std = "-std=c++20" if tuple(int(p) for p in __import__("torch").__version__.split(".")[:2]) >= (2, 12) else "-std=c++17"
    rc = 0
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            is_cu = path.endswith(".cu")
            cmd = ([os.path.join(cuda_home, "bin", "nvcc"), f"-gencode=arch=compute_{arch},code=sm_{arch}",
                    "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-O3"] if is_cu else ["g++", "-fPIC", "-O1"])
            cmd += [std, "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H"]
            cmd += [f"-I{i}" for i in incs] + ["-c", path, "-o", os.path.join(tmp, "out.o")]
            print(f"compiling {path} ...", flush=True)
            rc |= subprocess.call(cmd)
    print("OK" if rc == 0 else "FAILED")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
