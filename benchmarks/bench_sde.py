"""SDE-step benchmarks (issue 3): our fused ops against Flow-GRPO's eager formula, torch.compile and the floor.

Cases, bf16 latents at 16x16x128x128 and 64x16x64x64:
  logprob: sde_step_logprob re-evaluation (the training path), forward + backward w.r.t. v;
  guided:  guided_sde_step rollout (CFG 4.5 + SDE step + log-prob), forward only, as in sampling.
"ours" is the fastest of backend="cuda" / "triton" (σ looked up on the device with step_sigmas, inside
the timed call). Anchors, written in this file after notes/peers.md §1.1 and notes/kernels.md §3:
  eager:   Flow-GRPO's sde_step_with_logprob: fp32 upcasts, then per-sample σ by index_for_timestep
           (nonzero() + .item() per sample), timed including that lookup;
  compile: torch.compile of the same formula (dynamic=False, no CUDA graphs), σ given as per-sample
           tensors (it cannot compile the lookup loop, which would graph-break);
  floor:   the bytes the op must move (reads + writes of latent-sized tensors; ours no longer writes μ,
           return_mean=False) over the device-to-device copy rate measured in this run.
Targets: ours <= 1.5x floor, >= 10x faster than eager (with lookup), >= 1.3x faster than compile,
and zero host synchronisations (checked with torch.cuda.set_sync_debug_mode("error")).
Run: `pytest benchmarks/bench_sde.py --benchmark-only -s`; PEC_BENCH_COMPILE=0 skips torch.compile.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from _timing import Measurement, copy_bandwidth_bytes_per_s, cpu_time_ms, measure, ratio, run_benchmark
from pec_kernels.sde import guided_sde_step, sde_step_logprob, step_sigmas
from pec_kernels.sde.backends import resolve

COMPILE = os.environ.get("PEC_BENCH_COMPILE", "1") != "0"
TARGETS = dict(floor="<= 1.5x", eager=">= 10x", compile=">= 1.3x")
SHAPES = [(16, 16, 128, 128), (64, 16, 64, 64)]
ETA, CFG = 0.7, 4.5
# Latent-sized bytes per element, bf16: log-prob fwd reads x, v, x' (6) + bwd reads them again and
# writes dv (8); guided rollout reads x, v_u, v_c, ε and writes x' (10).
FLOOR_BYTES_PER_ELEMENT = {"logprob": 14, "guided": 10}


# ------------------------------------------------------------------------------ Flow-GRPO anchors

class FlowSchedule:
    """A 10-step shifted flow-matching schedule laid out as diffusers' FlowMatchEulerDiscreteScheduler:
    timesteps = 1000·σ on the device, sigmas (with the terminal 0) on the CPU."""

    def __init__(self, steps: int = 10, shift: float = 3.0, device: str = "cuda"):
        s = torch.linspace(1.0, 1.0 / steps, steps)
        s = shift * s / (1 + (shift - 1) * s)
        self.sigmas = torch.cat([s, torch.zeros(1)])
        self.timesteps = (s * 1000).to(device)

    def index_for_timestep(self, timestep: torch.Tensor) -> int:
        """diffusers' lookup: nonzero() on the device, then .item() (two host synchronisations)."""
        indices = (self.timesteps == timestep).nonzero()
        return indices[1 if len(indices) > 1 else 0].item()


def flow_grpo_formula(x, v, sigma, sigma_prev, sigma_max, prev_sample=None, noise=None):
    """Flow-GRPO's `sde` branch on per-sample (B, 1, ...) sigmas, fp32 (returns x', log_prob, mean, std)."""
    x, v = x.float(), v.float()
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * ETA
    mean = x * (1 + std_dev_t ** 2 / (2 * sigma) * dt) + v * (1 + std_dev_t ** 2 * (1 - sigma) / (2 * sigma)) * dt
    if prev_sample is None:
        prev_sample = mean + std_dev_t * torch.sqrt(-dt) * noise.float()
    prev_sample = prev_sample.float()
    log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * (std_dev_t * torch.sqrt(-dt)) ** 2)
                - torch.log(std_dev_t * torch.sqrt(-dt)) - math.log(math.sqrt(2 * math.pi)))
    return prev_sample, log_prob.mean(dim=tuple(range(1, x.dim()))), mean, std_dev_t


