"""Host synchronisations of the public ops (issue 11, item 4), counted on CPU.

Every host read of a tensor value (`.item()`, `bool(t)`, `.tolist()`) dispatches aten._local_scalar_dense,
which on a GPU is a host synchronisation. Counting that op on CPU shows which calls would synchronise:
the finiteness check of knn_entropy / gaussian_entropy (one per checked tensor, off with
check_finite=False), the index-range check of a backend's pair functions (never for indices that
knn_entropy's own select produced), and nothing at all in the SDE ops and the ODE solver step.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pec_kernels import dpm_solver_step, gaussian_entropy, knn_entropy
from pec_kernels.knn import torch_backend, triton_backend
from pec_kernels.sde import guided_sde_step, sde_step_logprob

needs_interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="Triton interpreter tests run on CPU only")


class ScalarReads(TorchDispatchMode):
    """Counts the ops that copy a tensor value to the host."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _reads(fn) -> int:
    with ScalarReads() as mode:
        fn()
    return mode.count


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("with_reference", [False, True], ids=["self", "bank"])
def test_knn_entropy_syncs_only_for_the_finiteness_check(backend, with_reference):
    x = torch.randn(2, 10, 4, requires_grad=True)
    reference = torch.randn(12, 4, requires_grad=True) if with_reference else None

    def run(check: bool):
        def fn():
            out = knn_entropy(x, 3, reference=reference, backend=backend, check_finite=check)
            out.entropy.sum().backward()
        return fn

    checked = 2 if with_reference else 1
    assert _reads(run(True)) == checked
    assert _reads(run(False)) == 0  # no index-range check on the indices select produced, forward or backward


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_masked_knn_and_gaussian_entropy_never_read_the_mask(backend):
    """The mask's counts and the per-group constants stay on the device (issue 11, item 4)."""
    x = torch.randn(3, 10, 4, requires_grad=True)
    valid = torch.rand(3, 10) < 0.6
    bank, bank_valid = torch.randn(12, 4), torch.rand(12) < 0.5

    def fn():
        out = knn_entropy(x, 3, valid=valid, metric="cosine", backend=backend, check_finite=False)
        against = knn_entropy(x, 2, reference=bank, valid=valid, reference_valid=bank_valid, backend=backend,
                              check_finite=False)
        gauss = gaussian_entropy(x, valid=valid, check_finite=False)
        (out.entropy.sum() + against.surprisal.sum() + gauss.entropy.sum()).backward()

    assert _reads(fn) == 0


def test_pair_functions_check_indices_given_from_outside():
    x = torch.randn(1, 6, 3)
    bad = torch.tensor([[[0], [2], [1], [6], [0], [1]]])
    with pytest.raises(ValueError, match=r"index must hold row numbers in \[0, m\)"):
        torch_backend.pair_distances(x, None, bad)
    with pytest.raises(ValueError, match=r"index must hold row numbers in \[0, m\)"):
        torch_backend.pair_grad(x, None, bad, torch.ones(1, 6, 1))
    good = bad.clamp_max(5)
    assert _reads(lambda: torch_backend.pair_distances(x, None, good)) == 1
    assert _reads(lambda: torch_backend.pair_distances(x, None, good, check_index=False)) == 0


@needs_interpreter
def test_triton_pair_functions_check_indices_given_from_outside():
    x = torch.randn(1, 6, 3)
    bad = torch.tensor([[[0], [2], [1], [-1], [0], [1]]])
    with pytest.raises(ValueError, match="index must hold row numbers"):
        triton_backend.pair_distances(x, None, bad)
    with pytest.raises(ValueError, match="index must hold row numbers"):
        triton_backend.pair_grad(x, None, bad, torch.ones(1, 6, 1))


def test_check_finite_false_skips_the_check_and_keeps_groups_apart():
    x = torch.randn(2, 10, 4)
    x[1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        knn_entropy(x, 3)
    out = knn_entropy(x, 3, check_finite=False)
    torch.testing.assert_close(out.entropy[0], knn_entropy(x[0], 3).entropy)
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        gaussian_entropy(x)
    gauss = gaussian_entropy(x, check_finite=False)
    torch.testing.assert_close(gauss.entropy[0], gaussian_entropy(x[0]).entropy)
    assert _reads(lambda: gaussian_entropy(x[:1])) == 1
    assert _reads(lambda: gaussian_entropy(x, check_finite=False)) == 0
    with pytest.raises(ValueError, match="check_finite must be a bool"):
        knn_entropy(x, 3, check_finite="no")
    with pytest.raises(ValueError, match="check_finite must be a bool"):
        gaussian_entropy(x, check_finite=None)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("schedule", ["floats", "tensors"])
def test_sde_ops_never_read_values_on_the_host(backend, schedule):
    g = torch.Generator().manual_seed(0)
    x, noise, v_ref = (torch.randn(3, 2, 8, generator=g) for _ in range(3))
    v, v_cond = (torch.randn(3, 2, 8, generator=g, requires_grad=True) for _ in range(2))
    sigma, sigma_next = (0.8, 0.5) if schedule == "floats" else (torch.tensor([0.9, 0.6, 0.3]), torch.tensor(0.2))

    def run():
        a = sde_step_logprob(x, v, sigma, sigma_next, noise=noise, v_ref=v_ref, backend=backend)
        b = guided_sde_step(x, v, v_cond, 4.5, sigma, sigma_next, prev_sample=a.prev_sample.detach(),
                            backend=backend)
        (a.log_prob.sum() + a.kl.sum() + b.log_prob.sum()).backward()

    assert _reads(run) == 0
    if schedule == "tensors":  # the opt-in debug check reads the schedule once per call
        assert _reads(lambda: sde_step_logprob(x, v, sigma, sigma_next, noise=noise, check_schedule=True)) == 1


@pytest.mark.parametrize("schedule", ["floats", "tensors"])
def test_dpm_solver_step_never_reads_values_on_the_host(schedule):
    x, x0, x0_prev = (torch.randn(3, 2, 8, requires_grad=True) for _ in range(3))
    sigmas = (1.0, 0.8, 0.5) if schedule == "floats" else \
        (torch.tensor([1.0, 0.9, 0.6]), torch.tensor([0.9, 0.6, 0.3]), torch.tensor(0.0))

    def run():
        dpm_solver_step(x, x0, x0_prev, *sigmas, order=2).sum().backward()
        dpm_solver_step(x, x0, None, None, *sigmas[1:], order=1)

    assert _reads(run) == 0
    if schedule == "tensors":  # the opt-in debug check reads the schedule once per call
        assert _reads(lambda: dpm_solver_step(x, x0, x0_prev, *sigmas, order=2, check_schedule=True)) == 1
