"""knn_entropy and gaussian_entropy with a validity mask (`valid`, `reference_valid`), and the cosine metric
normalised inside the kernels (issue 11, item 4).

The masked estimate of a group must equal the unmasked estimator run on the group's valid rows alone (the
float64 brute-force reference of test_knn_reference.py on those rows), with masked rows at surprisal 0,
distance 0, index -1 and gradient 0, whatever they hold (NaN included); groups with fewer than k + 1 valid
rows get 0. An all-true mask gives the unmasked result bit for bit. The Triton backend runs through
TRITON_INTERPRET=1 (conftest), so shapes stay tiny; torch.empty is poisoned throughout (NaN / -1).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pec_kernels import gaussian_entropy, knn_entropy
from test_knn_reference import kl_reference, poisoned_outputs  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

CPU_BACKENDS = [("torch", torch.float64), ("torch", torch.float32), ("triton", torch.float32),
                ("torch", torch.bfloat16), ("triton", torch.float16)]
BACKEND_IDS = [f"{b}-{str(d).split('.')[-1]}" for b, d in CPU_BACKENDS]


def _mask(num_groups: int, n: int, k: int) -> torch.Tensor:
    """A (G, n) mask with, in order: a group of random validity, one with exactly k + 1 valid rows, one
    with k (too few: entropy 0), one with none, then random ones."""
    valid = torch.rand(num_groups, n) < 0.7
    valid[0, : k + 1] = True  # at least k + 1 valid rows
    valid[1] = False
    valid[1, torch.randperm(n)[: k + 1]] = True
    valid[2] = False
    valid[2, torch.randperm(n)[:k]] = True
    valid[3] = False
    return valid


def _poison_masked(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x with NaN, +inf and -inf spread over its masked rows (they must never matter)."""
    x = x.clone()
    bad = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=x.dtype)
    masked = (~valid).nonzero()
    for i, (g, r) in enumerate(masked.tolist()):
        x[g, r, i % x.shape[-1]] = bad[i % 3]
    return x


def _case(name: str) -> tuple[torch.Tensor, torch.Tensor, int, dict]:
    """(x (G, n, D), valid (G, n), k, keyword arguments) of a named case, drawn fresh."""
    if name == "odd_sizes":
        x, k = torch.randn(6, 23, 5), 3
    elif name == "duplicates":
        x, k = torch.randn(5, 17, 4), 2
        x[:, 3] = x[:, 0]
        x[:, 8] = x[:, 0]
    elif name == "non_contiguous":
        x, k = torch.randn(19, 6, 9).permute(1, 0, 2)[:, :, ::2], 4  # (6, 19, 5), strided
    elif name == "cosine_per_dim":
        x, k = torch.randn(5, 21, 7) + 0.4, 3
        return x, _mask(5, 21, k), k, {"metric": "cosine", "normalize": "per_dim"}
    elif name == "k1_min_dist":
        x, k = torch.randn(5, 15, 2), 1
        return x, _mask(5, 15, k), k, {"min_dist": 0.05}
    else:
        raise KeyError(name)
    return x, _mask(x.shape[0], x.shape[1], k), k, {}


CASES = ["odd_sizes", "duplicates", "non_contiguous", "cosine_per_dim", "k1_min_dist"]


def _tolerance(dtype: torch.dtype, dim: int) -> dict:
    if dtype == torch.float64:
        return dict(rtol=0, atol=1e-10 * dim)
    if dtype == torch.float32:
        return dict(rtol=0, atol=2e-5 * dim)
    return dict(rtol=0, atol=2e-4 * dim)  # 16-bit inputs: compared on their own (rounded) values


def _rows(mask: torch.Tensor | None, g: int, size: int) -> torch.Tensor:
    """The valid row numbers of group g of a (G, m) or shared (m,) mask (all `size` rows without one)."""
    if mask is None:
        return torch.arange(size)
    return (mask if mask.dim() == 1 else mask[g]).nonzero().reshape(-1)


