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


def test_backend_cuda_error_says_why(monkeypatch):
    from pec_kernels import _extension

    monkeypatch.setattr(_extension, "cuda_ops_available", lambda: False)
    monkeypatch.setattr(_extension, "_load_error", "pec_kernels._C is not importable (test)")
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable: pec_kernels._C is not importable"):
        _extension.require_cuda_ops()
