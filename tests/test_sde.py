"""CPU tests of sde_step_logprob / guided_sde_step / step_sigmas (torch backend, Triton via its interpreter).

The float64 reference below is written straight from DESIGN.md §2.1, independently of
pec_kernels.sde.coefficients (which rewrites the same formulas as per-sample affine coefficients).
"""
from __future__ import annotations

import math

import pytest
import torch

from pec_kernels.sde import guided_sde_step, sde_step_logprob, step_sigmas

KINDS = ("flow", "dance", "cps")
SIGMA = [1.0, 0.73, 0.31, 0.05, 0.5]
SIGMA_NEXT = [0.9, 0.6, 0.2, 0.0, 0.5]  # σ' = 0 ends a schedule; σ' = σ is a deterministic step
SIGMA_MAX = 0.95
needs_interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="Triton interpreter tests run on CPU only")


def reference_step(kind, x, v, sigma, sigma_next, eta, sigma_max, *, noise=None, prev=None, v_ref=None,
                   reduce="mean"):
    """float64 reference of one step (DESIGN.md §2.1), with autograd; returns (prev, log_prob, mean, std, kl).

    A deterministic step (std = 0) gives prev = mean and log_prob = kl = 0, the documented convention.
    """
    shape = (-1,) + (1,) * (x.dim() - 1)
    s, sn = sigma.view(shape), sigma_next.view(shape)
    dt = sn - s

    def mean_and_std(vel):
        if kind == "flow":
            denominator_sigma = torch.where(s == 1, torch.full_like(s, sigma_max), s)
            std_t = eta * torch.sqrt(s / (1 - denominator_sigma))
            mean = x * (1 + std_t ** 2 / (2 * s) * dt) + vel * (1 + std_t ** 2 * (1 - s) / (2 * s)) * dt
            return mean, std_t * torch.sqrt(-dt)
        if kind == "dance":
            x0 = x - s * vel
            score = -(x - (1 - s) * x0) / s ** 2
            return x + dt * vel - 0.5 * eta ** 2 * score * dt, eta * torch.sqrt(-dt) * torch.ones_like(s)
        std = sn * math.sin(eta * math.pi / 2)
        x0, x1 = x - s * vel, x + (1 - s) * vel
        return x0 * (1 - sn) + x1 * torch.sqrt(sn ** 2 - std ** 2), std * torch.ones_like(s)

    mean, std = mean_and_std(v)
    stochastic = std > 0
    safe_std = torch.where(stochastic, std, torch.ones_like(std))
    if prev is None:
        prev = mean + std * noise
    r = prev.detach() - mean
    lp = -r ** 2 / (2 * safe_std ** 2) - torch.log(safe_std) - 0.5 * math.log(2 * math.pi)
    lp = torch.where(stochastic, lp, torch.zeros_like(lp))
    red = (lambda t: t.flatten(1).mean(1)) if reduce == "mean" else (lambda t: t.flatten(1).sum(1))
    kl = None
    if v_ref is not None:
        mean_ref, _ = mean_and_std(v_ref)
        kl = red(torch.where(stochastic, (mean - mean_ref) ** 2 / (2 * safe_std ** 2), torch.zeros_like(mean)))
    return prev, red(lp), mean, std.flatten(), kl


def make_inputs(shape, dtype=torch.float32, noncontiguous=False):
    """Random latents with duplicated rows (sample 1 = sample 0), optionally as non-contiguous views."""
    def make():
        if noncontiguous:  # a transposed view of a larger buffer
            t = torch.randn(shape[0], *reversed(shape[1:]), dtype=torch.float64).transpose(1, -1)
            assert not t.is_contiguous()
        else:
            t = torch.randn(shape, dtype=torch.float64)
        t[1] = t[0]
        return t.to(dtype)
    return {name: make() for name in ("x", "v", "noise", "v_ref", "v_uncond", "v_cond", "guidance")}


def schedule(batch, dtype=torch.float32):
    return torch.tensor(SIGMA[:batch], dtype=dtype), torch.tensor(SIGMA_NEXT[:batch], dtype=dtype)


