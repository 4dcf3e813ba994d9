"""The rollout sampler: schedule, shapes, noise, determinism, SDE window, guidance, exact re-evaluation."""
import pytest
import torch

from pec.models.embedded import EmbeddedFlowModel
from pec.models.schedules import EMBEDDED_SHIFT, make_scheduler, schedule_sigmas
from pec.sampling import guided_velocity, sample, step_log_prob
from pec_kernels.sde import guided_sde_step

from _tiny_runs import TINY

PROMPTS = ["a handwritten 3", "the digit seven", "number 0"]


def test_schedule():
    sigmas = schedule_sigmas(10)
    assert sigmas.shape == (11,) and sigmas.dtype == torch.float32
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and (sigmas.diff() < 0).all()
    assert make_scheduler().config.shift == EMBEDDED_SHIFT
    assert (schedule_sigmas(10, shift=3.0)[1:-1] > sigmas[1:-1]).all(), "a shift > 1 spends more steps at high noise"
    with pytest.raises(ValueError, match="num_steps"):
        schedule_sigmas(0)


def test_rollout_shapes_and_groups(model):
    r = sample(model, PROMPTS, group_size=4, num_steps=5, seed=0)
    b = 12
    assert r.latents.shape == (6, b, 1, 8, 8) and r.log_probs.shape == (5, b)
    assert r.log_probs.dtype == torch.float32 and torch.isfinite(r.log_probs).all()
    assert r.images.shape == (b, 1, 8, 8) and r.images.min() >= 0 and r.images.max() <= 1
    assert r.prompts == [p for p in PROMPTS for _ in range(4)]
    assert r.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert r.sde_steps.all() and r.train_steps() == [0, 1, 2, 3, 4] and r.guidance is None
    assert torch.equal(r.sigmas, schedule_sigmas(5))
    assert torch.equal(r.images, model.decode(r.latents[-1]).clamp(0, 1))
    assert len(r.cond) == b and len(r.uncond) == b


def test_each_sample_gets_distinct_noise(model):
    r = sample(model, PROMPTS[:1], group_size=6, num_steps=3, seed=0)
    for t in range(4):
        flat = r.latents[t].flatten(1)
        assert torch.cdist(flat, flat)[~torch.eye(6, dtype=torch.bool)].min() > 1e-3, f"step {t}"


def test_seeded_determinism_and_batch_size_independence(model):
    a = sample(model, PROMPTS, group_size=2, num_steps=4, seed=7)
    b = sample(model, PROMPTS, group_size=2, num_steps=4, generator=torch.Generator().manual_seed(7))
    c = sample(model, PROMPTS, group_size=2, num_steps=4, seed=8)
    chunked = sample(model, PROMPTS, group_size=2, num_steps=4, seed=7, batch_size=4)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.allclose(a.latents[0], c.latents[0])
    torch.testing.assert_close(chunked.latents, a.latents, rtol=1e-5, atol=1e-5)


def test_reevaluation_ratio_is_exactly_one(model):
    r = sample(model, PROMPTS, group_size=4, num_steps=4, eta=0.7, seed=1)
    for step in r.train_steps():
        idx = torch.tensor([1, 5, 6, 11])
        out = step_log_prob(model, r, step, idx)
        assert out.log_prob.requires_grad
        ratio = torch.exp(out.log_prob - r.log_probs[step, idx])
        torch.testing.assert_close(out.log_prob.detach(), r.log_probs[step, idx], rtol=0, atol=1e-6)
        torch.testing.assert_close(ratio.detach(), torch.ones(4), rtol=0, atol=1e-6)
    step_log_prob(model, r, 0, slice(0, 4)).log_prob.mean().backward()
    assert model.transformer.proj_out.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_ratio_moves_when_weights_change(model):
    """The exact-ratio test above can fail: perturbed weights give a different log-prob."""
    r = sample(model, PROMPTS, group_size=2, num_steps=3, seed=2)
    other = EmbeddedFlowModel(TINY).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.transformer.proj_out.bias.add_(0.05)
    assert (step_log_prob(other, r, 1).log_prob - r.log_probs[1]).abs().max() > 1e-3


def test_sde_window(model):
    r = sample(model, PROMPTS, group_size=2, num_steps=6, sde_window=(2, 4), seed=3)
    assert r.sde_steps.tolist() == [False, False, True, True, False, False] and r.train_steps() == [2, 3]
    assert (r.log_probs[[0, 1, 4, 5]] == 0).all() and (r.log_probs[[2, 3]] != 0).all()
    # Outside the window the step is the deterministic (eta = 0) mean, whatever the noise.
    step, b = 4, r.batch_size
    with torch.no_grad():
        x, sigma = r.latents[step], r.sigmas[step].expand(b)
        v = model.velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), type(r.cond).cat([r.uncond, r.cond]))
        vu, vc = v.chunk(2)
        ode = guided_sde_step(x, vu, vc, r.guidance_scale, sigma, r.sigmas[step + 1].expand(b),
                              noise=torch.randn_like(x), eta=0.0, sigma_max=r.sigma_max)
    torch.testing.assert_close(r.latents[step + 1], ode.prev_sample, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="outside the SDE window"):
        step_log_prob(model, r, 0)
    with pytest.raises(ValueError, match="sde_window"):
        sample(model, PROMPTS, num_steps=4, sde_window=(3, 6))


