"""The Gaussian perceptual-entropy estimator against a float64 formula."""
import math

import pytest
import torch

from pec_kernels.gaussian import gaussian_entropy


def _reference(x):
    x = x.double()
    m = x.mean(-2, keepdim=True)
    v = ((x - m) ** 2).mean(-2, keepdim=True)
    s = 0.5 * (((x - m) ** 2) / v + torch.log(2 * math.pi * v)).sum(-1)
    return s.mean(-1), s


@pytest.mark.parametrize("shape", [(7, 5), (3, 9, 4)])
def test_matches_reference_and_closed_form(shape):
    x = torch.randn(*shape) * torch.rand(shape[-1]) * 3
    out = gaussian_entropy(x)
    ref_h, ref_s = _reference(x)
    torch.testing.assert_close(out.surprisal.double(), ref_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ref_h, rtol=1e-5, atol=1e-5)
    var = x.double().var(-2, unbiased=False)
    torch.testing.assert_close(out.entropy.double(), 0.5 * (1 + torch.log(2 * math.pi * var)).sum(-1),
                               rtol=1e-5, atol=1e-5)


def test_per_dim_and_noncontiguous_and_gradcheck():
    x = torch.randn(5, 8, dtype=torch.float64).t()  # (8, 5) non-contiguous
    full = gaussian_entropy(x)
    per_dim = gaussian_entropy(x, normalize="per_dim")
    torch.testing.assert_close(per_dim.entropy, full.entropy / 5)
    torch.autograd.gradcheck(lambda t: gaussian_entropy(t).surprisal, (x.clone().requires_grad_(),))


def test_collapsed_group_is_finite():
    x = torch.ones(6, 3)
    out = gaussian_entropy(x)
    assert torch.isfinite(out.entropy) and torch.isfinite(out.surprisal).all()


@pytest.mark.parametrize("bad, arg", [
    (torch.randn(4), "x"), (torch.randn(1, 3), "x"), (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), "x"),
])
def test_bad_input(bad, arg):
    with pytest.raises(ValueError, match=arg):
        gaussian_entropy(bad)


def test_bad_options():
    with pytest.raises(ValueError, match="normalize"):
        gaussian_entropy(torch.randn(4, 2), normalize="nope")
    with pytest.raises(ValueError, match="min_var"):
        gaussian_entropy(torch.randn(4, 2), min_var=0.0)
