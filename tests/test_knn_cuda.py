"""The CUDA kNN kernels for small groups (csrc/knn_grouped.cu via pec_kernels.knn.cuda).

GPU tests compare against float64 brute force computed from the same (possibly 16-bit) input values:
the kernels read fp16/bf16 natively and accumulate in fp32, so every dtype gets the tolerance of an
fp32 sum, derived below from the number of terms. CPU tests cover the Python-side validation.
"""
from __future__ import annotations

import math

import pytest
import torch

from pec_kernels.knn import cuda as knn_cuda

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP32_EPS = 2.0 ** -24  # unit roundoff of float32


# ---------------------------------------------------------------------------------------------- helpers

def _ref_distances(x: torch.Tensor) -> torch.Tensor:
    """(G, n, n) float64 distances by direct differences (duplicates give exactly 0), self = inf."""
    x64 = x.double()
    dist = torch.cdist(x64, x64, compute_mode="donot_use_mm_for_euclid_dist")
    dist.diagonal(dim1=1, dim2=2).fill_(math.inf)
    return dist


def _ref_knn(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (idx, dist) of the k nearest, ascending, ties by smaller index (stable sort)."""
    dist, idx = torch.sort(_ref_distances(x), dim=-1, stable=True)
    return idx[..., :k], dist[..., :k]


def _ref_pair_distances(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    x64 = x.double()
    num_groups, n, k = idx.shape
    nb = torch.gather(x64, 1, idx.reshape(num_groups, n * k, 1).expand(-1, -1, x.shape[-1]))
    return (x64[:, :, None, :] - nb.view(num_groups, n, k, -1)).square().sum(-1).sqrt()


def _ref_pair_grad(x: torch.Tensor, idx: torch.Tensor, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 formula (grad, Σ|terms| per element): grad_i += c (x_i − x_j), grad_j −= c (x_i − x_j)."""
    x64 = x.double()
    num_groups, n, k = idx.shape
    dim = x.shape[-1]
    flat_idx = idx.reshape(num_groups, n * k, 1).expand(-1, -1, dim)
    nb = torch.gather(x64, 1, flat_idx).view(num_groups, n, k, dim)
    terms = coef.double()[..., None] * (x64[:, :, None, :] - nb)
    grad = terms.sum(2).scatter_add_(1, flat_idx, -terms.reshape(num_groups, n * k, dim))
    abs_sum = terms.abs().sum(2).scatter_add_(1, flat_idx, terms.abs().reshape(num_groups, n * k, dim))
    return grad, abs_sum


def _distance_rtol(dim: int) -> float:
    """Relative error bound of sqrt(Σ_d (x_i − x_j)²) summed in fp32: about (D + 2)·u for d², half for d."""
    return (dim + 4) * FP32_EPS


def _poison_allocator(*specs: tuple[tuple[int, ...], torch.dtype]) -> None:
    """Fill cache blocks of the outputs' sizes with 0xFF bytes (NaN floats, −1 int64) and free them, so
    the op's outputs most likely reuse them and an element the kernel fails to write is caught."""
    blocks = [torch.empty(shape, dtype=dtype, device="cuda").view(torch.uint8).fill_(255) for shape, dtype in specs]
    del blocks


def _features(shape: tuple[int, ...], dtype: torch.dtype, *, duplicates: bool = True,
              integer: bool = False, misaligned: bool = False) -> torch.Tensor:
    """Random CUDA features; duplicates copy some rows onto others within each group; integer-valued
    features make every fp32 distance exact, so exact ties must be broken by the smaller index."""
    count = math.prod(shape)
    if integer:
        flat = torch.randint(-3, 4, (count + 1,), device="cuda").to(dtype)
    else:
        flat = torch.randn(count + 1, device="cuda").to(dtype)
    # A one-element offset gives a contiguous tensor whose rows are not 16-byte aligned (scalar loads).
    x = flat[1:].view(shape) if misaligned else flat[:count].view(shape).clone()
    if duplicates and shape[1] >= 4:
        x[:, 1] = x[:, 0]
        x[:, shape[1] - 1] = x[:, 2]
        x[:, shape[1] // 2] = x[:, 0]
    return x


def _check_selection(x: torch.Tensor, k: int, idx: torch.Tensor, dist: torch.Tensor) -> None:
    """Shape, validity, distances exact to the fp32 bound, order, and equality with the reference
    wherever the reference ranking is not within the tolerance of a tie."""
    num_groups, n, dim = x.shape
    assert idx.shape == (num_groups, n, k) and idx.dtype == torch.int64
    assert dist.shape == (num_groups, n, k) and dist.dtype == torch.float32
    assert bool(torch.isfinite(dist).all()), "unwritten or non-finite distance"
    assert int(idx.min()) >= 0 and int(idx.max()) < n, "index out of range (unwritten output?)"
    rows = torch.arange(n, device=idx.device)[None, :, None]
    assert not bool((idx == rows).any()), "self selected"
    if k > 1:
        assert bool((idx.sort(-1).values.diff(dim=-1) > 0).all()), "repeated neighbour"

    rtol = _distance_rtol(dim)
    scale = float(_ref_distances(x).masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), 0).max())
    atol = rtol * scale + 1e-30
    exact = _ref_pair_distances(x, idx)
    torch.testing.assert_close(dist.double(), exact, rtol=rtol, atol=atol, msg="distance of the returned pairs")
    ref_idx, ref_dist = _ref_knn(x, k)
    torch.testing.assert_close(dist.double(), ref_dist, rtol=rtol, atol=atol, msg="k smallest distances")

    # Ascending; duplicates (distance exactly 0 in any precision) by smaller index. Other ties are
    # decided on d² before the square root, so they are checked on integer data instead.
    step = dist.diff(dim=-1)
    assert bool((step >= 0).all()), "not ascending"
    zero_tie = (dist[..., 1:] == 0) & (dist[..., :-1] == 0)
    assert bool((idx.diff(dim=-1)[zero_tie] > 0).all()), "duplicates not ordered by index"

    # Where the reference's rank s is separated from its neighbours by more than the tolerance, the
    # index must match exactly.
    full = torch.sort(_ref_distances(x), dim=-1, stable=True).values[..., : k + 1]
    gap_prev = torch.cat([torch.full_like(full[..., :1], math.inf), full[..., 1:k] - full[..., : k - 1]], -1)
    gap_next = full[..., 1:] - full[..., :k]
    tol = 4 * (rtol * full[..., :k] + atol)
    separated = (gap_prev > tol) & (gap_next > tol)
    assert bool((idx[separated] == ref_idx[separated]).all()), "well-separated neighbour differs from reference"