def assert_matches_valid_rows(out, x: torch.Tensor, valid: torch.Tensor, k: int, *, reference=None,
                              reference_valid=None, **kwargs) -> None:
    """Each group of a masked (G, n) KnnEntropy against the float64 reference of its valid rows alone."""
    tol = _tolerance(x.dtype, x.shape[-1])
    for t in out:
        assert torch.isfinite(t.double()).all(), "non-finite (or poisoned) output"
    for g in range(x.shape[0]):
        rows = valid[g].nonzero().reshape(-1)
        bank, bank_rows = None, None
        if reference is not None:
            bank = reference if reference.dim() == 2 else reference[g]
            bank_rows = _rows(reference_valid, g, bank.shape[0])
        enough = rows.numel() >= k + 1 if reference is None else bank_rows.numel() >= k
        if not enough or rows.numel() == 0:
            assert out.entropy[g] == 0 and (out.surprisal[g] == 0).all()
            assert (out.distance[g] == 0).all() and (out.index[g] == -1).all()
            continue
        ref = kl_reference(x[g, rows].double(), k, reference=None if bank is None else bank[bank_rows].double(),
                           **kwargs)
        torch.testing.assert_close(out.entropy[g].double(), ref.entropy, **tol)
        torch.testing.assert_close(out.surprisal[g, rows].double(), ref.surprisal, **tol)
        torch.testing.assert_close(out.distance[g, rows].double(), ref.distance, rtol=1e-3, atol=tol["atol"])
        masked = ~valid[g]
        assert (out.surprisal[g, masked] == 0).all() and (out.distance[g, masked] == 0).all()
        assert (out.index[g, masked] == -1).all()
        chosen = out.index[g, rows]
        allowed = torch.zeros(x.shape[1] if bank is None else bank.shape[0], dtype=torch.bool)
        allowed[rows if bank is None else bank_rows] = True
        assert allowed[chosen].all(), "a masked candidate was chosen"
        if reference is None:
            assert (chosen != rows[:, None]).all(), "self chosen as its own neighbour"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend,dtype", CPU_BACKENDS, ids=BACKEND_IDS)
def test_masked_self_mode_equals_estimator_on_valid_rows(case, backend, dtype):
    x, valid, k, kwargs = _case(case)
    x = _poison_masked(x.to(dtype), valid)
    out = knn_entropy(x, k, valid=valid, backend=backend, **kwargs)
    assert_matches_valid_rows(out, x, valid, k, **kwargs)