@pytest.fixture
def poisoned(monkeypatch):
    """Every float tensor allocated by torch.empty / empty_like starts as NaN, so an unwritten output fails."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_filled(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan_filled(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan_filled(real_empty_like(*a, **k)))


def assert_close(actual, expected, rtol, atol, name):
    assert actual is not None and expected is not None, name
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def backend_params():
    return [pytest.param("torch"), pytest.param("triton", marks=needs_interpreter)]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(5, 3, 7, 5), (4, 11, 3)], ids=["BCHW", "BLC"])
@pytest.mark.parametrize("rollout", [True, False], ids=["rollout", "reeval"])
def test_matches_float64_reference(poisoned, backend, kind, shape, rollout):
    inp = make_inputs(shape, noncontiguous=shape[0] == 5)
    sigma, sigma_next = schedule(shape[0])
    eta = 0.8
    d = {k: t.double() for k, t in inp.items()}
    ref_prev = reference_step(kind, d["x"], d["v"], sigma.double(), sigma_next.double(), eta, SIGMA_MAX,
                              noise=d["noise"])[0].float()
    kwargs = dict(noise=inp["noise"]) if rollout else dict(prev_sample=ref_prev)
    out = sde_step_logprob(inp["x"], inp["v"], sigma, sigma_next, eta=eta, kind=kind, sigma_max=SIGMA_MAX,
                           v_ref=inp["v_ref"], backend=backend, return_mean=True, **kwargs)
    # The log-prob is defined against x' as returned (rounded to x's dtype): score the reference there.
    prev, lp, mean, std, kl = reference_step(kind, d["x"], d["v"], sigma.double(), sigma_next.double(), eta,
                                             SIGMA_MAX, prev=out.prev_sample.double(), v_ref=d["v_ref"])
    assert out.prev_sample.shape == shape and out.mean.shape == shape and out.prev_sample.dtype == torch.float32
    assert out.log_prob.shape == (shape[0],) and out.log_prob.dtype == torch.float32
    assert_close(out.prev_sample, ref_prev, 1e-5, 1e-5, "prev_sample")
    assert_close(out.mean, mean, 1e-5, 1e-5, "mean")
    assert_close(out.std, std, 1e-6, 1e-7, "std")
    assert_close(out.log_prob, lp, 1e-5, 1e-4, "log_prob")
    assert_close(out.kl, kl, 1e-5, 1e-5, "kl")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("with_guidance", [False, True])
def test_guided_matches_reference(poisoned, backend, with_guidance):
    shape = (5, 2, 9, 3)
    inp = make_inputs(shape)
    sigma, sigma_next = schedule(5)
    scale = torch.tensor([4.5, 1.0, 0.0, 7.0, 2.5])
    d = {k: t.double() for k, t in inp.items()}
    v = d["v_uncond"] + scale.double().view(-1, 1, 1, 1) * (d["v_cond"] - d["v_uncond"])
    extra = {}
    if with_guidance:
        v = v + 0.3 * d["guidance"]
        extra = dict(guidance=inp["guidance"], guidance_weight=0.3)
    out = guided_sde_step(inp["x"], inp["v_uncond"], inp["v_cond"], scale, sigma, sigma_next, noise=inp["noise"],
                          sigma_max=SIGMA_MAX, v_ref=inp["v_ref"], backend=backend, return_mean=True, **extra)
    prev, lp, mean, std, kl = reference_step("flow", d["x"], v, sigma.double(), sigma_next.double(), 0.7, SIGMA_MAX,
                                             prev=out.prev_sample.double(), v_ref=d["v_ref"])
    ref_prev = reference_step("flow", d["x"], v, sigma.double(), sigma_next.double(), 0.7, SIGMA_MAX,
                              noise=d["noise"])[0]
    assert_close(out.prev_sample, ref_prev, 1e-5, 1e-5, "prev_sample")
    assert_close(out.mean, mean, 1e-5, 1e-5, "mean")
    assert_close(out.log_prob, lp, 1e-5, 1e-4, "log_prob")
    assert_close(out.kl, kl, 1e-5, 1e-5, "kl")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_inputs_use_float32_math(dtype, kind):
    """Low-precision inputs against a float64 reference on the same (rounded) inputs. Tolerances:
    mean/prev are rounded once to the input dtype (2^-8 relative for bf16, 2^-11 for fp16); log_prob
    and kl come from fp32 math on those values, so they match the reference to fp32 accuracy."""
    shape = (5, 4, 6, 6)
    inp = make_inputs(shape, dtype=dtype)
    sigma, sigma_next = schedule(5)
    out = sde_step_logprob(inp["x"], inp["v"], sigma, sigma_next, noise=inp["noise"], kind=kind, sigma_max=SIGMA_MAX,
                           v_ref=inp["v_ref"], backend="torch", return_mean=True)
    d = {k: t.double() for k, t in inp.items()}
    prev, lp, mean, std, kl = reference_step(kind, d["x"], d["v"], sigma.double(), sigma_next.double(), 0.7,
                                             SIGMA_MAX, prev=out.prev_sample.double(), v_ref=d["v_ref"])
    rel = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11
    assert out.prev_sample.dtype == dtype and out.mean.dtype == dtype and out.log_prob.dtype == torch.float32
    assert_close(out.mean, mean, rel, 1e-3, "mean")
    assert_close(out.log_prob, lp, 1e-4, 1e-3, "log_prob")
    assert_close(out.kl, kl, 1e-4, 1e-4, "kl")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("guided", [False, True])
def test_rollout_logprob_equals_reevaluation(backend, dtype, guided):
    """The on-policy ratio is exactly 1 by construction: the rollout scores x' as rounded to the output
    dtype, which is what re-evaluation sees, through the same deterministic reduction. Bound: bit-identical
    within one backend (asserted here); across backends the log-probs agree to ~1e-6 relative in fp32."""
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the interpreter runs fp32 only; bf16 Triton is covered by the GPU tests")
    shape = (5, 3, 8, 8)
    inp = make_inputs(shape, dtype=dtype)
    sigma, sigma_next = schedule(5)
    for kind in KINDS:
        if guided:
            def step(**kw):
                return guided_sde_step(inp["x"], inp["v_uncond"], inp["v_cond"], 4.5, sigma, sigma_next, kind=kind,
                                       guidance=inp["guidance"], guidance_weight=0.2, backend=backend,
                                       return_mean=True, **kw)
        else:
            def step(**kw):
                return sde_step_logprob(inp["x"], inp["v"], sigma, sigma_next, kind=kind, sigma_max=SIGMA_MAX,
                                        backend=backend, return_mean=True, **kw)
        rolled = step(noise=inp["noise"])
        again = step(prev_sample=rolled.prev_sample)
        assert torch.isfinite(rolled.log_prob).all()
        assert torch.equal(rolled.log_prob, again.log_prob), (kind, rolled.log_prob - again.log_prob)
        assert torch.equal(rolled.mean, again.mean)


def test_reduce_sum_is_mean_times_count():
    inp = make_inputs((5, 3, 4, 5))
    sigma, sigma_next = schedule(5)
    kw = dict(noise=inp["noise"], v_ref=inp["v_ref"], backend="torch")
    mean = sde_step_logprob(inp["x"], inp["v"], sigma, sigma_next, **kw)
    total = sde_step_logprob(inp["x"], inp["v"], sigma, sigma_next, reduce="sum", **kw)
    torch.testing.assert_close(total.log_prob, mean.log_prob * 60, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(total.kl, mean.kl * 60, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params())
def test_float_sigmas_equal_tensor_sigmas(backend):
    """Floats, 0-d tensors and (B,) tensors reach the kernels by different paths (value, stride 0, stride 1)."""
    inp = make_inputs((3, 4, 5))
    a = sde_step_logprob(inp["x"], inp["v"], 0.6, 0.45, noise=inp["noise"], eta=0.9, kind="dance", backend=backend)
    b = sde_step_logprob(inp["x"], inp["v"], torch.full((3,), 0.6), torch.tensor(0.45), noise=inp["noise"],
                         eta=0.9, kind="dance", backend=backend)
    assert torch.equal(a.log_prob, b.log_prob) and torch.equal(a.prev_sample, b.prev_sample)
    assert torch.isfinite(a.log_prob).all() and (a.log_prob != 0).all()


def _grad_inputs(shape, guided):
    g = torch.Generator().manual_seed(1)
    names = ("x", "v_uncond", "v_cond", "guidance") if guided else ("x", "v")
    t = {n: torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True) for n in names}
    t.update({n: torch.randn(shape, dtype=torch.float64, generator=g) for n in ("noise", "v_ref")})
    return t


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rollout", [True, False], ids=["rollout", "reeval"])
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
def test_gradcheck_torch_backend(kind, rollout, guided):
    """Analytic backward against finite differences: log_prob, kl and mean in re-evaluation; kl, mean and
    prev_sample in rollout, where log_prob deliberately treats x' as data (its gradient is the
    re-evaluation one, checked in test_rollout_logprob_gradient_is_reevaluation_gradient)."""
    shape = (4, 2, 3)
    t = _grad_inputs(shape, guided)
    sigma, sigma_next = (s.double() for s in schedule(4))
    prev = torch.randn(shape, dtype=torch.float64)

    def fn(*args):
        tensors = dict(zip(names, args))
        target = dict(noise=t["noise"]) if rollout else dict(prev_sample=prev)
        common = dict(kind=kind, sigma_max=SIGMA_MAX, v_ref=t["v_ref"], backend="torch", return_mean=True, **target)
        if guided:
            out = guided_sde_step(tensors["x"], tensors["v_uncond"], tensors["v_cond"], 3.0, sigma, sigma_next,
                                  guidance=tensors["guidance"], guidance_weight=0.5, **common)
        else:
            out = sde_step_logprob(tensors["x"], tensors["v"], sigma, sigma_next, **common)
        return (out.kl, out.mean, out.prev_sample) if rollout else (out.log_prob, out.kl, out.mean)

    names = [n for n in t if t[n].requires_grad]
    assert torch.autograd.gradcheck(fn, tuple(t[n] for n in names), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params())
def test_rollout_logprob_gradient_is_reevaluation_gradient(backend):
    inp = make_inputs((3, 4, 5))
    grads = []
    for rollout in (True, False):
        x, v = inp["x"].clone().requires_grad_(), inp["v"].clone().requires_grad_()
        target = dict(noise=inp["noise"]) if rollout else dict(prev_sample=grads[0][2])
        out = sde_step_logprob(x, v, 0.7, 0.6, backend=backend, **target)
        out.log_prob.sum().backward()
        grads.append((x.grad, v.grad, out.prev_sample.detach()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert grads[0][1].abs().sum() > 0


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
def test_gradients_match_reference_autograd(backend, kind, guided):
    """fp32 gradients (random upstream weights on log_prob, kl and mean) against autograd through the
    independent float64 reference, in re-evaluation mode (the training path)."""
    shape = (5, 3, 5, 4)
    inp = make_inputs(shape)
    sigma, sigma_next = schedule(5)
    prev = inp["noise"]
    w_lp, w_kl, w_mean = torch.randn(5), torch.randn(5), torch.randn(shape)
    names = ("x", "v_uncond", "v_cond", "guidance") if guided else ("x", "v")
    ours = {n: inp[n].clone().requires_grad_() for n in names}
    ref = {n: inp[n].double().requires_grad_() for n in names}
    common = dict(prev_sample=prev, kind=kind, sigma_max=SIGMA_MAX, v_ref=inp["v_ref"], backend=backend,
                  return_mean=True)
    if guided:
        out = guided_sde_step(ours["x"], ours["v_uncond"], ours["v_cond"], 2.0, sigma, sigma_next,
                              guidance=ours["guidance"], guidance_weight=0.5, **common)
        v_ref64 = ref["v_uncond"] + 2.0 * (ref["v_cond"] - ref["v_uncond"]) + 0.5 * ref["guidance"]
    else:
        out = sde_step_logprob(ours["x"], ours["v"], sigma, sigma_next, **common)
        v_ref64 = ref["v"]
    _, lp, mean, _, kl = reference_step(kind, ref["x"], v_ref64, sigma.double(), sigma_next.double(), 0.7, SIGMA_MAX,
                                        prev=prev.double(), v_ref=inp["v_ref"].double())
    ((out.log_prob * w_lp).sum() + (out.kl * w_kl).sum() + (out.mean * w_mean).sum()).backward()
    ((lp * w_lp.double()).sum() + (kl * w_kl.double()).sum() + (mean * w_mean.double()).sum()).backward()
    for n in names:
        assert_close(ours[n].grad, ref[n].grad, 1e-4, 1e-5, f"grad {n}")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_step_is_finite(backend, kind):
    """η = 0 (and σ' = σ, cps at σ' = 0): x' = μ, log_prob = kl = 0, finite gradients, no NaN anywhere."""
    shape = (5, 2, 4, 3)
    inp = make_inputs(shape)
    sigma, sigma_next = schedule(5)
    x, v = inp["x"].requires_grad_(), inp["v"].requires_grad_()
    for rollout in (True, False):
        target = dict(noise=inp["noise"]) if rollout else dict(prev_sample=inp["noise"])
        out = sde_step_logprob(x, v, sigma, sigma_next, eta=0.0, kind=kind, v_ref=inp["v_ref"], backend=backend,
                               return_mean=True, **target)
        assert torch.equal(out.log_prob, torch.zeros(5)) and torch.equal(out.kl, torch.zeros(5))
        assert torch.equal(out.std, torch.zeros(5))
        if rollout:
            assert torch.equal(out.prev_sample, out.mean)
        (out.log_prob.sum() + out.kl.sum() + out.mean.sum()).backward()
        assert torch.isfinite(x.grad).all() and torch.isfinite(v.grad).all()
        x.grad = v.grad = None


