"""torch.compile traces the public ops in one graph, and the CUDA ops have fake implementations (issue 11, item 2).

CPU: knn_entropy, gaussian_entropy, sde_step_logprob and guided_sde_step, forward and backward, under
torch.compile(fullgraph=True) (any graph break fails), with the "aot_eager" backend: it traces through
dynamo and AOTAutograd (fake tensors, the joint graph) but skips Inductor's code generation, which costs
tens of seconds on a CI core and tests nothing of ours. The finiteness check compiles to a device-side
assert. The fake (meta) implementations of torch.ops.pec.* are checked on meta tensors wherever
pec_kernels._C is built (CI builds it), and with torch.library.opcheck on a GPU, where the ops can run.
"""
from __future__ import annotations

import pytest
import torch

import pec_kernels
from pec_kernels import _fake, gaussian_entropy, guided_sde_step, knn_entropy, sde_step_logprob

pytestmark = pytest.mark.slow


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def _entropy_loss(x, reference):
    out = knn_entropy(x, 3, reference=reference)
    gauss = gaussian_entropy(x)
    return out.entropy.sum() + out.distance.sum() + 0.1 * gauss.entropy.sum()


def test_entropy_ops_compile_without_graph_breaks():
    x = torch.randn(2, 12, 5)
    reference = torch.randn(9, 5)
    results = []
    for fn in (_entropy_loss, _compiled(_entropy_loss)):
        leaf, ref_leaf = x.clone().requires_grad_(), reference.clone().requires_grad_()
        loss = fn(leaf, None) + fn(leaf, ref_leaf)
        loss.backward()
        results.append((loss.detach(), leaf.grad, ref_leaf.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_compiled_finiteness_check_is_a_device_assert():
    compiled = _compiled(lambda x: knn_entropy(x, 3).entropy)
    compiled(torch.randn(10, 4))
    bad = torch.randn(10, 4)
    bad[2, 1] = float("nan")
    with pytest.raises(RuntimeError, match="x contains NaN or Inf"):
        compiled(bad)


def _sde_loss(x, v, v_cond, prev, noise, sigma, sigma_next):
    reeval = sde_step_logprob(x, v, sigma, sigma_next, prev_sample=prev, sigma_max=0.95, v_ref=noise)
    rollout = guided_sde_step(x, v, v_cond, 4.5, 0.8, 0.6, noise=noise, kind="dance", return_mean=True)
    return (reeval.log_prob.sum() + reeval.kl.sum() + rollout.log_prob.sum() + rollout.mean.sum()
            + rollout.prev_sample.sum())


def test_sde_ops_compile_without_graph_breaks():
    g = torch.Generator().manual_seed(0)
    x, v, v_cond, prev, noise = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(5))
    sigma, sigma_next = torch.tensor([1.0, 0.6, 0.3]), torch.tensor([0.9, 0.4, 0.0])
    results = []
    for fn in (_sde_loss, _compiled(_sde_loss)):
        v_leaf, c_leaf = v.clone().requires_grad_(), v_cond.clone().requires_grad_()
        loss = fn(x, v_leaf, c_leaf, prev, noise, sigma, sigma_next)
        loss.backward()
        results.append((loss.detach(), v_leaf.grad, c_leaf.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- fake implementations

needs_extension = pytest.mark.skipif(not pec_kernels.cuda_ops_available(),
                                     reason="pec_kernels._C is not built here (CI builds it)")


def _sde_args(x, nv=2, v_ref=True):
    vels = [torch.empty_like(x) for _ in range(nv)]
    params = [torch.empty(x.shape[0], device=x.device), None, None, None, None]
    return x, vels, torch.empty_like(x), torch.empty_like(x) if v_ref else None, params, [0.0, 0.4, 0.9, 4.5, 0.0]


def test_every_op_of_the_extension_has_a_fake():
    from test_extension import CUDA_OPS

    assert set(_fake.FAKES) == set(CUDA_OPS)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_implementations_on_meta_tensors(dtype):
    ops = torch.ops.pec
    x = torch.empty(4, 10, 6, device="meta", dtype=dtype)
    idx, dist = ops.knn_grouped_select(x, 3)
    assert (idx.shape, idx.dtype, dist.shape, dist.dtype) == ((4, 10, 3), torch.int64, (4, 10, 3), torch.float32)
    assert ops.knn_grouped_pair_distances(x, idx).shape == (4, 10, 3)
    grad = ops.knn_grouped_pair_grad(x, idx, dist)
    assert (grad.shape, grad.dtype) == ((4, 10, 6), torch.float32)
    # The optional per-row inputs: knn_entropy's mask and the cosine metric's inverse norms.
    valid = torch.empty(4, 10, device="meta", dtype=torch.bool)
    scale = torch.empty(4, 10, device="meta")
    masked_idx, masked_dist = ops.knn_grouped_select(x, 3, valid, scale)
    assert (masked_idx.shape, masked_dist.dtype) == ((4, 10, 3), torch.float32)
    assert ops.knn_grouped_pair_distances(x, idx, scale).shape == (4, 10, 3)
    assert ops.knn_grouped_pair_grad(x, idx, dist, scale).shape == (4, 10, 6)

    lat = torch.empty(5, 24, device="meta", dtype=dtype)
    for rollout, need_mean, with_ref in ((True, False, True), (False, True, False)):
        prev, mean, log_prob, kl, std = ops.sde_step_fwd(*_sde_args(lat, v_ref=with_ref), 0.7, 0, rollout, 24.0,
                                                         need_mean)
        assert prev.shape == ((5, 24) if rollout else (0,)) and mean.shape == ((5, 24) if need_mean else (0,))
        assert log_prob.shape == std.shape == (5,) and log_prob.dtype == torch.float32
        assert kl.shape == ((5,) if with_ref else (0,))
    x_, vels, prev, v_ref, params, values = _sde_args(lat, nv=2)
    grads = ops.sde_step_bwd(x_, vels, prev, v_ref, params, values, 0.7, 0, 24.0, torch.empty(5, device="meta"),
                             None, None, None, True, False, True, True)
    assert [tuple(g.shape) for g in grads] == [(5, 24), (0,), (5, 24), (0,)]  # dv2 not needed: no third velocity
    assert grads[0].dtype == dtype


@pytest.mark.gpu
@needs_extension
def test_opcheck_on_gpu():
    ops = torch.ops.pec
    x = torch.randn(3, 12, 8, device="cuda")
    idx, dist = ops.knn_grouped_select(x, 3)
    valid = torch.rand(3, 12, device="cuda") < 0.7
    scale = torch.rand(3, 12, device="cuda") + 0.5
    for op, args in ((ops.knn_grouped_select, (x, 3)), (ops.knn_grouped_pair_distances, (x, idx)),
                     (ops.knn_grouped_pair_grad, (x, idx, torch.rand_like(dist))),
                     (ops.knn_grouped_select, (x, 3, valid, scale)), (ops.knn_grouped_pair_distances, (x, idx, scale)),
                     (ops.knn_grouped_pair_grad, (x, idx, torch.rand_like(dist), scale))):
        torch.library.opcheck(op, args)
    lat = torch.randn(4, 40, device="cuda", dtype=torch.bfloat16)
    vels = [torch.randn_like(lat), torch.randn_like(lat)]
    params = [torch.tensor([0.9, 0.7, 0.5, 0.3], device="cuda"), None, None, None, None]
    values = [0.0, 0.2, 0.95, 4.5, 0.0]
    common = (lat, vels, torch.randn_like(lat), torch.randn_like(lat), params, values, 0.7, 0)
    torch.library.opcheck(ops.sde_step_fwd, (*common, True, 40.0, False))
    torch.library.opcheck(ops.sde_step_fwd, (*common, False, 40.0, True))
    torch.library.opcheck(ops.sde_step_bwd, (*common[:2], torch.randn_like(lat), *common[3:], 40.0,
                                             torch.randn(4, device="cuda"), torch.randn(4, device="cuda"),
                                             None, None, True, True, True, False))


@pytest.mark.gpu
def test_compiled_step_calls_the_cuda_ops_without_graph_breaks():
    """One training-like step on the CUDA backend (kNN entropy of features, then an SDE re-evaluation),
    compiled with Inductor and fullgraph=True, matches eager."""
    torch._dynamo.reset()

    valid = torch.rand(8, 24, device="cuda") < 0.8

    def step(features, x, v, prev, sigma):
        entropy = knn_entropy(features, 3, backend="cuda", check_finite=False).entropy
        entropy = entropy + knn_entropy(features, 3, valid=valid, metric="cosine", backend="cuda",
                                        check_finite=False).entropy
        out = sde_step_logprob(x, v, sigma, sigma * 0.5, prev_sample=prev, backend="cuda")
        return out.log_prob.sum() + entropy.sum()

    features = torch.randn(8, 24, 64, device="cuda")
    x, v, prev = (torch.randn(4, 16, 32, 32, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    sigma = torch.tensor([0.9, 0.7, 0.5, 0.3], device="cuda")
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        f_leaf, v_leaf = features.clone().requires_grad_(), v.clone().requires_grad_()
        loss = fn(f_leaf, x, v_leaf, prev, sigma)
        loss.backward()
        results.append((loss.detach(), f_leaf.grad, v_leaf.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled.float(), eager.float(), rtol=1e-4, atol=1e-4)