@pytest.mark.parametrize("shared", [True, False], ids=["shared_bank", "per_group_bank"])
@pytest.mark.parametrize("backend,dtype", CPU_BACKENDS[:3], ids=BACKEND_IDS[:3])
def test_masked_bank_mode_equals_estimator_on_valid_rows(shared, backend, dtype):
    k = 3
    x = torch.randn(4, 11, 5, dtype=dtype)
    valid = torch.rand(4, 11) < 0.6
    valid[0] = True
    valid[3] = False
    bank = torch.randn(1 if shared else 4, 19, 5, dtype=dtype)
    bank_valid = torch.rand(bank.shape[:-1]) < 0.5
    bank_valid[:, :k] = True
    if not shared:
        bank_valid[2] = False
        bank_valid[2, :k - 1] = True  # fewer than k valid bank rows: group 2 gets 0
    x, bank = _poison_masked(x, valid), _poison_masked(bank, bank_valid)
    if shared:
        bank, bank_valid = bank[0], bank_valid[0]
    out = knn_entropy(x, k, reference=bank, valid=valid, reference_valid=bank_valid, backend=backend)
    assert_matches_valid_rows(out, x, valid, k, reference=bank, reference_valid=bank_valid)
    # (n, D) inputs with (n,) masks give the first group of the (1, n, D) call.
    flat_bank, flat_valid = (bank, bank_valid) if shared else (bank[0], bank_valid[0])
    flat = knn_entropy(x[0], k, reference=flat_bank, valid=valid[0], reference_valid=flat_valid, backend=backend)
    grouped = knn_entropy(x[:1], k, reference=flat_bank, valid=valid[:1], reference_valid=flat_valid,
                          backend=backend)
    for a, b in zip(flat, grouped):
        assert torch.equal(a, b[0])


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("backend,dtype", CPU_BACKENDS, ids=BACKEND_IDS)
def test_all_true_mask_is_bit_for_bit_the_unmasked_result(backend, dtype, metric):
    x = torch.randn(3, 14, 6, dtype=dtype)
    bank = torch.randn(9, 6, dtype=dtype)
    ones = torch.ones(3, 14, dtype=torch.bool)
    for kwargs in ({}, {"reference": bank, "reference_valid": torch.ones(9, dtype=torch.bool)}):
        leaves = [x.clone().requires_grad_() for _ in range(2)]
        plain = knn_entropy(leaves[0], 3, reference=kwargs.get("reference"), metric=metric, backend=backend)
        masked = knn_entropy(leaves[1], 3, valid=ones, metric=metric, backend=backend, **kwargs)
        for a, b in zip(plain, masked):
            assert torch.equal(a, b)
        weights = torch.randn(3, 14, dtype=plain.surprisal.dtype)
        grads = [torch.autograd.grad((o.surprisal * weights).sum() + o.entropy.sum(), leaf)[0]
                 for o, leaf in ((plain, leaves[0]), (masked, leaves[1]))]
        if backend == "torch":  # Triton's candidate-side atomics may order the float sums differently
            assert torch.equal(grads[0], grads[1])
        else:
            torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_gradcheck_with_a_mask_float64(metric):
    x = (torch.randn(3, 10, 4, dtype=torch.float64) + (0.3 if metric == "cosine" else 0.0)).requires_grad_()
    valid = _mask(4, 10, 3)[[0, 1, 2]]
    bank = torch.randn(2, 3, 13, 4, dtype=torch.float64)[0].requires_grad_()
    bank_valid = torch.rand(3, 13) < 0.7
    bank_valid[:, :3] = True

    def outputs(xv, bv):
        self_mode = knn_entropy(xv, 3, valid=valid, metric=metric, backend="torch")
        bank_mode = knn_entropy(xv, 3, reference=bv, valid=valid, reference_valid=bank_valid, metric=metric,
                                backend="torch")
        return self_mode.entropy, self_mode.surprisal, self_mode.distance, bank_mode.entropy, bank_mode.surprisal

    assert torch.autograd.gradcheck(outputs, (x, bank), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masked_gradients_match_reference_and_are_zero_on_masked_rows(backend, metric):
    k = 2
    x = torch.randn(4, 12, 5, dtype=torch.float64) + 0.2
    valid = _mask(4, 12, k)
    x = _poison_masked(x, valid)
    w = torch.randn(4, 12, dtype=torch.float64)
    leaf = x.float().requires_grad_()
    out = knn_entropy(leaf, k, valid=valid, metric=metric, backend=backend)
    (grad,) = torch.autograd.grad((out.surprisal * w.float()).sum() + out.entropy.sum(), leaf)
    assert torch.isfinite(grad).all() and (grad[~valid] == 0).all()
    for g in range(4):
        rows = valid[g].nonzero().reshape(-1)
        if rows.numel() < k + 1:
            assert (grad[g] == 0).all()
            continue
        x64 = x[g, rows].clone().requires_grad_()
        ref = kl_reference(x64, k, metric=metric)
        (want,) = torch.autograd.grad((ref.surprisal * w[g, rows]).sum() + ref.entropy, x64)
        scale = want.abs().max().item()
        torch.testing.assert_close(grad[g, rows].double() / scale, want / scale, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fully_masked_input_is_zero_and_finite(backend):
    x = torch.full((2, 6, 3), float("nan"), requires_grad=True)
    out = knn_entropy(x, 2, valid=torch.zeros(2, 6, dtype=torch.bool), backend=backend)
    assert (out.entropy == 0).all() and (out.surprisal == 0).all() and (out.index == -1).all()
    out.entropy.sum().backward()
    assert (x.grad == 0).all()


def test_check_finite_ignores_masked_rows_and_still_checks_the_others():
    x = torch.randn(2, 8, 3)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, 4] = False
    x[1, 4, 0] = float("nan")
    knn_entropy(x, 3, valid=valid)  # the NaN is masked: no error
    gaussian_entropy(x, valid=valid)
    x[0, 2, 1] = float("inf")
    for fn in (lambda: knn_entropy(x, 3, valid=valid), lambda: gaussian_entropy(x, valid=valid)):
        with pytest.raises(ValueError, match="^x contains NaN or Inf"):
            fn()


@pytest.mark.parametrize("name,kwargs", [
    ("valid", dict(valid=torch.ones(2, 7, dtype=torch.bool))),
    ("valid", dict(valid=torch.ones(2, 8))),
    ("valid", dict(valid=torch.ones(16, dtype=torch.bool))),
    ("valid", dict(valid=torch.ones(2, 8, dtype=torch.bool, device="meta"))),
    ("valid", dict(valid=[[True] * 8] * 2)),
    ("reference_valid", dict(reference_valid=torch.ones(10, dtype=torch.bool))),
    ("reference_valid", dict(reference=torch.randn(10, 3), reference_valid=torch.ones(9, dtype=torch.bool))),
    ("reference_valid", dict(reference=torch.randn(10, 3), reference_valid=torch.ones(10, dtype=torch.int64))),
], ids=["valid-shape", "valid-dtype", "valid-flat", "valid-device", "valid-list", "reference_valid-no-reference",
        "reference_valid-shape", "reference_valid-dtype"])
def test_bad_masks_raise_naming_the_argument(name, kwargs):
    with pytest.raises(ValueError) as info:
        knn_entropy(torch.randn(2, 8, 3), 3, **kwargs)
    assert str(info.value).startswith(name), str(info.value)
    if name == "valid":
        with pytest.raises(ValueError, match=f"^{name}"):
            gaussian_entropy(torch.randn(2, 8, 3), **kwargs)


# ---- the Gaussian estimator ----

@pytest.mark.parametrize("normalize", ["none", "per_dim"])
def test_masked_gaussian_equals_fit_on_valid_rows(normalize):
    x = torch.randn(5, 9, 4, dtype=torch.float64) * torch.rand(4, dtype=torch.float64) * 3
    valid = torch.rand(5, 9) < 0.6
    valid[0] = True
    valid[1] = False
    valid[1, 4] = True  # one valid row: too few for a variance
    valid[2] = False
    valid[3, :2] = True
    x = _poison_masked(x, valid).requires_grad_()
    out = gaussian_entropy(x, valid=valid, normalize=normalize)
    (grad,) = torch.autograd.grad(out.entropy.sum() + out.surprisal.sum(), x)
    assert torch.isfinite(grad).all() and (grad[~valid] == 0).all()
    for g in range(5):
        rows = valid[g].nonzero().reshape(-1)
        if rows.numel() < 2:
            assert out.entropy[g] == 0 and (out.surprisal[g] == 0).all() and (grad[g] == 0).all()
            continue
        alone = gaussian_entropy(x[g, rows].detach(), normalize=normalize)
        torch.testing.assert_close(out.entropy[g], alone.entropy)
        torch.testing.assert_close(out.surprisal[g, rows], alone.surprisal)
        assert (out.surprisal[g, ~valid[g]] == 0).all()
    full = torch.randn(3, 7, 4)
    plain, masked = gaussian_entropy(full), gaussian_entropy(full, valid=torch.ones(3, 7, dtype=torch.bool))
    assert torch.equal(plain.entropy, masked.entropy) and torch.equal(plain.surprisal, masked.surprisal)


# ---- the cosine metric normalises in the kernels ----

class _LargestAllocation(TorchDispatchMode):
    """The largest floating storage (in elements) that any torch op run under it allocates (views of
    its inputs do not count; Triton kernels write into buffers allocated by torch ops, so those do)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if (isinstance(t, torch.Tensor) and t.is_floating_point()
                    and t.untyped_storage().data_ptr() not in inputs):
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize("mode", ["self", "bank"])
def test_triton_cosine_makes_no_normalised_copy(mode):
    n, dim, k = 40, 16, 3
    x = torch.randn(2, n, dim)
    bank = torch.randn(2, 30, dim) if mode == "bank" else None
    with _LargestAllocation() as tracked:
        out = knn_entropy(x, k, reference=bank, metric="cosine", backend="triton", check_finite=False)
    assert tracked.largest < n * dim, tracked.largest  # norms (G, n), keys and distances (G, n, k) only
    assert_close_to_cosine_reference(out, x, k, bank)
    with _LargestAllocation() as tracked:
        knn_entropy(x, k, reference=bank, metric="cosine", backend="torch", check_finite=False)
    assert tracked.largest >= 2 * n * dim  # the reference backend keeps its normalised copies


def assert_close_to_cosine_reference(out, x, k, bank):
    ref = kl_reference(x.double(), k, reference=None if bank is None else bank.double(), metric="cosine")
    torch.testing.assert_close(out.surprisal.double(), ref.surprisal, rtol=0, atol=2e-5 * x.shape[-1])
    torch.testing.assert_close(out.distance.double(), ref.distance, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_cosine_backend_functions_match_torch(dtype):
    from pec_kernels.knn import torch_backend, triton_backend
    from pec_kernels.knn.estimator import RowScale, inverse_norms

    x = (torch.randn(2, 21, 12) * torch.rand(2, 21, 1) * 5).to(dtype)
    for ref in (None, torch.randn(1, 17, 12).to(dtype)):
        scale = RowScale(inverse_norms(x), None if ref is None else inverse_norms(ref))
        index = triton_backend.select(x, ref, 4, scale=scale)
        torch.testing.assert_close(index, torch_backend.select(x.float(), None if ref is None else ref.float(), 4,
                                                               scale=scale), rtol=0, atol=0)
        dist = triton_backend.pair_distances(x, ref, index, scale=scale)
        torch.testing.assert_close(dist, torch_backend.pair_distances(x, ref, index, scale=scale))
        coef = torch.randn(2, 21, 4)
        got = triton_backend.pair_grad(x, ref, index, coef, scale=scale)
        want = torch_backend.pair_grad(x, ref, index, coef, scale=scale)
        for a, b in zip(got, want):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---- torch.compile ----

@pytest.mark.slow
def test_masked_ops_compile_without_graph_breaks():
    x = torch.randn(3, 11, 5)
    valid = _mask(4, 11, 3)[:3]
    x = _poison_masked(x, valid)
    bank, bank_valid = torch.randn(9, 5), torch.rand(9) < 0.8

    def loss(xv, bv):
        a = knn_entropy(xv, 3, valid=valid, metric="cosine")
        b = knn_entropy(xv, 2, reference=bv, valid=valid, reference_valid=bank_valid)
        c = gaussian_entropy(xv, valid=valid)
        return a.entropy.sum() + a.distance.sum() + b.surprisal.sum() + c.entropy.sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss, compiled):
        leaf, bank_leaf = x.clone().requires_grad_(), bank.clone().requires_grad_()
        value = fn(leaf, bank_leaf)
        value.backward()
        results.append((value.detach(), leaf.grad, bank_leaf.grad))
    for eager, traced in zip(*results):
        assert torch.isfinite(traced).all()
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)
