"""DiffusionNFT's math (pec.algorithms.nft) against float64 re-derivations written here from the authors' code.

The references follow NVlabs/DiffusionNFT scripts/train_nft_sd3.py literally (v⁺, v⁻, x̂0^± = x_σ − σv^±,
float64 weights `.abs().mean(keepdim=True).clip(min=1e-5)` divided elementwise before the mean, r·L⁺/β +
(1 − r)·L⁻/β times adv_clip_max), not the rewritten form the module uses (x̂0^± − x0 = e ∓ σβ(v_θ − v_old)).
Bad input is tested in tests/bad_input/test_bad_nft_math.py.
"""
from __future__ import annotations

import pytest
import torch

from pec.algorithms.nft import (
    forward_noise,
    nft_loss,
    nft_timesteps,
    old_policy_decay,
    optimality_probability,
    update_old_policy,
    velocity_penalty,
)

SHAPES = {"BCHW": (5, 3, 7, 5), "BLC": (4, 11, 3), "video": (3, 2, 3, 5, 7)}


def column(t, like):
    return t.view((-1,) + (1,) * (like.dim() - 1))


def reference_loss(v_theta, v_old, xt, x0, t, r, beta, scale):
    """The authors' loss terms in float64; weights frozen (detached) as in their torch.no_grad() block."""
    dims = tuple(range(1, x0.ndim))
    tt = column(t, x0)
    positive = beta * v_theta + (1 - beta) * v_old
    negative = (1.0 + beta) * v_old - beta * v_theta
    terms = []
    for prediction in (positive, negative):
        x0_prediction = xt - tt * prediction
        weight = torch.abs(x0_prediction - x0).mean(dim=dims, keepdim=True).clip(min=0.00001).detach()
        terms.append((((x0_prediction - x0) ** 2 / weight).mean(dim=dims), weight.view(-1)))
    (pos, w_pos), (neg, w_neg) = terms
    return (r * pos / beta + (1.0 - r) * neg / beta) * scale, pos, neg, w_pos, w_neg


def make_batch(shape, dtype=torch.float64, beta=0.1):
    """Latents as in training: x0 clean, x_σ forward-noised, v_old a noisy guess of ε − x0, v_θ near v_old."""
    x0, eps, noise_old, noise_new = (torch.randn(shape, dtype=torch.float64) for _ in range(4))
    sigma = torch.rand(shape[0], dtype=torch.float64) * 0.9 + 0.05
    xt = (1 - column(sigma, x0)) * x0 + column(sigma, x0) * eps
    v_old = eps - x0 + 0.3 * noise_old
    v_theta = v_old + 0.2 * noise_new
    r = torch.rand(shape[0], dtype=torch.float64)
    return [t.to(dtype) for t in (v_theta, v_old, xt, x0)] + [sigma, r]


def assert_close(actual, expected, rtol, atol):
    assert torch.isfinite(actual).all(), "non-finite output"
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------ optimality probability

def test_optimality_probability_matches_the_authors_map():
    a = torch.randn(64, dtype=torch.float64) * 4
    a[:6] = torch.tensor([-1e9, -5.0, -2.5, 0.0, 5.0, 7.3], dtype=torch.float64)
    r = optimality_probability(a)
    expected = torch.tensor([min(max(float(v) / 10 + 0.5, 0.0), 1.0) for v in a], dtype=torch.float64)
    assert_close(r, expected, 1e-15, 1e-15)
    assert r[:6].tolist() == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]  # clipped at ±5, then in [0, 1]
    r2 = optimality_probability(a, adv_clip=2.0)
    assert_close(r2, (a.clamp(-2, 2) / 4 + 0.5), 1e-15, 1e-15)
    assert r.dtype == torch.float64 and optimality_probability(a.float()).dtype == torch.float32
    assert optimality_probability(torch.tensor([float("inf"), -float("inf")])).tolist() == [1.0, 0.0]


# ------------------------------------------------------------------------------------------ timesteps