def test_flow_at_sigma_one_without_sigma_max_is_finite():
    """sigma_max=None: σ' stands in for σ in 1 − σ at σ = 1 (Flow-GRPO's sigmas[1] on the first step)."""
    inp = make_inputs((2, 3, 4))
    default = sde_step_logprob(inp["x"], inp["v"], 1.0, 0.9, noise=inp["noise"])
    explicit = sde_step_logprob(inp["x"], inp["v"], 1.0, 0.9, noise=inp["noise"], sigma_max=0.9)
    assert torch.isfinite(default.log_prob).all()
    assert torch.equal(default.log_prob, explicit.log_prob) and torch.equal(default.std, explicit.std)


class _Scheduler:
    def __init__(self, sigmas):
        self.sigmas = sigmas


def test_step_sigmas_matches_diffusers_lookup():
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    step_index = torch.tensor([0, 3, 9, 3, 5])
    out = step_sigmas(scheduler, step_index)
    timesteps = scheduler.timesteps[step_index]
    looked_up = [scheduler.index_for_timestep(t) for t in timesteps]  # Flow-GRPO's per-sample loop
    assert torch.equal(out.sigma, scheduler.sigmas[looked_up])
    assert torch.equal(out.sigma_next, scheduler.sigmas[[i + 1 for i in looked_up]])
    assert float(out.sigma_max) == float(scheduler.sigmas[1])  # Flow-GRPO's sigma_max
    assert torch.equal(step_sigmas(scheduler.sigmas, step_index).sigma, out.sigma)