def flow_grpo_eager(schedule: FlowSchedule, x, v, timesteps, prev_sample=None, noise=None):
    """sde_step_with_logprob as Flow-GRPO runs it: the per-sample timestep lookup loop, then the formula."""
    step_index = [schedule.index_for_timestep(t) for t in timesteps]
    shape = (-1,) + (1,) * (x.dim() - 1)
    sigma = schedule.sigmas[step_index].view(shape).to(x.device)
    sigma_prev = schedule.sigmas[[i + 1 for i in step_index]].view(shape).to(x.device)
    sigma_max = schedule.sigmas[1].item()
    return flow_grpo_formula(x, v, sigma, sigma_prev, sigma_max, prev_sample, noise)


_formula_compiled = torch.compile(flow_grpo_formula, dynamic=False) if COMPILE else None


# ------------------------------------------------------------------------------------------ cases

def _inputs(shape, device="cuda", dtype=torch.bfloat16):
    t = {k: torch.randn(shape, device=device, dtype=dtype) for k in ("x", "v", "v_cond", "prev", "noise")}
    schedule = FlowSchedule(device=device)
    index = torch.arange(shape[0], device=device) % 9  # per-sample steps, as in a shuffled training batch
    return t, schedule, index


def _logprob_fns(t, schedule, index):
    """fwd+bwd callables: {name: fn} for ours per backend, eager and compile."""
    sigmas = schedule.sigmas.to(t["x"].device)
    shape = (-1,) + (1,) * (t["x"].dim() - 1)
    leaf = t["v"].clone().requires_grad_()

    def ours(backend):
        def fn():
            st = step_sigmas(sigmas, index)
            out = sde_step_logprob(t["x"], leaf, st.sigma, st.sigma_next, prev_sample=t["prev"], eta=ETA,
                                   sigma_max=st.sigma_max, backend=backend)
            return torch.autograd.grad(out.log_prob.sum(), [leaf])
        return fn

    def eager():
        _, log_prob, _, _ = flow_grpo_eager(schedule, t["x"], leaf, schedule.timesteps[index], prev_sample=t["prev"])
        return torch.autograd.grad(log_prob.sum(), [leaf])

    def compiled():
        st = step_sigmas(sigmas, index)
        _, log_prob, _, _ = _formula_compiled(t["x"], leaf, st.sigma.view(shape), st.sigma_next.view(shape),
                                              st.sigma_max, prev_sample=t["prev"])
        return torch.autograd.grad(log_prob.sum(), [leaf])

    return ours, eager, compiled


def _guided_fns(t, schedule, index):
    sigmas = schedule.sigmas.to(t["x"].device)
    shape = (-1,) + (1,) * (t["x"].dim() - 1)

    def ours(backend):
        def fn():
            with torch.no_grad():
                st = step_sigmas(sigmas, index)
                return guided_sde_step(t["x"], t["v"], t["v_cond"], CFG, st.sigma, st.sigma_next, noise=t["noise"],
                                       eta=ETA, sigma_max=st.sigma_max, backend=backend)
        return fn

    def eager():
        with torch.no_grad():
            v = t["v"] + CFG * (t["v_cond"] - t["v"])
            return flow_grpo_eager(schedule, t["x"], v, schedule.timesteps[index], noise=t["noise"])

    def compiled():
        with torch.no_grad():
            st = step_sigmas(sigmas, index)
            return _guided_compiled(t["x"], t["v"], t["v_cond"], st.sigma.view(shape), st.sigma_next.view(shape),
                                    st.sigma_max, t["noise"])

    return ours, eager, compiled