# ---------------------------------------------------------------------------------------------- GPU tests

CASES = [  # (G, n, D, k)
    (3, 2, 5, 1),        # smallest group: the only candidate
    (4, 3, 1, 2),        # D = 1, k = n - 1
    (5, 24, 64, 3),      # the per-prompt group of Flow-GRPO
    (2, 31, 129, 30),    # odd n and D, k = n - 1, chunk tail
    (3, 33, 48, 5),      # just above one warp of candidates
    (2, 64, 200, 63),
    (2, 100, 96, 7),
    (2, 129, 40, 64),
    (2, 256, 70, 64),    # largest group and k
    (3, 256, 16, 1),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CASES, ids=lambda c: "G{}-n{}-D{}-k{}".format(*c))
def test_select_matches_float64_reference(shape, dtype):
    num_groups, n, dim, k = shape
    x = _features((num_groups, n, dim), dtype)
    _poison_allocator(((num_groups, n, k), torch.int64), ((num_groups, n, k), torch.float32))
    idx, dist = knn_cuda.select_with_distances(x, None, k)
    _check_selection(x, k, idx, dist)
    torch.testing.assert_close(knn_cuda.select(x, None, k), idx, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4, 24, 16, 5), (2, 57, 9, 56), (2, 200, 32, 64)],
                         ids=lambda c: "G{}-n{}-D{}-k{}".format(*c))