def test_guidance_is_stored_and_reused(model):
    calls = []

    def push_apart(latents, sigma, v_cfg):
        # Gradient of the group's spread of x0-predictions w.r.t. the latents: needs grad enabled.
        x = latents.detach().requires_grad_()
        x0 = x - sigma.view(-1, 1, 1, 1) * v_cfg
        spread = (x0 - x0.mean(0, keepdim=True)).square().sum()
        calls.append(sigma[0].item())
        return torch.autograd.grad(spread, x)[0]

    plain = sample(model, PROMPTS, group_size=3, num_steps=4, seed=4)
    guided = sample(model, PROMPTS, group_size=3, num_steps=4, seed=4, guidance_fn=push_apart, guidance_weight=0.5)
    assert len(calls) == 4 and guided.guidance.shape == (4, 9, 1, 8, 8) and guided.guidance.abs().sum() > 0
    assert not torch.allclose(guided.latents[-1], plain.latents[-1])
    for step in guided.train_steps():
        # Rows 2..6 re-evaluated as a batch of 5 (sampled in a batch of 9): BLAS may round a row by its
        # batch, so equal up to float32 rounding (a few ulp of log-probs of about 6), not bit for bit.
        out = step_log_prob(model, guided, step, torch.arange(2, 7))
        torch.testing.assert_close(out.log_prob.detach(), guided.log_probs[step, 2:7], rtol=1e-6, atol=0)


def test_kl_against_reference_velocity(model):
    r = sample(model, PROMPTS, group_size=2, num_steps=3, seed=5)
    with torch.no_grad():
        v_same = guided_velocity(model, r, 1)
    assert step_log_prob(model, r, 1, v_ref=v_same).kl.abs().max() < 1e-6
    torch.manual_seed(1)  # the fixture's model was built right after seeding with 0
    other = EmbeddedFlowModel(TINY).eval()
    with torch.no_grad():
        v_other = guided_velocity(other, r, 1)
    assert (step_log_prob(model, r, 1, v_ref=v_other).kl > 0).all()


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="group_size"):
        sample(model, PROMPTS, group_size=0)
    with pytest.raises(ValueError, match="prompts"):
        sample(model, "a handwritten 3")
    with pytest.raises(ValueError, match="eta"):
        sample(model, PROMPTS, eta=-0.1)
    with pytest.raises(ValueError, match="unknown words"):
        sample(model, ["a handwritten cat"])
    r = sample(model, PROMPTS, num_steps=2, seed=0)
    with pytest.raises(ValueError, match="step"):
        step_log_prob(model, r, 2)
    with pytest.raises(ValueError, match="guidance_fn"):
        sample(model, PROMPTS, num_steps=2, guidance_fn=lambda x, s, v: x[:1], guidance_weight=0.1)
    with pytest.raises(ValueError, match="guidance_weight"):
        sample(model, PROMPTS, num_steps=2, guidance_fn=lambda x, s, v: x, guidance_weight=[0.1, 0.1, 0.1])


def test_cfg_one_skips_the_unconditional_forward(model, monkeypatch):
    """At guidance_scale 1 each step (sampling and re-evaluation) is one forward of the cond batch,
    and gives the samples of the two-forward [uncond; cond] path within fp32 tolerance."""
    import pec.sampling as sampling

    batches = []
    velocity = model.velocity

    def counting(x, sigma, prompts):
        batches.append(x.shape[0])
        return velocity(x, sigma, prompts)

    monkeypatch.setattr(model, "velocity", counting)
    fast = sample(model, PROMPTS, group_size=4, num_steps=4, guidance_scale=1.0, seed=9)
    assert batches == [12] * 4, "one forward of the 12 cond rows per step"
    batches.clear()
    with torch.no_grad():
        v = guided_velocity(model, fast, 2)
    out = step_log_prob(model, fast, 2)
    assert batches == [12, 12], "re-evaluation: one forward per call too"
    assert torch.equal(out.log_prob.detach(), fast.log_probs[2]), "same code path and shapes: ratio exactly 1"
    assert step_log_prob(model, fast, 2, v_ref=v).kl.abs().max() == 0

    monkeypatch.setattr(sampling, "skips_uncond", lambda scale: False)  # the former [uncond; cond] path
    batches.clear()
    full = sample(model, PROMPTS, group_size=4, num_steps=4, guidance_scale=1.0, seed=9)
    assert batches == [24] * 4
    torch.testing.assert_close(fast.latents, full.latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.log_probs, full.log_probs, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fast.images, full.images, rtol=1e-5, atol=1e-5)

    monkeypatch.undo()
    batches.clear()
    monkeypatch.setattr(model, "velocity", counting)
    sample(model, PROMPTS, group_size=4, num_steps=2, guidance_scale=2.0, seed=9)
    assert batches == [24] * 2, "real CFG still makes the batched [uncond; cond] forward"