def test_step_sigmas_duck_typed_and_scalar_index():
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.0])
    out = step_sigmas(_Scheduler(sigmas), 1)
    assert out.sigma.dim() == 0
    assert torch.equal(out.sigma, sigmas[1]) and torch.equal(out.sigma_next, sigmas[2])
    assert torch.equal(out.sigma_max, sigmas[1])


@pytest.mark.parametrize("call, match", [
    (lambda i: sde_step_logprob(i["x"], i["v"], 0.5, 0.4), "exactly one of noise"),
    (lambda i: sde_step_logprob(i["x"], i["v"], 0.5, 0.4, noise=i["noise"], prev_sample=i["noise"]), "both"),
    (lambda i: sde_step_logprob(i["x"], i["v"], torch.ones(3), 0.4, noise=i["noise"]), "sigma must have shape"),
    (lambda i: sde_step_logprob(i["x"], i["v"], 0.5, torch.ones(2, 2), noise=i["noise"]), "sigma_next must have"),
    (lambda i: sde_step_logprob(i["x"], i["v"][:, :1], 0.5, 0.4, noise=i["noise"]), "v must have the shape"),
    (lambda i: sde_step_logprob(i["x"], i["v"], 0.5, 0.4, noise=i["noise"][0]), "noise must have the shape"),
    (lambda i: sde_step_logprob(i["x"], i["v"], 0.5, 0.4, noise=i["noise"], v_ref=i["v"][:1]), "v_ref must have"),
    (lambda i: sde_step_logprob(i["x"], i["v"], 0.5, 0.4, noise=i["noise"], kind="ddim"), "kind must be one of"),
    (lambda i: sde_step_logprob(i["x"], i["v"], 0.5, 0.4, noise=i["noise"], reduce="max"), "reduce must be one of"),
    (lambda i: sde_step_logprob(i["x"], i["v"], 0.5, 0.4, noise=i["noise"], backend="cpu"), "backend must be one of"),
    (lambda i: sde_step_logprob(i["x"].long(), i["v"], 0.5, 0.4, noise=i["noise"]), "x must have dtype"),
    (lambda i: sde_step_logprob(i["x"], i["v"].int(), 0.5, 0.4, noise=i["noise"]), "v must have dtype"),
    (lambda i: sde_step_logprob(i["x"], i["v"], torch.ones(4, dtype=torch.long), 0.4, noise=i["noise"]),
     "sigma must have a floating-point dtype"),
    (lambda i: sde_step_logprob(i["x"][:, 0, 0, 0], i["v"][:, 0, 0, 0], 0.5, 0.4, noise=i["noise"][:, 0, 0, 0]),
     "x must have a batch dimension"),
    (lambda i: sde_step_logprob(i["x"], i["v"], 0.5, 0.4, noise=i["noise"], sigma_max="0.9"), "sigma_max must be"),
    (lambda i: sde_step_logprob(i["x"], i["v"], 0.5, 0.4, noise=i["noise"], eta=torch.ones(4)), "eta must be a float"),
    (lambda i: sde_step_logprob(i["x"], i["v"], torch.ones(4, requires_grad=True), 0.4, noise=i["noise"]),
     "sigma is not differentiable"),
    (lambda i: sde_step_logprob(i["x"], i["v"], 0.5, 0.4, prev_sample=i["noise"].requires_grad_()),
     "prev_sample is treated as data"),
    (lambda i: guided_sde_step(i["x"], i["v"], i["v"][..., :2], 4.5, 0.5, 0.4, noise=i["noise"]),
     "v_cond must have the shape"),
    (lambda i: guided_sde_step(i["x"], i["v"], i["v"], torch.ones(5), 0.5, 0.4, noise=i["noise"]),
     "guidance_scale must have shape"),
    (lambda i: sde_step_logprob(i["x"], i["v"], 0.5, 0.4, noise=i["noise"], backend="cuda"), "backend='cuda' needs"),
])
def test_bad_input_raises_value_error(call, match):
    inp = make_inputs((4, 2, 3, 3))
    with pytest.raises(ValueError, match=match):
        call(inp)


