"""backend="auto" falls back from a faster backend that fails at run time (issue 11, item 1).

Failures are injected on CPU: a Triton kernel that raises (run under the interpreter, which `auto`
would not pick on CPU by itself, so the tests put Triton first in its order), and a CUDA extension
whose ops are missing. Each checks the result against the torch backend, the single warning naming
the backend and the reason, and that the failed backend is not tried again.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import pec_kernels
from pec_kernels.knn import backends as knn_backends
from pec_kernels.knn import cuda as knn_cuda
from pec_kernels.knn import knn_entropy
from pec_kernels.sde import backends as sde_backends
from pec_kernels.sde import cuda_backend as sde_cuda
from pec_kernels.sde import sde_step_logprob
from pec_kernels.sde import torch_backend as sde_torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="injects failures into CPU runs (interpreter)")


class RaisingKernel:
    """Stands in for a @triton.jit kernel: every launch raises `error` and is counted."""

    def __init__(self, error: BaseException):
        self.error, self.launches = error, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            raise self.error
        return launch


def _missing_op(name: str):
    return getattr(torch.ops.pec_missing_for_test, name)  # AttributeError, as for an extension without the op


@pytest.fixture(autouse=True)
def _fresh_fallbacks():
    pec_kernels.reset_fallbacks()
    yield
    pec_kernels.reset_fallbacks()


def _fallback_warnings(record, backend: str) -> list[str]:
    return [str(w.message) for w in record
            if issubclass(w.category, RuntimeWarning) and f"backend {backend!r} failed" in str(w.message)]


def _knn_twice(x: torch.Tensor) -> tuple[list, list[str]]:
    """Two auto calls with forward and backward; their (entropy, grad) and the warnings raised."""
    results = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            leaf = x.clone().requires_grad_(True)
            out = knn_entropy(leaf, 3)
            (out.entropy * torch.arange(1.0, 3.0)).sum().backward()
            results.append((out.entropy.detach(), leaf.grad))
    return results, record


def _knn_expected(x: torch.Tensor):
    leaf = x.clone().requires_grad_(True)
    out = knn_entropy(leaf, 3, backend="torch")
    (out.entropy * torch.arange(1.0, 3.0)).sum().backward()
    return out.entropy.detach(), leaf.grad


@pytest.mark.parametrize("kernel", ["knn_select_kernel", "pair_grad_kernel"], ids=["forward", "backward"])
def test_knn_triton_failure_falls_back_to_torch_once(monkeypatch, kernel):
    from pec_kernels.knn import triton_kernels

    raising = RaisingKernel(RuntimeError("injected Triton compile failure"))
    monkeypatch.setattr(triton_kernels, kernel, raising)
    monkeypatch.setattr(knn_backends, "_auto_order", lambda device: ("triton",))
    x = torch.randn(2, 12, 5)
    results, record = _knn_twice(x)
    messages = _fallback_warnings(record, "triton")
    assert len(messages) == 1 and "injected Triton compile failure" in messages[0] and "'torch'" in messages[0]
    assert raising.launches == 1  # the second call does not try Triton again
    assert ("knn_entropy", "triton") in pec_kernels.failed_backends()
    entropy, grad = _knn_expected(x)
    for got_entropy, got_grad in results:
        torch.testing.assert_close(got_entropy, entropy, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_grad, grad, rtol=1e-5, atol=1e-6)


def test_knn_cuda_extension_without_its_ops_falls_back(monkeypatch):
    monkeypatch.setattr(knn_backends, "_auto_order", lambda device: ("cuda",))
    monkeypatch.setattr(knn_cuda, "why_unsupported", lambda *args: None)  # the capability check said yes
    monkeypatch.setattr(knn_cuda, "_check_cuda", lambda *args: None)
    monkeypatch.setattr(knn_cuda, "_op", _missing_op)
    x = torch.randn(2, 12, 5)
    results, record = _knn_twice(x)
    messages = _fallback_warnings(record, "cuda")
    assert len(messages) == 1 and "AttributeError" in messages[0]
    entropy, grad = _knn_expected(x)
    torch.testing.assert_close(results[1][0], entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1][1], grad, rtol=1e-5, atol=1e-6)


def test_explicit_backend_and_out_of_memory_are_not_caught(monkeypatch):
    from pec_kernels.knn import triton_kernels

    monkeypatch.setattr(triton_kernels, "knn_select_kernel", RaisingKernel(RuntimeError("injected")))
    with pytest.raises(RuntimeError, match="injected"):
        knn_entropy(torch.randn(12, 5), 3, backend="triton")
    monkeypatch.setattr(triton_kernels, "knn_select_kernel", RaisingKernel(torch.OutOfMemoryError("injected OOM")))
    monkeypatch.setattr(knn_backends, "_auto_order", lambda device: ("triton",))
    with pytest.raises(torch.OutOfMemoryError):
        knn_entropy(torch.randn(12, 5), 3)
    assert pec_kernels.failed_backends() == {}


def _sde_inputs():
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(3, 4, 6, generator=g) for k in ("x", "v", "prev")}


def _sde_twice(t) -> tuple[list, list]:
    results = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            v = t["v"].clone().requires_grad_(True)
            out = sde_step_logprob(t["x"], v, torch.tensor([0.9, 0.5, 0.3]), 0.2, prev_sample=t["prev"])
            out.log_prob.sum().backward()
            results.append((out.log_prob.detach(), v.grad))
    return results, record


def _sde_expected(t):
    v = t["v"].clone().requires_grad_(True)
    out = sde_step_logprob(t["x"], v, torch.tensor([0.9, 0.5, 0.3]), 0.2, prev_sample=t["prev"], backend="torch")
    out.log_prob.sum().backward()
    return out.log_prob.detach(), v.grad


@pytest.mark.parametrize("kernel", ["_sde_forward_kernel", "_sde_backward_kernel"], ids=["forward", "backward"])
def test_sde_triton_failure_falls_back_to_torch_once(monkeypatch, kernel):
    from pec_kernels.sde import triton_backend

    raising = RaisingKernel(RuntimeError("injected Triton launch failure"))
    monkeypatch.setattr(triton_backend, kernel, raising)
    monkeypatch.setattr(sde_backends, "_auto_order", lambda device, same_dtype: ("triton",))
    t = _sde_inputs()
    results, record = _sde_twice(t)
    messages = _fallback_warnings(record, "triton")
    assert len(messages) == 1 and "injected Triton launch failure" in messages[0]
    assert raising.launches == 1
    log_prob, grad = _sde_expected(t)
    for got_lp, got_grad in results:
        torch.testing.assert_close(got_lp, log_prob, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_grad, grad, rtol=1e-5, atol=1e-6)


def test_sde_cuda_extension_without_its_ops_falls_back(monkeypatch):
    monkeypatch.setattr(sde_backends, "_auto_order", lambda device, same_dtype: ("cuda",))
    monkeypatch.setattr(sde_backends, "_module",
                        lambda name, device, same_dtype: sde_cuda if name == "cuda" else sde_torch)
    monkeypatch.setattr(sde_cuda, "_op", _missing_op)
    t = _sde_inputs()
    results, record = _sde_twice(t)
    messages = _fallback_warnings(record, "cuda")
    assert len(messages) == 1 and "AttributeError" in messages[0]
    log_prob, grad = _sde_expected(t)
    torch.testing.assert_close(results[0][0], log_prob, rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], grad, rtol=0, atol=0)