class _TwoExperts(EmbeddedFlowModel):
    """The embedded model as a two-expert model (as Wan2.2): expert 1 below sigma 0.5, with CFG scale 3; the
    velocity of expert 1 is the network's halved, so the two experts differ."""

    def __init__(self, base):
        super().__init__(TINY)
        self.load_state_dict(base.state_dict())
        self.active, self.calls = 0, []

    def expert_at(self, sigma):
        return int(sigma < 0.5)

    def use_expert(self, index):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            previous, self.active = self.active, index
            try:
                yield
            finally:
                self.active = previous
        return ctx()

    def expert_guidance_scale(self, index, guidance_scale):
        return 3.0 if index == 1 else guidance_scale

    def velocity(self, latents, sigma, prompts):
        self.calls.append(self.active)
        v = super().velocity(latents, sigma, prompts)
        return v * 0.5 if self.active == 1 else v


def test_experts_are_chosen_per_step_on_the_host_and_reevaluation_uses_them(model):
    two = _TwoExperts(model).eval()
    r = sample(two, PROMPTS, group_size=2, num_steps=4, guidance_scale=2.0, seed=3)
    sig = schedule_sigmas(4)
    expected = [int(float(s) < 0.5) for s in sig[:-1]]
    assert r.step_expert == expected and r.step_guidance == [3.0 if e else 2.0 for e in expected]
    assert set(expected) == {0, 1}
    assert two.calls == expected  # one batched CFG forward per step, each under its step's expert
    for step in r.train_steps():
        out = step_log_prob(two, r, step)
        assert torch.equal(out.log_prob.detach(), r.log_probs[step])  # same expert and scale: exactly 1


def test_dpm2_solver_steps_the_ode_steps_with_dpm_solver_pp(model):
    from pec_kernels import dpm_solver_step

    r = sample(model, PROMPTS, group_size=2, num_steps=4, guidance_scale=1.0, eta=0.0, seed=5, solver="dpm2")
    assert not r.sde_steps.any() and torch.equal(r.log_probs, torch.zeros_like(r.log_probs))
    sig, x, x0_prev = schedule_sigmas(4), r.latents[0], None
    cond = model.encode_prompts([p for p in PROMPTS for _ in range(2)])
    with torch.no_grad():
        for t in range(4):
            v = model.velocity(x, sig[t].expand(x.shape[0]), cond)
            x0 = x - sig[t] * v
            x = dpm_solver_step(x, x0, x0_prev, float(sig[t - 1]) if t else None, float(sig[t]), float(sig[t + 1]),
                                order=1 if t == 0 else 2)
            x0_prev = x0
            torch.testing.assert_close(r.latents[t + 1], x, rtol=1e-6, atol=1e-6)
    euler = sample(model, PROMPTS, group_size=2, num_steps=4, guidance_scale=1.0, eta=0.0, seed=5)
    assert not torch.allclose(euler.latents[-1], r.latents[-1])  # second order differs from Euler
    with pytest.raises(ValueError, match="solver"):
        sample(model, PROMPTS, num_steps=2, solver="rk4")


def test_recorded_means_are_the_steps_means(model):
    r = sample(model, PROMPTS, group_size=2, num_steps=3, seed=6, record_means=True)
    assert r.means.shape == r.latents[1:].shape
    for step in r.train_steps():
        out = step_log_prob(model, r, step, return_mean=True)
        assert torch.equal(out.mean.detach(), r.means[step])


def test_a_model_with_cfg_renorm_samples_and_reevaluates_with_it(model):
    from pec_kernels import cfg_velocity

    renorm = EmbeddedFlowModel(TINY)
    renorm.load_state_dict(model.state_dict())
    renorm.eval().cfg_renorm = True
    plain = sample(model, PROMPTS, group_size=2, num_steps=3, guidance_scale=3.0, seed=7)
    r = sample(renorm, PROMPTS, group_size=2, num_steps=3, guidance_scale=3.0, seed=7)
    assert not torch.allclose(r.latents[-1], plain.latents[-1])
    for step in r.train_steps():
        assert torch.equal(step_log_prob(renorm, r, step).log_prob.detach(), r.log_probs[step])
    cond = renorm.encode_prompts([p for p in PROMPTS for _ in range(2)])
    uncond = renorm.encode_prompts([""] * 6)
    with torch.no_grad():
        sigma = r.sigmas[1].expand(6)
        v_u, v_c = renorm.velocity(r.latents[1], sigma, uncond), renorm.velocity(r.latents[1], sigma, cond)
        torch.testing.assert_close(guided_velocity(renorm, r, 1), cfg_velocity(v_u, v_c, 3.0, cfg_renorm=True))