def test_timesteps_are_per_sample_subsets_without_replacement():
    idx = nft_timesteps(512, 10, 0.99, torch.Generator().manual_seed(3))
    assert idx.shape == (512, 9) and idx.dtype == torch.int64 and idx.device.type == "cpu"
    assert ((idx >= 0) & (idx < 10)).all()
    assert all(len(set(row)) == 9 for row in idx.tolist())  # no repeats within a sample
    # Every grid point, σ_0 = 1 included, is left out by some samples and kept by others, about equally:
    left_out = 45 - idx.sum(dim=1)  # 0 + 1 + … + 9 = 45 minus the kept ones
    counts = torch.bincount(left_out, minlength=10)
    assert counts.min() > 512 / 10 / 2 and counts.max() < 512 / 10 * 2, counts
    # … and the order is random too: the first trained point takes every value.
    assert torch.bincount(idx[:, 0], minlength=10).min() > 0
    assert nft_timesteps(3, 25, 0.99, torch.Generator().manual_seed(0)).shape == (3, 24)
    assert nft_timesteps(2, 4, 1.0, torch.Generator().manual_seed(0)).sort(dim=1).values.tolist() == [[0, 1, 2, 3]] * 2


def test_timesteps_are_reproducible_from_the_seed():
    draw = [nft_timesteps(16, 10, 0.99, torch.Generator().manual_seed(seed)) for seed in (7, 7, 8)]
    assert torch.equal(draw[0], draw[1])
    assert not torch.equal(draw[0], draw[2])
    g = torch.Generator().manual_seed(7)
    first, second = nft_timesteps(16, 10, 0.99, g), nft_timesteps(16, 10, 0.99, g)
    assert torch.equal(first, draw[0]) and not torch.equal(first, second)  # the generator advances


# ------------------------------------------------------------------------------------ forward noising

@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_forward_noise_matches_float64(shape):
    x0, eps = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    sigma = torch.rand(shape[0], dtype=torch.float64)
    sigma[0], sigma[1] = 0.0, 1.0
    out = forward_noise(x0, eps, sigma)
    assert_close(out, (1 - column(sigma, x0)) * x0 + column(sigma, x0) * eps, 1e-14, 1e-14)
    assert torch.equal(out[0], x0[0]) and torch.equal(out[1], eps[1])  # exact at the ends
    f32 = forward_noise(x0.float(), eps.float(), sigma.float())
    assert f32.dtype == torch.float32
    assert_close(f32, out, 1e-6, 1e-6)
    bf16 = forward_noise(x0.bfloat16(), eps.bfloat16(), sigma)
    assert bf16.dtype == torch.bfloat16  # float32 math, one rounding to bf16 at the end
    assert_close(bf16, forward_noise(x0.bfloat16().float(), eps.bfloat16().float(), sigma), 2 ** -8, 1e-6)
    assert_close(forward_noise(x0, eps, 0.25), 0.75 * x0 + 0.25 * eps, 1e-15, 1e-15)


# ------------------------------------------------------------------------------------------- NFT loss

@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_loss_matches_float64_reference(shape, beta):
    v_theta, v_old, xt, x0, sigma, r = make_batch(shape)
    out = nft_loss(v_theta, v_old, xt, x0, sigma, r, beta)
    expected = reference_loss(v_theta, v_old, xt, x0, sigma, r, beta, 5.0)
    for got, want in zip(out, expected):
        assert got.shape == (shape[0],) and got.dtype == torch.float64
        assert_close(got, want, 1e-12, 1e-14)
    assert_close(nft_loss(v_theta, v_old, xt, x0, sigma, r, beta, scale=1.0).loss, expected[0] / 5, 1e-12, 1e-14)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5)], ids=["fp32", "bf16"])
def test_nft_loss_in_lower_precision(dtype, rtol):
    """float32 math on the given values: bf16 latents match the float64 reference on the same rounded values."""
    v_theta, v_old, xt, x0, sigma, r = make_batch(SHAPES["BCHW"], dtype=dtype, beta=1.0)
    out = nft_loss(v_theta, v_old, xt, x0, sigma, r, 1.0)
    expected = reference_loss(*(t.double() for t in (v_theta, v_old, xt, x0)), sigma, r, 1.0, 5.0)
    for got, want in zip(out, expected):
        assert_close(got, want, rtol, 1e-7)


