"""GPU tests of the SDE ops: every backend against the float64 reference and each other (fp32, bf16),
CUDA-graph capture of forward + backward, and no host synchronisation anywhere (skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch

from pec_kernels.sde import guided_sde_step, sde_step_logprob, step_sigmas
from test_sde import KINDS, SIGMA_MAX, assert_close, make_inputs, reference_step, schedule

pytestmark = pytest.mark.gpu
BACKENDS = ("torch", "triton", "cuda")
SHAPES = [(5, 16, 33, 31), (4, 77, 64)]  # odd latents (scalar path) and packed tokens (vector path)


def _cuda(inputs):
    return {k: t.cuda() for k, t in inputs.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=["BCHW", "BLC"])
@pytest.mark.parametrize("rollout", [True, False], ids=["rollout", "reeval"])
def test_backends_match_reference_and_each_other(dtype, kind, shape, rollout):
    """Each backend's log_prob/kl against the float64 reference scored at that backend's own x'
    (fp32 math: 1e-5 relative); x' and μ across backends within one rounding of the dtype
    (fp32 ~1e-6; bf16 2^-6 relative: a different FMA contraction may flip one bf16 rounding, up to
    2^-7 relative)."""
    inp = _cuda(make_inputs(shape, dtype=dtype, noncontiguous=len(shape) == 4))
    sigma, sigma_next = (s.cuda() for s in schedule(shape[0]))
    d = {k: t.double() for k, t in inp.items()}
    target = dict(noise=inp["noise"]) if rollout else dict(prev_sample=inp["noise"])
    outs = {}
    for backend in BACKENDS:
        out = sde_step_logprob(inp["x"], inp["v"], sigma, sigma_next, kind=kind, sigma_max=SIGMA_MAX,
                               v_ref=inp["v_ref"], backend=backend, return_mean=True, **target)
        _, lp, mean, std, kl = reference_step(kind, d["x"], d["v"], sigma.double(), sigma_next.double(), 0.7, SIGMA_MAX,
                                              prev=out.prev_sample.double(), v_ref=d["v_ref"])
        assert_close(out.log_prob, lp, 1e-5, 1e-4, f"{backend} log_prob")
        assert_close(out.kl, kl, 1e-5, 1e-5, f"{backend} kl")
        assert_close(out.std, std, 1e-6, 1e-7, f"{backend} std")
        outs[backend] = out
    rel = 2 ** -6 if dtype == torch.bfloat16 else 1e-6
    for backend in ("triton", "cuda"):
        assert_close(outs[backend].mean, outs["torch"].mean, rel, 1e-5, f"{backend} mean")
        assert_close(outs[backend].prev_sample, outs["torch"].prev_sample, rel, 1e-5, f"{backend} prev_sample")


@pytest.mark.parametrize("dtype, rollout", [(torch.float32, True), (torch.float32, False), (torch.bfloat16, False)],
                         ids=["fp32-rollout", "fp32-reeval", "bf16-reeval"])
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
def test_backend_gradients_agree(dtype, guided, rollout):
    """Gradients of a random combination of log_prob, kl, mean (and the rollout prev_sample) agree
    with the torch backend: fp32 to 1e-5 relative, bf16 to 2^-6 (one rounding of each gradient may
    flip, up to 2^-7 relative). bf16 rollout is left out on purpose: each backend scores its own
    rounded x', whose one-ulp flips are large against small residuals (consistency within a backend
    is test_rollout_equals_reevaluation_on_gpu)."""
    shape = (6, 16, 32, 32)
    inp = _cuda(make_inputs(shape, dtype=dtype))
    sigma, sigma_next = (s.cuda() for s in schedule(5))
    sigma, sigma_next = torch.cat((sigma, sigma[:1])), torch.cat((sigma_next, sigma_next[:1]))
    names = ("x", "v_uncond", "v_cond", "guidance") if guided else ("x", "v")
    w = {k: torch.randn(6, device="cuda") for k in ("lp", "kl")}
    w_mean = torch.randn(shape, device="cuda", dtype=dtype)
    grads = {}
    for backend in BACKENDS:
        leaves = {n: inp[n].clone().requires_grad_() for n in names}
        common = dict(kind="flow", v_ref=inp["v_ref"], backend=backend, return_mean=True,
                      **(dict(noise=inp["noise"]) if rollout else dict(prev_sample=inp["noise"])))
        if guided:
            out = guided_sde_step(leaves["x"], leaves["v_uncond"], leaves["v_cond"], 4.5, sigma, sigma_next,
                                  guidance=leaves["guidance"], guidance_weight=0.3, **common)
        else:
            out = sde_step_logprob(leaves["x"], leaves["v"], sigma, sigma_next, **common)
        loss = (out.log_prob * w["lp"]).sum() + (out.kl * w["kl"]).sum() + (out.mean.float() * w_mean).sum()
        if rollout:
            loss = loss + (out.prev_sample.float() * w_mean).sum()
        grads[backend] = torch.autograd.grad(loss, [leaves[n] for n in names])
    rel = 2 ** -6 if dtype == torch.bfloat16 else 1e-5
    for backend in ("triton", "cuda"):
        for n, g, g_ref in zip(names, grads[backend], grads["torch"]):
            assert g.dtype == dtype
            scale = g_ref.abs().max().item()
            assert_close(g, g_ref, rel, rel * scale, f"{backend} grad {n}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rollout_equals_reevaluation_on_gpu(backend, dtype):
    inp = _cuda(make_inputs((8, 16, 64, 64), dtype=dtype))
    sigma, sigma_next = (s.cuda() for s in schedule(5))
    sigma, sigma_next = sigma[[0, 1, 2, 3, 4, 1, 2, 0]], sigma_next[[0, 1, 2, 3, 4, 1, 2, 0]]
    for kind in KINDS:
        rolled = guided_sde_step(inp["x"], inp["v_uncond"], inp["v_cond"], 4.5, sigma, sigma_next, noise=inp["noise"],
                                 kind=kind, backend=backend)
        again = guided_sde_step(inp["x"], inp["v_uncond"], inp["v_cond"], 4.5, sigma, sigma_next,
                                prev_sample=rolled.prev_sample, kind=kind, backend=backend)
        assert torch.isfinite(rolled.log_prob).all()
        assert torch.equal(rolled.log_prob, again.log_prob), (backend, kind)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_capture_forward_and_backward(backend):
    """Capture step_sigmas + the step + its backward in one CUDA graph; replay on new inputs copied in."""
    shape = (4, 16, 32, 32)
    sigmas = torch.linspace(1, 0, 11, device="cuda")
    static = {k: torch.randn(shape, device="cuda", dtype=torch.bfloat16) for k in ("x", "v", "prev")}
    static["index"] = torch.tensor([0, 3, 5, 9], device="cuda")
    v_leaf = static["v"].requires_grad_()

    def step():
        st = step_sigmas(sigmas, static["index"])
        out = sde_step_logprob(static["x"], v_leaf, st.sigma, st.sigma_next, prev_sample=static["prev"],
                               sigma_max=st.sigma_max, backend=backend)
        (grad,) = torch.autograd.grad(out.log_prob.sum(), [v_leaf])
        return out.log_prob, grad

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_lp, graph_grad = step()

    new = {k: torch.randn(shape, device="cuda", dtype=torch.bfloat16) for k in ("x", "v", "prev")}
    new_index = torch.tensor([1, 2, 8, 0], device="cuda")
    with torch.no_grad():
        for k in ("x", "v", "prev"):
            static[k].copy_(new[k])
        static["index"].copy_(new_index)
    graph.replay()
    torch.cuda.synchronize()
    eager_lp, eager_grad = step()
    assert torch.equal(graph_lp, eager_lp) and torch.equal(graph_grad, eager_grad)
    assert not torch.equal(graph_lp, torch.zeros_like(graph_lp))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
def test_no_host_synchronisation(backend, guided):
    shape = (4, 16, 32, 32)
    sigmas = torch.linspace(1, 0, 11, device="cuda")
    inp = _cuda(make_inputs(shape, dtype=torch.bfloat16))
    index = torch.tensor([0, 3, 5, 9], device="cuda")
    leaves = {k: inp[k].clone().requires_grad_() for k in ("x", "v", "v_uncond", "v_cond")}

    def run():
        st = step_sigmas(sigmas, index)
        common = dict(sigma_max=st.sigma_max, v_ref=inp["v_ref"], backend=backend, return_mean=True)
        if guided:
            out = guided_sde_step(leaves["x"], leaves["v_uncond"], leaves["v_cond"], 4.5, st.sigma, st.sigma_next,
                                  noise=inp["noise"], **common)
        else:
            out = sde_step_logprob(leaves["x"], leaves["v"], st.sigma, st.sigma_next, noise=inp["noise"], **common)
        (out.log_prob.sum() + out.kl.sum() + out.mean.float().sum()).backward()

    run()  # warm-up: Triton compilation, extension loading
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend", ("triton", "cuda"))
def test_batch_beyond_65535_and_mean_on_request(backend):
    """B = 70,000 > 65,535 (the grid limit of axes 1 and 2) runs forward and backward and matches torch;
    without return_mean no μ comes back, and the other outputs do not change."""
    shape = (70_000, 2, 8)
    inp = {k: torch.randn(shape, device="cuda") for k in ("x", "v", "prev")}
    sigma = torch.rand(shape[0], device="cuda") * 0.8 + 0.1
    results = {}
    for name in ("torch", backend):
        v = inp["v"].clone().requires_grad_()
        out = sde_step_logprob(inp["x"], v, sigma, sigma * 0.5, prev_sample=inp["prev"], backend=name)
        out.log_prob.sum().backward()
        assert out.mean is None
        results[name] = (out.log_prob, v.grad)
    assert_close(results[backend][0], results["torch"][0], 1e-5, 1e-4, f"{backend} log_prob")
    assert_close(results[backend][1], results["torch"][1], 1e-5, 1e-5, f"{backend} grad v")
    with_mean = sde_step_logprob(inp["x"], inp["v"], sigma, sigma * 0.5, prev_sample=inp["prev"], backend=backend,
                                 return_mean=True)
    assert torch.equal(with_mean.log_prob, results[backend][0].detach())
    assert with_mean.mean.shape == shape and torch.isfinite(with_mean.mean).all()
