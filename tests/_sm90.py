"""Shared by the sm_90 compile tests: run a script that compiles Triton kernels for an H100/H200 target
without a GPU (not the interpreter). Not a test module (pytest collects only test_*.py)."""
import os
import subprocess
import sys

import pytest


def assert_compiles_for_sm90(script: str) -> None:
    """Run `script` (it prints "compiled" at the end) outside the Triton interpreter; skip where this
    Triton build has no NVIDIA backend."""
    backends = pytest.importorskip("triton.backends")
    if "nvidia" not in backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