def test_mismatched_devices_raise():
    inp = make_inputs((2, 3, 4))
    meta = torch.randn(2, 3, 4, device="meta")
    with pytest.raises(ValueError, match="is on meta but x is on cpu"):
        sde_step_logprob(inp["x"], meta, 0.5, 0.4, noise=inp["noise"])
    with pytest.raises(ValueError, match="sigma is on meta but x is on cpu"):
        sde_step_logprob(inp["x"], inp["v"], torch.ones(2, device="meta"), 0.4, noise=inp["noise"])


def test_step_sigmas_bad_input():
    with pytest.raises(ValueError, match="scheduler_or_sigmas must be"):
        step_sigmas([1.0, 0.5], torch.tensor([0]))
    with pytest.raises(ValueError, match="1-D floating-point"):
        step_sigmas(torch.ones(2, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="integer dtype"):
        step_sigmas(torch.ones(3), torch.tensor([0.0]))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("rollout", [True, False], ids=["rollout", "reeval"])
def test_mean_only_on_request(backend, rollout):
    """return_mean=False (the default) returns mean=None and leaves every other output bit-identical."""
    inp = make_inputs((3, 2, 5, 4))
    sigma, sigma_next = schedule(3)
    target = dict(noise=inp["noise"]) if rollout else dict(prev_sample=inp["noise"])
    outs = [sde_step_logprob(inp["x"], inp["v"], sigma, sigma_next, v_ref=inp["v_ref"], backend=backend,
                             return_mean=want, **target) for want in (False, True)]
    assert outs[0].mean is None and outs[1].mean is not None
    for a, b in zip(outs[0], outs[1]):
        if a is not None and b is not None:
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="return_mean must be a bool"):
        sde_step_logprob(inp["x"], inp["v"], 0.5, 0.4, backend=backend, return_mean=1, **target)