def test_nft_loss_weights_are_floored():
    """x̂0^± = x0 exactly (v_θ = v_old = the true ε − x0): w^± = 1e-5, L^± = 0."""
    x0, eps = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    sigma = torch.tensor([0.3, 0.8], dtype=torch.float64)
    xt = forward_noise(x0, eps, sigma)
    out = nft_loss(eps - x0, eps - x0, xt, x0, sigma, torch.tensor([0.2, 0.9], dtype=torch.float64), 1.0)
    assert out.weight_pos.tolist() == [1e-5, 1e-5] and out.weight_neg.tolist() == [1e-5, 1e-5]
    assert out.loss.abs().max() < 1e-20


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_loss_gradient_in_v_theta(beta):
    """The gradient treats w^± as constants. Central finite differences of the float64 reference with the
    weights frozen are exact for a quadratic (up to rounding); a closed form checks the same numbers."""
    shape = SHAPES["BCHW"]
    v_theta, v_old, xt, x0, sigma, r = make_batch(shape)
    leaf = v_theta.clone().requires_grad_()
    out = nft_loss(leaf, v_old, xt, x0, sigma, r, beta)
    (grad,) = torch.autograd.grad(out.loss.sum(), leaf)

    w_pos, w_neg = out.weight_pos.detach(), out.weight_neg.detach()
    dims, n = tuple(range(1, x0.dim())), x0[0].numel()
    s = column(sigma, x0)

    def frozen(v):
        d_pos = xt - s * (beta * v + (1 - beta) * v_old) - x0
        d_neg = xt - s * ((1 + beta) * v_old - beta * v) - x0
        pos = (d_pos ** 2 / column(w_pos, x0)).mean(dim=dims)
        neg = (d_neg ** 2 / column(w_neg, x0)).mean(dim=dims)
        return ((r * pos / beta + (1 - r) * neg / beta) * 5.0).sum()

    for _ in range(3):
        u = torch.randn(shape, dtype=torch.float64)
        h = 1e-3
        fd = (frozen(v_theta + h * u) - frozen(v_theta - h * u)) / (2 * h)
        torch.testing.assert_close((grad * u).sum(), fd, rtol=1e-9, atol=1e-9)
    d_pos = xt - s * (beta * v_theta + (1 - beta) * v_old) - x0
    d_neg = xt - s * ((1 + beta) * v_old - beta * v_theta) - x0
    closed = 5.0 / beta * 2 * s * beta / n * (column(1 - r, x0) * d_neg / column(w_neg, x0)
                                              - column(r, x0) * d_pos / column(w_pos, x0))
    assert_close(grad, closed, 1e-10, 1e-12)


def test_nft_loss_gets_no_gradient_from_the_weights():
    """Differentiating through w^± (what a missing stop-grad would do) gives another gradient."""
    v_theta, v_old, xt, x0, sigma, r = make_batch(SHAPES["BLC"])
    leaf = v_theta.clone().requires_grad_()
    (ours,) = torch.autograd.grad(nft_loss(leaf, v_old, xt, x0, sigma, r, 1.0).loss.sum(), leaf)
    leaf2 = v_theta.clone().requires_grad_()
    dims = tuple(range(1, x0.dim()))
    d = xt - column(sigma, x0) * leaf2 - x0  # β = 1: v⁺ = v_θ
    d_neg = xt - column(sigma, x0) * (2 * v_old - leaf2) - x0
    full = r * (d ** 2).mean(dims) / d.abs().mean(dims) + (1 - r) * (d_neg ** 2).mean(dims) / d_neg.abs().mean(dims)
    (through,) = torch.autograd.grad(5 * full.sum(), leaf2)
    assert (ours - through).abs().max() > 1e-3


