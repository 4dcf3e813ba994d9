"""The optional CUDA extension: CI builds it; its absence never breaks `import pec_kernels`."""
import os
import subprocess
import sys

import pytest
import torch

# The ops csrc/ registers; each is looked up by name (torch.ops namespaces resolve lazily).
CUDA_OPS = ("knn_grouped_select", "knn_grouped_pair_distances", "knn_grouped_pair_grad",
            "sde_step_fwd", "sde_step_bwd")


@pytest.mark.skipif(os.environ.get("PEC_REQUIRE_EXTENSION") != "1",
                    reason="set PEC_REQUIRE_EXTENSION=1 where `pip install --no-build-isolation -e .` built csrc/")
def test_extension_was_built_and_registers_ops():
    import pec_kernels._C  # noqa: F401  (fails when the build skipped csrc/)

    from pec_kernels import cuda_ops_available
    assert cuda_ops_available()
    for op in CUDA_OPS:
        assert hasattr(torch.ops.pec, op), f"torch.ops.pec.{op} is not registered"


def test_import_survives_a_missing_extension():
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'pec_kernels._C':\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import pec_kernels\n"
        "assert not pec_kernels.cuda_ops_available()\n"
        "print(pec_kernels.extension_status())\n"
    )
    env = dict(os.environ, PEC_NO_JIT="1", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "blocked for the test" in out.stdout
    assert "PEC_JIT_BUILD=1" in out.stdout  # says how to ask for the JIT build


def test_backend_cuda_error_says_why(monkeypatch):
    from pec_kernels import _extension

    monkeypatch.setattr(_extension, "cuda_ops_available", lambda build=False: False)
    monkeypatch.setattr(_extension, "_load_error", "pec_kernels._C is not importable (test)")
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable: pec_kernels._C is not importable"):
        _extension.require_cuda_ops()


def _no_prebuilt_extension(monkeypatch, calls):
    """Pretend pec_kernels._C is missing on a machine with a CUDA device; record JIT builds instead of running one."""
    from pec_kernels import _extension

    def fake_build():
        calls.append("build")
        raise RuntimeError("toolchain broken (test)")

    monkeypatch.setattr(_extension, "_imported", lambda: False)
    monkeypatch.setattr(_extension, "_jit_result", None)
    monkeypatch.setattr(_extension, "_import_error", "No module named 'pec_kernels._C' (test)")
    monkeypatch.setattr(_extension, "_jit_build", fake_build)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.delenv("PEC_JIT_BUILD", raising=False)
    monkeypatch.delenv("PEC_NO_JIT", raising=False)
    return _extension


def test_capability_checks_never_start_a_jit_build(monkeypatch):
    calls = []
    ext = _no_prebuilt_extension(monkeypatch, calls)
    assert not ext.cuda_ops_available()
    ext.extension_status()
    assert calls == []


def test_jit_build_runs_when_asked_for_and_fails_once_with_the_reason(monkeypatch):
    calls = []
    ext = _no_prebuilt_extension(monkeypatch, calls)
    with pytest.warns(RuntimeWarning, match="toolchain broken"):
        with pytest.raises(RuntimeError, match="JIT build failed: toolchain broken"):
            ext.require_cuda_ops()  # what backend="cuda" calls
    with pytest.raises(RuntimeError, match="JIT build failed"):
        ext.require_cuda_ops()
    assert calls == ["build"]  # one attempt per process


def test_pec_jit_build_env_asks_for_the_build(monkeypatch):
    calls = []
    ext = _no_prebuilt_extension(monkeypatch, calls)
    monkeypatch.setenv("PEC_JIT_BUILD", "1")
    with pytest.warns(RuntimeWarning, match="toolchain broken"):
        assert not ext.cuda_ops_available()
    assert calls == ["build"]
