"""guided_sde_step(cfg_renorm=True) and cfg_velocity: Qwen-Image's true CFG, whose combined velocity is
rescaled to the conditional velocity's norm per token (QwenImagePipeline.__call__, Flow-GRPO's Qwen-Image
trainer), before the SDE step.

The float64 reference writes the rescale straight from the pipeline's three lines and steps with
test_sde's independent reference of DESIGN.md §2.1.
"""
from __future__ import annotations

import pytest
import torch

from pec_kernels import cfg_velocity
from pec_kernels.sde import guided_sde_step
from test_kernel_syncs import _reads
from test_sde import (SIGMA_MAX, assert_close, backend_params, make_inputs, poisoned,  # noqa: F401 (fixture)
                      reference_step, schedule)

SHAPE = (5, 6, 4)  # packed latents (B, L, C): the norms run over C, per token
SCALE = torch.tensor([4.0, 1.0, 0.0, 7.0, 2.5])


def reference_velocity(v_uncond, v_cond, scale, guidance=None, weight=0.0):
    """QwenImagePipeline: comb = neg + s·(cond − neg); comb·(‖cond‖/‖comb‖) over the last dim; then
    this project's guidance shift."""
    comb = v_uncond + scale.view(-1, *(1,) * (v_uncond.dim() - 1)) * (v_cond - v_uncond)
    v = comb * (torch.norm(v_cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    return v if guidance is None else v + weight * guidance


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("with_guidance", [False, True])
@pytest.mark.parametrize("noncontiguous", [False, True], ids=["contiguous", "transposed"])
def test_renormed_step_matches_float64_reference(backend, with_guidance, noncontiguous):
    inp = make_inputs(SHAPE, noncontiguous=noncontiguous)
    sigma, sigma_next = schedule(5)
    d = {k: t.double() for k, t in inp.items()}
    v = reference_velocity(d["v_uncond"], d["v_cond"], SCALE.double(), d["guidance"] if with_guidance else None, 0.3)
    extra = dict(guidance=inp["guidance"], guidance_weight=0.3) if with_guidance else {}
    out = guided_sde_step(inp["x"], inp["v_uncond"], inp["v_cond"], SCALE, sigma, sigma_next, noise=inp["noise"],
                          sigma_max=SIGMA_MAX, v_ref=inp["v_ref"], backend=backend, return_mean=True,
                          cfg_renorm=True, **extra)
    _, lp, mean, _, kl = reference_step("flow", d["x"], v, sigma.double(), sigma_next.double(), 0.7, SIGMA_MAX,
                                        prev=out.prev_sample.double(), v_ref=d["v_ref"])
    ref_prev = reference_step("flow", d["x"], v, sigma.double(), sigma_next.double(), 0.7, SIGMA_MAX,
                              noise=d["noise"])[0]
    assert_close(out.prev_sample, ref_prev, 1e-5, 1e-5, "prev_sample")
    assert_close(out.mean, mean, 1e-5, 1e-5, "mean")
    assert_close(out.log_prob, lp, 1e-5, 1e-4, "log_prob")
    assert_close(out.kl, kl, 1e-5, 1e-5, "kl")
    # The rescale changes the step: without it the result is the plain CFG step.
    plain = guided_sde_step(inp["x"], inp["v_uncond"], inp["v_cond"], SCALE, sigma, sigma_next, noise=inp["noise"],
                            sigma_max=SIGMA_MAX, backend=backend, return_mean=True, **extra)
    assert not torch.allclose(plain.mean, out.mean, atol=1e-3)
    # Re-evaluating the rollout's x' gives its log-prob bit for bit (the first on-policy ratio is 1).
    again = guided_sde_step(inp["x"], inp["v_uncond"], inp["v_cond"], SCALE, sigma, sigma_next,
                            prev_sample=out.prev_sample, sigma_max=SIGMA_MAX, backend=backend, cfg_renorm=True,
                            **extra)
    assert torch.equal(again.log_prob, out.log_prob)


def test_cfg_velocity_is_the_pipelines_combination():
    inp = make_inputs(SHAPE)
    d = {k: t.double() for k, t in inp.items()}
    v = cfg_velocity(inp["v_uncond"], inp["v_cond"], SCALE, cfg_renorm=True)
    assert v.dtype == torch.float32 and v.shape == SHAPE
    expected = reference_velocity(d["v_uncond"], d["v_cond"], SCALE.double())
    assert_close(v, expected, 1e-6, 1e-6, "v")
    # Per token the result has the conditional velocity's norm; at scale 1 it is v_cond itself.
    assert_close(v.norm(dim=-1), inp["v_cond"].norm(dim=-1), 1e-6, 1e-6, "norm")
    assert_close(v[1], inp["v_cond"][1], 1e-6, 1e-6, "scale 1")
    plain = cfg_velocity(inp["v_uncond"], inp["v_cond"], 2.5)
    assert_close(plain, d["v_uncond"] + 2.5 * (d["v_cond"] - d["v_uncond"]), 1e-6, 1e-6, "plain CFG")
    assert cfg_velocity(inp["v_uncond"].double(), inp["v_cond"].double(), 4.0, cfg_renorm=True).dtype == torch.float64


def test_gradcheck_in_x_both_velocities_and_guidance():
    g = torch.Generator().manual_seed(0)
    x, v_u, v_c, guidance = (torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
                             for _ in range(4))
    prev = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    sigma, sigma_next = torch.tensor([0.9, 0.6, 0.3], dtype=torch.float64), 0.2
    v_ref = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)

    def fn(x, v_u, v_c, guidance):
        out = guided_sde_step(x, v_u, v_c, 4.0, sigma, sigma_next, guidance=guidance, guidance_weight=0.3,
                              prev_sample=prev, v_ref=v_ref, backend="torch", return_mean=True, cfg_renorm=True)
        return out.log_prob, out.kl, out.mean

    assert torch.autograd.gradcheck(fn, (x, v_u, v_c, guidance))


def test_a_zero_combined_velocity_stays_zero_with_finite_gradients():
    """Where v_uncond + s(v_cond - v_uncond) = 0 the pipeline divides 0 by 0; here the token stays 0."""
    v_u, v_c = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    v_u[0, 1] = torch.tensor([1.0, -2.0, 0.5, 4.0])
    v_c[0, 1] = 0.75 * v_u[0, 1]  # exactly, in binary: at s = 4, v_u + 4(0.75 v_u - v_u) = 0
    v_u.requires_grad_(True)
    v_c.requires_grad_(True)
    v = cfg_velocity(v_u, v_c, 4.0, cfg_renorm=True)
    assert torch.equal(v[0, 1], torch.zeros(4)) and torch.isfinite(v).all()
    v.sum().backward()
    assert torch.isfinite(v_u.grad).all() and torch.isfinite(v_c.grad).all()


def test_bfloat16_inputs_against_float64_on_the_rounded_inputs():
    """bf16 latents and velocities: the combination and the step's math run in float32 on the rounded
    inputs, so the only bf16 rounding is the output's (mean and x' to bf16: 2^-8 relative); the log-prob
    and KL come from float32 math and match to 1e-4."""
    inp = make_inputs(SHAPE, dtype=torch.bfloat16)
    sigma, sigma_next = schedule(5)
    d = {k: t.double() for k, t in inp.items()}
    out = guided_sde_step(inp["x"], inp["v_uncond"], inp["v_cond"], SCALE, sigma, sigma_next, noise=inp["noise"],
                          sigma_max=SIGMA_MAX, v_ref=inp["v_ref"], backend="torch", return_mean=True,
                          cfg_renorm=True)
    v = reference_velocity(d["v_uncond"], d["v_cond"], SCALE.double())
    _, lp, mean, _, kl = reference_step("flow", d["x"], v, sigma.double(), sigma_next.double(), 0.7, SIGMA_MAX,
                                        prev=out.prev_sample.double(), v_ref=d["v_ref"])
    assert out.prev_sample.dtype == out.mean.dtype == torch.bfloat16 and out.log_prob.dtype == torch.float32
    assert_close(out.mean, mean, 2 ** -8, 1e-3, "mean")
    assert_close(out.log_prob, lp, 1e-4, 1e-3, "log_prob")
    assert_close(out.kl, kl, 1e-4, 1e-4, "kl")
    # Against the same step on float32 inputs (not rounded): bf16's input rounding, 2^-7 relative.
    f32 = guided_sde_step(*(inp[k].float() for k in ("x", "v_uncond", "v_cond")), SCALE, sigma, sigma_next,
                          noise=inp["noise"].float(), sigma_max=SIGMA_MAX, backend="torch", return_mean=True,
                          cfg_renorm=True)
    assert_close(out.mean, f32.mean, 2 ** -7, 1e-2, "bf16 vs fp32 mean")


@pytest.mark.parametrize("backend", backend_params())
def test_renorm_never_reads_values_on_the_host(backend):
    inp = make_inputs(SHAPE)
    v_u, v_c = (inp[k].requires_grad_() for k in ("v_uncond", "v_cond"))
    sigma, sigma_next = schedule(5)

    def run():
        a = guided_sde_step(inp["x"], v_u, v_c, SCALE, sigma, sigma_next, noise=inp["noise"], backend=backend,
                            cfg_renorm=True)
        b = guided_sde_step(inp["x"], v_u, v_c, 4.0, sigma, sigma_next, prev_sample=a.prev_sample.detach(),
                            guidance=inp["guidance"], guidance_weight=0.2, backend=backend, cfg_renorm=True)
        (a.log_prob.sum() + b.log_prob.sum() + cfg_velocity(v_u, v_c, SCALE, cfg_renorm=True).sum()).backward()

    assert _reads(run) == 0


def test_bad_cfg_renorm_arguments_name_them():
    inp = make_inputs(SHAPE)
    with pytest.raises(ValueError, match="cfg_renorm must be a bool"):
        guided_sde_step(inp["x"], inp["v_uncond"], inp["v_cond"], 4.0, 0.8, 0.5, noise=inp["noise"], cfg_renorm=1)
    with pytest.raises(ValueError, match="v_cond must have the shape of x"):
        cfg_velocity(inp["v_uncond"], inp["v_cond"][:, :3], 4.0, cfg_renorm=True)
    with pytest.raises(ValueError, match="guidance_scale must be finite"):
        cfg_velocity(inp["v_uncond"], inp["v_cond"], float("inf"), cfg_renorm=True)