@needs_interpreter
@pytest.mark.parametrize("rollout", [True, False], ids=["rollout", "reeval"])
def test_triton_writes_mean_only_on_request(monkeypatch, rollout):
    """The Triton forward allocates (and so writes) a latent-sized μ only with return_mean=True."""
    # Loaded before torch.empty_like is patched, so that only the op's own allocations are counted.
    from pec_kernels.sde import triton_backend  # noqa: F401

    inp = make_inputs((3, 2, 5, 4))
    target = dict(noise=inp["noise"]) if rollout else dict(prev_sample=inp["noise"])
    real_empty_like = torch.empty_like
    for want in (False, True):
        latent_allocations = []

        def counting(t, *args, **kwargs):
            latent_allocations.append(t.numel() == inp["x"].numel())
            return real_empty_like(t, *args, **kwargs)

        monkeypatch.setattr(torch, "empty_like", counting)
        with torch.no_grad():
            sde_step_logprob(inp["x"], inp["v"], 0.7, 0.5, backend="triton", return_mean=want, **target)
        monkeypatch.setattr(torch, "empty_like", real_empty_like)
        assert sum(latent_allocations) == int(rollout) + int(want)


@needs_interpreter
def test_triton_grid_is_flat_so_any_batch_launches(monkeypatch):
    """The (sample, chunk) grid lives on axis 0 (up to 2^31 - 1 programs; axes 1 and 2 stop at 65,535),
    and a launch beyond that limit is refused with a ValueError saying to split the batch."""
    from pec_kernels.sde import triton_backend

    grids = []
    for name in ("_sde_forward_kernel", "_sde_backward_kernel"):
        kernel = getattr(triton_backend, name)

        class Recording:
            def __init__(self, kernel):
                self.kernel = kernel

            def __getitem__(self, grid):
                grids.append(grid)
                return self.kernel[grid]

        monkeypatch.setattr(triton_backend, name, Recording(kernel))
    inp = make_inputs((3, 2, 16, 16))  # 512 elements per sample: 2 chunks of 256 under the interpreter
    v = inp["v"].requires_grad_()
    out = sde_step_logprob(inp["x"], v, 0.7, 0.5, prev_sample=inp["noise"], backend="triton")
    out.log_prob.sum().backward()
    assert grids == [(6,), (6,)]
    monkeypatch.setattr(triton_backend, "MAX_PROGRAMS", 5)
    with pytest.raises(ValueError, match="split the batch"):
        sde_step_logprob(inp["x"], inp["v"], 0.7, 0.5, prev_sample=inp["noise"], backend="triton")
