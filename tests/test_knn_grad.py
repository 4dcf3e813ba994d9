"""knn_entropy gradients: gradcheck (float64, torch backend), autograd of the independent float64
reference (torch and Triton backends), finite differences against the Triton backward in float32,
and zero gradient for pairs clamped at min_dist. torch.empty is poisoned throughout (NaN / -1).
"""
from __future__ import annotations

import pytest
import torch

from pec_kernels import knn_entropy
from test_knn_reference import kl_reference, poisoned_outputs  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def _inputs(mode: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(x, reference, extra kwargs) for a gradient case; leaves that require grad."""
    ref = None
    kwargs = {}
    if mode == "self":
        x = torch.randn(2, 9, 4)
    elif mode == "shared_bank":
        x, ref = torch.randn(2, 8, 4), torch.randn(11, 4)
    elif mode == "per_group_bank":
        x, ref = torch.randn(2, 8, 4), torch.randn(2, 10, 4)
    elif mode == "cosine":
        x, kwargs = torch.randn(2, 9, 4) + 0.3, {"metric": "cosine"}
    elif mode == "scales_per_dim":
        x = torch.randn(2, 9, 4) * torch.tensor([0.1, 10.0])[:, None, None]
        kwargs = {"normalize": "per_dim"}
    else:
        raise KeyError(mode)
    x = x.to(dtype).requires_grad_()
    ref = None if ref is None else ref.to(dtype).requires_grad_()
    return x, ref, kwargs


MODES = ["self", "shared_bank", "per_group_bank", "cosine", "scales_per_dim"]


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_torch_backend_float64(mode):
    x, ref, kwargs = _inputs(mode, torch.float64)
    leaves = (x,) if ref is None else (x, ref)

    def outputs(*args):
        out = knn_entropy(args[0], 3, reference=args[1] if ref is not None else None, backend="torch", **kwargs)
        return out.entropy, out.surprisal, out.distance

    assert torch.autograd.gradcheck(outputs, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def _weighted_loss(out_surprisal, out_distance, w_s, w_d):
    return (out_surprisal * w_s).sum() + (out_distance * w_d).sum()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("torch", torch.float32),
                                           ("triton", torch.float32)], ids=["torch-fp64", "torch-fp32", "triton-fp32"])
def test_gradients_match_reference_autograd(mode, backend, dtype):
    x, ref, kwargs = _inputs(mode, torch.float64)
    k = 3
    expected = kl_reference(x, k, reference=ref, **kwargs)
    w_s, w_d = torch.randn(expected.surprisal.shape, dtype=torch.float64), torch.randn(expected.distance.shape,
                                                                                          dtype=torch.float64)
    leaves = (x,) if ref is None else (x, ref)
    want = torch.autograd.grad(_weighted_loss(expected.surprisal, expected.distance, w_s, w_d), leaves)

    x_run = x.detach().to(dtype).requires_grad_()
    ref_run = None if ref is None else ref.detach().to(dtype).requires_grad_()
    out = knn_entropy(x_run, k, reference=ref_run, backend=backend, **kwargs)
    loss = _weighted_loss(out.surprisal, out.distance, w_s.to(out.surprisal.dtype), w_d.to(out.distance.dtype))
    got = torch.autograd.grad(loss, (x_run,) if ref is None else (x_run, ref_run))
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    for g, w in zip(got, want):
        assert g.dtype == dtype and torch.isfinite(g).all()
        scale = w.abs().max().item()  # gradients scale like 1/ρ: compare relative to the largest
        torch.testing.assert_close(g.double() / scale, w / scale, **tol)


def test_finite_differences_against_triton_backward():
    x = torch.randn(2, 13, 5, dtype=torch.float64)
    bank = torch.randn(17, 5, dtype=torch.float64)
    w_s = torch.randn(2, 13, dtype=torch.float64)

    def f(xv, bv):  # float64 reference objective
        return (kl_reference(xv, 2).surprisal * w_s).sum() + (kl_reference(xv, 4, reference=bv).surprisal * w_s).sum()

    x32, b32 = x.float().requires_grad_(), bank.float().requires_grad_()
    obj = ((knn_entropy(x32, 2, backend="triton").surprisal * w_s.float()).sum()
           + (knn_entropy(x32, 4, reference=b32, backend="triton").surprisal * w_s.float()).sum())
    gx, gb = torch.autograd.grad(obj, (x32, b32))
    h = 1e-6
    for _ in range(3):
        vx, vb = torch.randn_like(x), torch.randn_like(bank)
        numeric = (f(x + h * vx, bank + h * vb) - f(x - h * vx, bank - h * vb)) / (2 * h)
        analytic = (gx.double() * vx).sum() + (gb.double() * vb).sum()
        assert analytic.item() == pytest.approx(numeric.item(), rel=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_clamped_duplicates_get_zero_gradient(backend):
    x = torch.randn(12, 3)
    x[5] = x[0] = torch.tensor([100.0, 100.0, 100.0])  # a duplicated pair, far from everyone else
    x.requires_grad_()
    out = knn_entropy(x, 1, backend=backend)
    assert out.distance[0, 0] == out.distance[5, 0] == 1e-6  # ρ = 0 clamped
    assert out.index[0, 0] == 5 and out.index[5, 0] == 0
    (out.entropy + out.distance.sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[[0, 5]] == 0).all()
    assert (x.grad.abs().sum(-1)[[i for i in range(12) if i not in (0, 5)]] > 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_identical_group_has_zero_finite_gradient(backend):
    x = torch.randn(2, 7, 3)
    x[0] = 0.25
    x.requires_grad_()
    knn_entropy(x, 3, backend=backend).entropy.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[0] == 0).all() and (x.grad[1] != 0).any()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_reference_without_grad_and_16bit_gradient_dtype(backend):
    x = torch.randn(10, 6).half().requires_grad_()
    bank = torch.randn(15, 6).half()
    out = knn_entropy(x, 2, reference=bank, backend=backend)
    out.entropy.backward()
    assert x.grad.dtype == torch.float16 and torch.isfinite(x.grad).all() and bank.grad is None
    x64 = x.detach().double().requires_grad_()
    want, = torch.autograd.grad(kl_reference(x64, 2, reference=bank).entropy, x64)
    scale = want.abs().max().item()
    torch.testing.assert_close(x.grad.double() / scale, want / scale, rtol=2e-3, atol=2e-3)