def test_select_exact_ties_go_to_smaller_index(shape, dtype):
    num_groups, n, dim, k = shape
    x = _features((num_groups, n, dim), dtype, integer=True)
    idx, dist = knn_cuda.select_with_distances(x, None, k)
    ref_idx, ref_dist = _ref_knn(x, k)
    torch.testing.assert_close(idx, ref_idx, rtol=0, atol=0)
    torch.testing.assert_close(dist.double(), ref_dist, rtol=2 * FP32_EPS, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_select_unaligned_and_noncontiguous_inputs(dtype):
    # Rows not 16-byte aligned take the scalar-load path; a transposed view is made contiguous.
    x = _features((3, 40, 64), dtype, misaligned=True)
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    idx, dist = knn_cuda.select_with_distances(x, None, 4)
    _check_selection(x, 4, idx, dist)
    aligned_idx, aligned_dist = knn_cuda.select_with_distances(x.clone(), None, 4)
    torch.testing.assert_close(idx, aligned_idx, rtol=0, atol=0)
    torch.testing.assert_close(dist, aligned_dist, rtol=0, atol=0)
    view = _features((3, 64, 40), dtype).transpose(1, 2)
    assert not view.is_contiguous()
    idx, dist = knn_cuda.select_with_distances(view, None, 6)
    _check_selection(view.contiguous(), 6, idx, dist)


@pytest.mark.gpu
def test_select_many_groups_and_long_rows():
    # More groups than gridDim.y could hold, and D spanning many chunks with a tail.
    x = _features((70_000, 5, 8), torch.float32)
    idx, dist = knn_cuda.select_with_distances(x, None, 4)
    _check_selection(x, 4, idx, dist)
    x = _features((2, 40, 3000), torch.bfloat16)
    idx, dist = knn_cuda.select_with_distances(x, None, 3)
    _check_selection(x, 3, idx, dist)


def _random_pairs(num_groups: int, n: int, k: int, *, hub: bool) -> torch.Tensor:
    """Random neighbour indices, including self pairs and repeats; `hub` sends most pairs to row 0."""
    idx = torch.randint(0, n, (num_groups, n, k), device="cuda")
    if hub:
        idx[:, :, : max(1, k // 2)] = 0
    return idx


PAIR_CASES = [(4, 24, 64, 3), (3, 31, 129, 7), (2, 64, 33, 16), (2, 130, 96, 9), (2, 256, 40, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", PAIR_CASES, ids=lambda c: "G{}-n{}-D{}-k{}".format(*c))
def test_pair_distances_match_float64(shape, dtype):
    num_groups, n, dim, k = shape
    x = _features((num_groups, n, dim), dtype)
    idx = _random_pairs(num_groups, n, k, hub=False)
    _poison_allocator(((num_groups, n, k), torch.float32))
    dist = knn_cuda.pair_distances(x, None, idx)
    assert dist.shape == (num_groups, n, k) and dist.dtype == torch.float32
    assert bool(torch.isfinite(dist).all())
    ref = _ref_pair_distances(x, idx)
    rtol = _distance_rtol(dim)
    torch.testing.assert_close(dist.double(), ref, rtol=rtol, atol=rtol * float(ref.max()))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hub", [False, True], ids=["random", "hub"])
@pytest.mark.parametrize("shape", PAIR_CASES, ids=lambda c: "G{}-n{}-D{}-k{}".format(*c))
def test_pair_grad_matches_float64_formula(shape, hub, dtype):
    num_groups, n, dim, k = shape
    x = _features((num_groups, n, dim), dtype)
    idx = _random_pairs(num_groups, n, k, hub=hub)
    coef = torch.randn(num_groups, n, k, device="cuda")
    _poison_allocator(((num_groups, n, dim), torch.float32))
    grad, none = knn_cuda.pair_grad(x, None, idx, coef)
    assert none is None
    assert grad.shape == (num_groups, n, dim) and grad.dtype == torch.float32
    assert bool(torch.isfinite(grad).all()), "unwritten or non-finite gradient"
    ref, abs_sum = _ref_pair_grad(x, idx, coef)
    # Recursive fp32 sum of m terms, each from a rounded difference and product: |err| <= (m + 2) u Σ|terms|.
    indegree = torch.zeros(num_groups, n, device="cuda").scatter_add_(
        1, idx.reshape(num_groups, -1), torch.ones(num_groups, n * k, device="cuda"))
    terms = k + int(indegree.max())
    bound = (terms + 2) * FP32_EPS * abs_sum + 1e-30
    err = (grad.double() - ref).abs()
    assert bool((err <= bound).all()), f"max error / bound = {float((err / bound).max()):.3g}"
    again, _ = knn_cuda.pair_grad(x, None, idx, coef)
    assert torch.equal(grad, again), "pair_grad is not deterministic"


@pytest.mark.gpu
def test_pair_grad_is_the_gradient_of_the_distances():
    # Σ coef·d(i, j) has gradient Σ coef·(x_i − x_j)/d on x_i and the opposite on x_j: finite differences.
    x = _features((2, 24, 16), torch.float32, duplicates=False)
    idx, dist = knn_cuda.select_with_distances(x, None, 3)
    weight = torch.randn(2, 24, 3, device="cuda", dtype=torch.float64)
    grad, _ = knn_cuda.pair_grad(x, None, idx, (weight / dist.double()).float())

    def objective(x64: torch.Tensor) -> torch.Tensor:
        return (weight * _ref_pair_distances(x64, idx)).sum()

    x64 = x.double().requires_grad_(True)
    (autograd,) = torch.autograd.grad(objective(x64), x64)
    torch.testing.assert_close(grad.double(), autograd, rtol=1e-4, atol=1e-5)
    direction = torch.randn_like(x64)
    h = 1e-6
    finite = (objective(x.double() + h * direction) - objective(x.double() - h * direction)) / (2 * h)
    torch.testing.assert_close((grad.double() * direction).sum(), finite, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
def test_ops_reject_bad_tensors_in_cpp():
    x = torch.randn(2, 8, 4, device="cuda")
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.pec.knn_grouped_select(x.transpose(1, 2), 2)
    with pytest.raises(RuntimeError, match="k must be"):
        torch.ops.pec.knn_grouped_select(x, 8)
    with pytest.raises(RuntimeError, match="idx"):
        torch.ops.pec.knn_grouped_pair_distances(x, torch.zeros(2, 8, 2, dtype=torch.int32, device="cuda"))
    with pytest.raises(RuntimeError, match="coef"):
        torch.ops.pec.knn_grouped_pair_grad(x, torch.zeros(2, 8, 2, dtype=torch.int64, device="cuda"),
                                            torch.zeros(2, 8, 3, device="cuda"))


@pytest.mark.gpu
def test_knn_entropy_cuda_backend_matches_torch_backend():
    from pec_kernels.knn import knn_entropy
    from pec_kernels.knn.backends import resolve

    x = _features((6, 24, 96), torch.float32)
    assert resolve("auto", x, None, 3) is knn_cuda
    results = {}
    for backend in ("cuda", "torch"):
        leaf = x.clone().requires_grad_(True)
        out = knn_entropy(leaf, 3, backend=backend)
        (out.entropy * torch.linspace(1, 2, 6, device="cuda")).sum().backward()
        results[backend] = (out, leaf.grad)
    (cuda_out, cuda_grad), (torch_out, torch_grad) = results["cuda"], results["torch"]
    torch.testing.assert_close(cuda_out.index, torch_out.index, rtol=0, atol=0)
    torch.testing.assert_close(cuda_out.distance, torch_out.distance, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cuda_out.entropy, torch_out.entropy, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cuda_grad, torch_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
def test_range_check_rejects_out_of_range_index_on_gpu():
    x = torch.randn(2, 8, 4, device="cuda")
    bad = torch.zeros(2, 8, 2, dtype=torch.int64, device="cuda")
    bad[1, 3, 1] = 8
    with pytest.raises(ValueError, match="idx"):
        knn_cuda.pair_distances(x, None, bad)
    with pytest.raises(ValueError, match="idx"):
        knn_cuda.pair_grad(x, None, bad, torch.zeros(2, 8, 2, device="cuda"))


# ---------------------------------------------------------------------------------------------- CPU tests

def test_supports_rejects_what_the_kernels_do_not_take():
    x = torch.randn(2, 8, 4)
    assert not knn_cuda.supports(x, None, 3)  # CPU tensor
    assert "CUDA" in knn_cuda.why_unsupported(x, None, 3)
    assert "self mode" in knn_cuda.why_unsupported(x, x, 3)
    assert "(G, n, D)" in knn_cuda.why_unsupported(x[0], None, 3)
    meta = torch.empty(2, 8, 4, device="meta")
    assert not knn_cuda.supports(meta, None, 3)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,dtype,ok", [
    (2, 1, torch.float32, True), (256, 64, torch.bfloat16, True), (24, 23, torch.float16, True),
    (1, 1, torch.float32, False), (257, 3, torch.float32, False), (8, 8, torch.float32, False),
    (100, 65, torch.float32, False), (8, 0, torch.float32, False), (8, 3, torch.float64, False),
])
def test_supports_on_gpu_shapes(n, k, dtype, ok):
    x = torch.zeros(2, n, 4, device="cuda", dtype=dtype)
    assert knn_cuda.supports(x, None, k) is (ok and knn_cuda.cuda_ops_available())


def test_validation_names_the_argument():
    x = torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match="reference"):
        knn_cuda.select(x, x, 2)
    with pytest.raises(ValueError, match="x must have dtype"):
        knn_cuda.select(x.double(), None, 2)
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        knn_cuda.select(x[0], None, 2)
    with pytest.raises(ValueError, match="x must have 2 to 256 points"):
        knn_cuda.select(torch.randn(2, 257, 4), None, 2)
    with pytest.raises(ValueError, match="x must not be empty"):
        knn_cuda.select(torch.randn(0, 8, 4), None, 2)
    for k in (0, 8, 65, True, 2.0):
        with pytest.raises(ValueError, match="k must be"):
            knn_cuda.select(x, None, k)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        knn_cuda.select(x, None, 2)


def test_pair_validation_names_the_argument():
    x = torch.randn(2, 8, 4)
    idx = torch.zeros(2, 8, 3, dtype=torch.int64)
    coef = torch.zeros(2, 8, 3)
    with pytest.raises(ValueError, match="idx must have dtype"):
        knn_cuda.pair_distances(x, None, idx.int())
    with pytest.raises(ValueError, match="idx must have shape"):
        knn_cuda.pair_distances(x, None, idx[:, :7])
    with pytest.raises(ValueError, match="idx must have shape"):
        knn_cuda.pair_distances(x, None, torch.zeros(2, 8, 65, dtype=torch.int64))
    for bad_value in (-1, 8):
        bad = idx.clone()
        bad[1, 2, 0] = bad_value
        with pytest.raises(ValueError, match=r"idx must hold row numbers in \[0, n\)"):
            knn_cuda.pair_distances(x, None, bad)
    with pytest.raises(ValueError, match="coef must have dtype"):
        knn_cuda.pair_grad(x, None, idx, coef.double())
    with pytest.raises(ValueError, match="coef must have the shape of idx"):
        knn_cuda.pair_grad(x, None, idx, coef[..., :2])
    with pytest.raises(ValueError, match="reference"):
        knn_cuda.pair_grad(x, x, idx, coef)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        knn_cuda.pair_grad(x, None, idx, coef)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        knn_cuda.pair_distances(x, None, idx)
