"""Bad input to the ODE solver step (pec_kernels.dpm_solver_step) and DiffusionNFT's math (pec.algorithms.nft).

Each is a ValueError whose one-line message names the argument and what was expected.
"""
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
from pec_kernels import dpm_solver_step


def _refused(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


X = torch.randn(3, 2, 4)
X0, X0_PREV = torch.randn(3, 2, 4), torch.randn(3, 2, 4)


@pytest.mark.parametrize("call,match", [
    (lambda: dpm_solver_step(X, X0[:, :1], X0_PREV, 0.9, 0.5, 0.2), r"x0 must have the shape of x"),
    (lambda: dpm_solver_step(X, X0, X0_PREV[:2], 0.9, 0.5, 0.2), r"x0_prev must have the shape of x"),
    (lambda: dpm_solver_step(X, X0.to("meta"), X0_PREV, 0.9, 0.5, 0.2), r"x0 is on meta but x is on cpu"),
    (lambda: dpm_solver_step(X, X0, X0_PREV, 0.9, torch.full((3,), 0.5, device="meta"), 0.2),
     r"sigma is on meta but x is on cpu"),
    (lambda: dpm_solver_step(X, X0, X0_PREV, 0.9, 0.5, 0.2, order=3), r"order must be one of \[1, 2\], got 3"),
    (lambda: dpm_solver_step(X, X0, X0_PREV, 0.9, 0.5, 0.2, order="2"), r"order must be one of"),
    (lambda: dpm_solver_step(X, X0, None, 0.9, 0.5, 0.2), r"x0_prev is required for order=2"),
    (lambda: dpm_solver_step(X, X0, X0_PREV, None, 0.5, 0.2), r"sigma_prev is required for order=2"),
    (lambda: dpm_solver_step(X, X0, X0_PREV, 0.9, 0.0, 0.0), r"sigma must be in \(0, 1\]"),
    (lambda: dpm_solver_step(X, X0, X0_PREV, 1.0, 1.5, 0.2), r"sigma must be in \(0, 1\]"),
    (lambda: dpm_solver_step(X, X0, X0_PREV, 0.9, float("nan"), 0.2), r"sigma must be in \(0, 1\]"),
    (lambda: dpm_solver_step(X, X0, X0_PREV, 0.9, 0.5, -0.1), r"sigma_next must be in \[0, sigma\)"),
    (lambda: dpm_solver_step(X, X0, X0_PREV, 0.9, 0.5, 0.5), r"sigma_next must be in \[0, sigma\)"),
    (lambda: dpm_solver_step(X, X0, X0_PREV, 0.5, 0.5, 0.2), r"sigma_prev must be in \(sigma, 1\]"),
    (lambda: dpm_solver_step(X, X0, X0_PREV, 1.2, 0.5, 0.2), r"sigma_prev must be in \(sigma, 1\]"),
    (lambda: dpm_solver_step(X, X0, X0_PREV, 0.9, torch.full((2,), 0.5), 0.2), r"sigma must have shape \(\) or \(3,\)"),
    (lambda: dpm_solver_step(X, X0, X0_PREV, 0.9, torch.full((3,), 0.5, requires_grad=True), 0.2),
     r"sigma is not differentiable"),
    (lambda: dpm_solver_step(X[0, 0], X0[0, 0], None, None, 0.5, 0.2, order=1), r"x must have a batch dimension"),
    (lambda: dpm_solver_step(X.long(), X0, None, None, 0.5, 0.2, order=1), r"x must have dtype in"),
    (lambda: dpm_solver_step(X, X0, X0_PREV, torch.tensor([0.9, 0.6, 0.3]), torch.tensor([0.5, 0.7, 0.2]), 0.1,
                             check_schedule=True), r"sigma_prev must be in \(sigma, 1\]; check_schedule found"),
    (lambda: dpm_solver_step(X, X0, None, None, torch.tensor([0.5, 0.7, 0.0]), 0.0, order=1, check_schedule=True),
     r"sigma must be in \(0, 1\]; check_schedule found values in \[0.0, "),
])
def test_bad_solver_input(call, match):
    _refused(call, match)


V = torch.randn(3, 2, 4)
R = torch.full((3,), 0.5)


@pytest.mark.parametrize("call,match", [
    (lambda: optimality_probability([0.1, 0.2]), r"advantages must be a torch.Tensor"),
    (lambda: optimality_probability(torch.ones(3), adv_clip=0), r"adv_clip must be a finite number > 0"),
    (lambda: optimality_probability(torch.ones(3), adv_clip=float("inf")), r"adv_clip must be a finite number > 0"),
    (lambda: nft_timesteps(0, 10, 0.99, torch.Generator()), r"num_samples must be an int >= 1"),
    (lambda: nft_timesteps(4, 2.5, 0.99, torch.Generator()), r"num_steps must be an int >= 1"),
    (lambda: nft_timesteps(4, 10, 1.5, torch.Generator()), r"fraction must be a number in \(0, 1\]"),
    (lambda: nft_timesteps(4, 10, 0.05, torch.Generator()), r"fraction 0.05 trains int\(10 x 0.05\) = 0"),
    (lambda: nft_timesteps(4, 10, 0.99, 0), r"generator must be a CPU torch.Generator"),
    (lambda: forward_noise(V, V[:, :1], 0.5), r"eps must have the shape of x0"),
    (lambda: forward_noise(V, V, torch.ones(2)), r"sigma must have shape \(3,\)"),
    (lambda: forward_noise(V, V.to("meta"), 0.5), r"eps is on meta but x0 is on cpu"),
    (lambda: forward_noise(V, V, float("nan")), r"sigma must be finite"),
    (lambda: nft_loss(V, V, V, V[:2], 0.5, R, 1.0), r"x0 must have the shape of v_theta"),
    (lambda: nft_loss(V, V.requires_grad_(), V.detach(), V.detach(), 0.5, R, 1.0), r"v_old is treated as data"),
    (lambda: nft_loss(V.detach(), V.detach(), V.detach(), V.detach(), 0.5, R[:2], 1.0),
     r"r must have shape \(3,\)"),
    (lambda: nft_loss(V.detach(), V.detach(), V.detach(), V.detach(), 0.5, R, 0.0),
     r"beta must be a finite number > 0"),
    (lambda: nft_loss(V.detach(), V.detach(), V.detach(), V.detach(), 0.5, R, 1.0, scale=-5.0),
     r"scale must be a finite number >= 0"),
    (lambda: nft_loss(V.detach(), V.detach(), V.detach(), V.detach(), "0.5", R, 1.0), r"sigma must be a float"),
    (lambda: velocity_penalty(V.detach(), V.detach()[:, :, :2]), r"v_ref must have the shape of v_theta"),
    (lambda: old_policy_decay(3, 10), r"schedule must be one of \[0, 1, 2\], got 3"),
    (lambda: old_policy_decay(1, -1), r"step must be an int >= 0"),
    (lambda: update_old_policy([torch.ones(2)], [torch.ones(2), torch.ones(3)], 0.5),
     r"old_params must hold one tensor per parameter: 1 for 2"),
    (lambda: update_old_policy([torch.ones(2)], [torch.ones(3)], 0.5), r"old_params\[0\] must match params\[0\]"),
    (lambda: update_old_policy([torch.ones(2)], [torch.ones(2)], 1.5), r"decay must be in \[0, 1\]"),
    (lambda: update_old_policy([torch.ones(2)], [torch.ones(2)], -0.1), r"decay must be a finite number >= 0"),
])
def test_bad_nft_input(call, match):
    _refused(call, match)