def _guided_formula(x, v_uncond, v_cond, sigma, sigma_prev, sigma_max, noise):
    return flow_grpo_formula(x, v_uncond + CFG * (v_cond - v_uncond), sigma, sigma_prev, sigma_max, noise=noise)


_guided_compiled = torch.compile(_guided_formula, dynamic=False) if COMPILE else None


def _gpu_backends(t) -> list[str]:
    """The fused backends that can run here (the CUDA one only when the extension is built)."""
    names = []
    for backend in ("cuda", "triton"):
        try:
            resolve(backend, (t["x"],))
            names.append(backend)
        except (ValueError, RuntimeError):
            continue
    return names


def _assert_no_host_sync(fn) -> None:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def _run_case(benchmark, result_table, op: str, shape: tuple[int, ...]) -> None:
    t, schedule, index = _inputs(shape)
    ours, eager, compiled = (_logprob_fns if op == "logprob" else _guided_fns)(t, schedule, index)
    backends = _gpu_backends(t)
    assert backends, "neither the CUDA nor the Triton backend can run on this device"
    case = f"{op} {'fwd+bwd' if op == 'logprob' else 'fwd'} {'x'.join(map(str, shape))} bf16"
    mine = {b: measure(ours(b), catch=False, reps=20, warmup=3) for b in backends}
    best = min(backends, key=lambda b: mine[b].ms)
    for b in backends:
        _assert_no_host_sync(ours(b))
        result_table.add(case, f"ours ({b})", mine[b], "best" if b == best else "")
    run_benchmark(benchmark, ours(best), rounds=10)
    m_eager = measure(eager, reps=10)
    m_compiled = measure(compiled, reps=20, warmup=3) if COMPILE else Measurement(None, note="PEC_BENCH_COMPILE=0")
    floor_ms = FLOOR_BYTES_PER_ELEMENT[op] * t["x"].numel() / copy_bandwidth_bytes_per_s() * 1e3
    result_table.add(case, "eager Flow-GRPO (incl. per-sample lookup)", m_eager)
    result_table.add(case, "torch.compile (no CUDA graphs, σ as tensors)", m_compiled)
    result_table.add(case, "floor (bytes / copy rate)", Measurement(floor_ms),
                     f"{FLOOR_BYTES_PER_ELEMENT[op]} B/element")
    result_table.add_ratio(case, "ours / floor", ratio(mine[best], floor_ms), TARGETS["floor"])
    result_table.add_ratio(case, "eager / ours", ratio(m_eager, mine[best]), TARGETS["eager"])
    result_table.add_ratio(case, "compile / ours", ratio(m_compiled, mine[best]), TARGETS["compile"])
    result_table.add_ratio(case, "host syncs in ours", 0.0, "0 (set_sync_debug_mode('error') passed)")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sde_logprob_fwd_bwd(benchmark, result_table, shape):
    _run_case(benchmark, result_table, "logprob", shape)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_guided_sde_step_fwd(benchmark, result_table, shape):
    _run_case(benchmark, result_table, "guided", shape)


def test_sde_logprob_tiny_cpu(benchmark, result_table):
    """CPU smoke case (2x4x16x16, fp32, torch backend, fwd+bwd) against the eager formula with its lookup."""
    t, schedule, index = _inputs((2, 4, 16, 16), device="cpu", dtype=torch.float32)
    ours, eager, _ = _logprob_fns(t, schedule, index)
    fn = ours("torch")
    run_benchmark(benchmark, fn, rounds=5)
    ours_ms, eager_ms = cpu_time_ms(fn), cpu_time_ms(eager)
    case = "cpu 2x4x16x16 fp32 logprob fwd+bwd"
    result_table.add(case, "ours (torch)", Measurement(ours_ms))
    result_table.add(case, "eager Flow-GRPO (incl. per-sample lookup)", Measurement(eager_ms))
    result_table.add_ratio(case, "eager / ours", eager_ms / ours_ms)
    (grad_ours,), (grad_eager,) = fn(), eager()
    torch.testing.assert_close(grad_ours, grad_eager, rtol=1e-4, atol=1e-6)