def test_nft_loss_float_sigma_and_r():
    v_theta, v_old, xt, x0, _, _ = make_batch(SHAPES["BLC"])
    b = x0.shape[0]
    by_float = nft_loss(v_theta, v_old, xt, x0, 0.4, 0.7, 0.5)
    by_tensor = nft_loss(v_theta, v_old, xt, x0, torch.full((b,), 0.4, dtype=torch.float64),
                         torch.full((b,), 0.7, dtype=torch.float64), 0.5)
    for a, c in zip(by_float, by_tensor):
        torch.testing.assert_close(a, c, rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------------- velocity penalty

def test_velocity_penalty_matches_float64_and_its_gradient():
    v_theta, v_ref = torch.randn(4, 3, 5, 2, dtype=torch.float64), torch.randn(4, 3, 5, 2, dtype=torch.float64)
    leaf = v_theta.clone().requires_grad_()
    out = velocity_penalty(leaf, v_ref)
    assert_close(out, ((v_theta - v_ref) ** 2).mean(dim=(1, 2, 3)), 1e-14, 1e-15)
    (grad,) = torch.autograd.grad(out.sum(), leaf)
    assert_close(grad, 2 * (v_theta - v_ref) / 30, 1e-14, 1e-15)
    half = velocity_penalty(v_theta.bfloat16(), v_ref.bfloat16())
    assert half.dtype == torch.float32
    assert_close(half, ((v_theta.bfloat16().double() - v_ref.bfloat16().double()) ** 2).mean(dim=(1, 2, 3)),
                 1e-6, 1e-7)


# -------------------------------------------------------------------------------- old-policy updates

@pytest.mark.parametrize("step", [0, 1, 74, 75, 76, 208, 209, 500, 501, 10 ** 6])
def test_decay_schedules(step):
    assert old_policy_decay(0, step) == 0.0
    assert old_policy_decay(1, step) == pytest.approx(min(step / 1000, 0.5), rel=1e-12, abs=0)
    expected = 0.0 if step < 75 else min((step - 75) * 3 / 400, 0.999)
    assert old_policy_decay(2, step) == pytest.approx(expected, rel=1e-12, abs=0)


def test_decay_schedule_boundaries():
    assert [old_policy_decay(2, s) for s in (74, 75)] == [0.0, 0.0]
    assert old_policy_decay(2, 76) == pytest.approx(0.0075)
    assert old_policy_decay(2, 209) == 0.999 and old_policy_decay(1, 500) == 0.5 and old_policy_decay(1, 499) < 0.5


@pytest.mark.parametrize("decay", [0.0, 0.3, old_policy_decay(1, 137), 1.0])
def test_update_old_policy_in_place(decay):
    shapes = [(32, 8), (8,), (3, 4, 5)]
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    old = [torch.randn(s, dtype=torch.float64) for s in shapes]
    before = [t.clone() for t in old]
    pointers = [t.data_ptr() for t in old]
    params_before = [p.detach().clone() for p in params]
    update_old_policy(old, params, decay)
    for o, b, p, pb, ptr in zip(old, before, params, params_before, pointers):
        assert o.data_ptr() == ptr and not o.requires_grad and o.grad_fn is None
        assert_close(o, decay * b + (1 - decay) * pb, 1e-15, 1e-15)
        assert torch.equal(p.detach(), pb)  # the trained weights are untouched
    if decay == 0.0:
        assert all(torch.equal(o, p.detach()) for o, p in zip(old, params))  # a copy


def test_no_function_reads_values_on_the_host():
    """Nothing here synchronises a GPU (counted on CPU as in tests/test_kernel_syncs.py)."""
    from test_kernel_syncs import _reads

    v_theta, v_old, _, x0, sigma, r = make_batch(SHAPES["BLC"], dtype=torch.float32)
    leaf = v_theta.requires_grad_()

    def run():
        xt = forward_noise(x0, torch.randn_like(x0), sigma.float())
        probability = optimality_probability(torch.randn(x0.shape[0]))
        out = nft_loss(leaf, v_old, xt, x0, sigma.float(), probability, 0.1)
        (out.loss.mean() + 1e-4 * velocity_penalty(leaf, v_old).mean()).backward()
        update_old_policy([torch.zeros(3)], [torch.ones(3)], old_policy_decay(1, 10))

    assert _reads(run) == 0
