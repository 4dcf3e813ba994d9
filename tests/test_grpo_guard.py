"""GRPO-Guard's ratio and loss against float64 re-derivations: log rho = mean((mu_theta - mu_old) xi) and
log rho = s (log p_theta - log p_old + b) with exact mean-reduced Gaussian log-probs (DESIGN.md §2.1),
rho == 1 bit for bit on-policy, the |dt| division, and the gradient in mu_theta."""
from __future__ import annotations

import math

import pytest
import torch

from pec.algorithms.grpo_guard import guard_log_ratio, guard_surrogate
from pec.grpo import clipped_surrogate
from pec_kernels import sde_step_logprob


def _gaussian_log_prob(x: torch.Tensor, mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """log N(x; mu, s^2) per element, mean-reduced per sample (s: (B,))."""
    s = s.reshape(-1, *([1] * (x.dim() - 1)))
    return (-(x - mu) ** 2 / (2 * s ** 2) - torch.log(s) - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)


def _inputs(dtype: torch.dtype = torch.float64, batch: int = 5, shape: tuple[int, ...] = (4, 3, 3)):
    g = torch.Generator().manual_seed(1)
    mu_old = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    mu_theta = mu_old + 1e-2 * torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    s = 0.05 + torch.rand(batch, generator=g, dtype=torch.float64)
    xi = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    x_next = mu_old + s.reshape(-1, 1, 1, 1) * xi
    return mu_theta.to(dtype), mu_old.to(dtype), x_next.to(dtype), s.to(dtype)


def test_both_forms_in_float64():
    mu_theta, mu_old, x_next, s = _inputs()
    xi = (x_next - mu_old) / s.reshape(-1, 1, 1, 1)
    form_noise = ((mu_theta - mu_old) * xi).flatten(1).mean(1)
    b = (mu_theta - mu_old).square().flatten(1).mean(1) / (2 * s ** 2)
    form_logp = s * (_gaussian_log_prob(x_next, mu_theta, s) - _gaussian_log_prob(x_next, mu_old, s) + b)
    torch.testing.assert_close(form_logp, form_noise, rtol=1e-9, atol=1e-12)
    got = guard_log_ratio(mu_theta, mu_old, x_next, s)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, form_noise, rtol=1e-13, atol=1e-15)
    # float32 inputs, float32 math: the same up to float32 rounding
    got32 = guard_log_ratio(mu_theta.float(), mu_old.float(), x_next.float(), s.float())
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), form_noise, rtol=1e-4, atol=1e-7)
    # one scalar std per step (verl-omni's s_t), as a float and as a 0-dim tensor
    x_one = mu_old + 0.3 * xi
    expected = ((mu_theta - mu_old) * xi).flatten(1).mean(1)
    torch.testing.assert_close(guard_log_ratio(mu_theta, mu_old, x_one, 0.3), expected, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(guard_log_ratio(mu_theta, mu_old, x_one, torch.tensor(0.3, dtype=torch.float64)),
                               expected, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("kind", ["flow", "dance", "cps"])
def test_equals_the_normalised_ratio_of_the_sde_step_log_probs(kind):
    """With the package's own step (pec_kernels, float64): the rollout's log p_old, mu_old and std, a
    re-evaluation's log p_theta and mu_theta under another velocity."""
    g = torch.Generator().manual_seed(2)
    x, v_old, noise = (torch.randn(4, 2, 5, 5, generator=g, dtype=torch.float64) for _ in range(3))
    v_theta = v_old + 0.05 * torch.randn(4, 2, 5, 5, generator=g, dtype=torch.float64)
    old = sde_step_logprob(x, v_old, 0.8, 0.7, noise=noise, kind=kind, backend="torch", return_mean=True)
    new = sde_step_logprob(x, v_theta, 0.8, 0.7, prev_sample=old.prev_sample, kind=kind, backend="torch",
                           return_mean=True)
    b = (new.mean - old.mean).square().flatten(1).mean(1) / (2 * old.std ** 2)
    expected = old.std * (new.log_prob - old.log_prob + b)
    got = guard_log_ratio(new.mean, old.mean, old.prev_sample, old.std)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert got.abs().max() > 1e-4  # the velocities differ enough for the comparison to mean something


def test_ratio_is_exactly_one_on_policy():
    """float32 as the trainer runs: mu_theta == mu_old gives log rho = 0 and rho = 1 bit for bit, also
    through the package's step re-evaluated on its own rollout."""
    mu_theta, _, x_next, s = _inputs(torch.float32)
    log_ratio = guard_log_ratio(mu_theta, mu_theta.clone(), x_next, s)
    assert torch.equal(log_ratio, torch.zeros(5)) and torch.equal(log_ratio.exp(), torch.ones(5))
    _, stats = guard_surrogate(log_ratio, torch.randn(5), 2e-6, -0.1)
    assert stats.ratio_min.item() == stats.ratio_max.item() == 1.0 and stats.clip_fraction.item() == 0.0
    x, v = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    rollout = sde_step_logprob(x, v, 0.9, 0.75, noise=torch.randn(3, 4, 8), backend="torch", return_mean=True)
    again = sde_step_logprob(x, v, 0.9, 0.75, prev_sample=rollout.prev_sample, backend="torch", return_mean=True)
    assert torch.equal(guard_log_ratio(again.mean, rollout.mean, rollout.prev_sample, rollout.std).exp(),
                       torch.ones(3))


def test_dt_scaling():
    """The loss divided by |dt| (verl-omni), nothing else changed; per-element dt where steps mix."""
    g = torch.Generator().manual_seed(3)
    log_ratio = (3e-6 * torch.randn(6, 3, generator=g, dtype=torch.float64)).requires_grad_()  # some clipped
    adv = torch.randn(6, 3, generator=g, dtype=torch.float64)
    plain, plain_stats = guard_surrogate(log_ratio, adv, 2e-6, -0.08, dt_scaling=False)
    reference, _ = clipped_surrogate(log_ratio, torch.zeros_like(log_ratio), adv, 2e-6)
    assert torch.equal(plain, reference) and 0 < plain_stats.clip_fraction.item() < 1
    scaled, scaled_stats = guard_surrogate(log_ratio, adv, 2e-6, -0.08)
    torch.testing.assert_close(scaled, plain / 0.08, rtol=1e-14, atol=0)
    assert torch.equal(scaled_stats.ratio_mean, plain_stats.ratio_mean)
    assert torch.equal(scaled_stats.clip_fraction, plain_stats.clip_fraction)
    (grad_scaled,) = torch.autograd.grad(scaled, log_ratio)
    (grad_plain,) = torch.autograd.grad(plain, log_ratio)
    torch.testing.assert_close(grad_scaled, grad_plain / 0.08, rtol=1e-14, atol=0)
    # three steps with their own dt (one column each): the mean of each element's loss over its |dt|
    dt = torch.tensor([-0.2, -0.1, -0.05], dtype=torch.float64)
    rho = log_ratio.detach().exp()
    per_element = torch.maximum(-adv * rho, -adv * rho.clamp(1 - 2e-6, 1 + 2e-6)) / dt.abs()
    mixed, _ = guard_surrogate(log_ratio, adv, 2e-6, dt)
    torch.testing.assert_close(mixed, per_element.mean(), rtol=1e-14, atol=0)


def test_gradient_in_mu_theta_against_finite_differences():
    """d/dmu_theta of the loss, unclipped (clip range 0.5): autograd against central differences, and the
    ratio's own gradient against its closed form xi / D."""
    mu_theta, mu_old, x_next, s = _inputs(batch=2, shape=(2, 2, 2))
    adv = torch.tensor([0.7, -1.3], dtype=torch.float64)

    def loss(m: torch.Tensor) -> torch.Tensor:
        return guard_surrogate(guard_log_ratio(m, mu_old, x_next, s), adv, 0.5, -0.1)[0]

    m = mu_theta.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(m), m)
    numeric = torch.zeros_like(mu_theta)
    h = 1e-6
    for i in range(mu_theta.numel()):
        e = torch.zeros(mu_theta.numel(), dtype=torch.float64)
        e[i] = h
        e = e.reshape(mu_theta.shape)
        numeric.view(-1)[i] = (loss(mu_theta + e) - loss(mu_theta - e)) / (2 * h)
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-9)
    m = mu_theta.clone().requires_grad_()
    (grad_ratio,) = torch.autograd.grad(guard_log_ratio(m, mu_old, x_next, s).sum(), m)
    xi = (x_next - mu_old) / s.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(grad_ratio, xi / 8, rtol=1e-14, atol=1e-16)
