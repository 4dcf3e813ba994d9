"""knn_entropy forward: every CPU backend against the float64 reference of test_knn_reference.py,
input validation, dispatch, and the torch backend's chunking and memory bound.

The Triton backend runs through TRITON_INTERPRET=1 here (set by conftest), so its shapes stay tiny.
Every test runs with torch.empty poisoned (NaN / -1), so an output element no kernel wrote fails.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pec_kernels import knn_entropy
from pec_kernels.knn import backends, estimator, torch_backend, triton_backend
from test_knn_reference import kl_reference, poisoned_outputs  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

# (backend, dtype) pairs run on CPU; 16-bit Triton inputs are upcast in the kernel when interpreting.
CPU_BACKENDS = [("torch", torch.float64), ("torch", torch.float32), ("triton", torch.float32)]


def _duplicated(x: torch.Tensor, copies: dict[int, int]) -> torch.Tensor:
    """x with row dst replaced by row src for each src → dst (exact duplicates along dim -2)."""
    x = x.clone()
    for src, dst in copies.items():
        x[..., dst, :] = x[..., src, :]
    return x


def _case(name: str) -> tuple[torch.Tensor, int, dict]:
    """(x, k, keyword arguments) of a named input case, drawn fresh from the seeded generator."""
    if name == "odd_n_k3":
        return torch.randn(37, 5), 3, {}
    if name == "k1":
        return torch.randn(20, 3), 1, {}
    if name == "k_is_n_minus_1":
        return torch.randn(9, 4), 8, {}
    if name == "multi_tile_D32_k5":
        return torch.randn(70, 32), 5, {}
    if name == "k64":
        return torch.randn(66, 3), 64, {}
    if name == "cosine":
        return torch.randn(33, 7) + 0.5, 4, {"metric": "cosine"}
    if name == "per_dim":
        return torch.randn(2, 21, 6), 2, {"normalize": "per_dim"}
    if name == "clamped":
        # min_dist near the median 3rd-neighbour distance: about half the rows are clamped.
        return torch.randn(40, 2), 3, {"min_dist": 0.3}
    if name == "shared_bank":
        return torch.randn(3, 10, 6), 4, {"reference": torch.randn(23, 6)}
    if name == "per_group_bank_k_is_M":
        return torch.randn(3, 11, 6), 17, {"reference": torch.randn(3, 17, 6)}
    if name == "bank_2d":
        return torch.randn(19, 9), 6, {"reference": torch.randn(31, 9)}
    if name == "groups_of_different_scale":
        x = torch.randn(2, 25, 8)
        return x * torch.tensor([1e-3, 1e3])[:, None, None], 3, {}
    if name == "offset_far_from_origin":
        return torch.randn(30, 6) + 300.0, 2, {}
    if name == "duplicates":
        x = _duplicated(torch.randn(2, 30, 4), {0: 5, 1: 7, 2: 9, 3: 11})
        x[1] = x[1, :1]  # group 1: every row identical → all ρ clamped, still finite
        return x, 2, {}
    if name == "non_contiguous":
        x = torch.randn(8, 45)[:, ::2].t()  # (23, 8) with strides (2, 45)
        bank = torch.randn(2, 7, 40).transpose(1, 2)[:, ::2]  # (2, 20, 7), strided
        return x[None].expand(2, -1, -1)[:, :, 1:], 3, {"reference": bank}
    raise KeyError(name)


TORCH_CASES = ["odd_n_k3", "k1", "k_is_n_minus_1", "multi_tile_D32_k5", "k64", "cosine", "per_dim", "clamped",
               "shared_bank", "per_group_bank_k_is_M", "bank_2d", "groups_of_different_scale",
               "offset_far_from_origin", "duplicates", "non_contiguous"]
TRITON_CASES = [c for c in TORCH_CASES if c != "k64"]  # k64 runs once, below, to spare the interpreter


def _tolerances(dtype: torch.dtype, dim: int) -> dict:
    """Distances are exact up to the working precision; the surprisal carries D·log ρ on top of a
    constant of magnitude ~D, so its absolute tolerance scales with D."""
    if dtype == torch.float64:
        return dict(dist=1e-12, surprisal=1e-10 * dim)
    return dict(dist=2e-6, surprisal=2e-5 * dim)


def assert_matches_reference(out, x: torch.Tensor, k: int, **kwargs) -> None:
    """Compare a KnnEntropy with the float64 reference on the same input values."""
    ref = kl_reference(x, k, **kwargs)
    grouped = x.dim() == 3
    shape = x.shape[:-1]
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert out.entropy.shape == shape[:-1] and out.surprisal.shape == shape
    assert out.index.shape == out.distance.shape == (*shape, k)
    assert out.index.dtype == torch.int64
    assert out.distance.dtype == out.surprisal.dtype == out.entropy.dtype == out_dtype
    for t in out:
        assert torch.isfinite(t.double()).all(), "non-finite (or poisoned) output"

    tol = _tolerances(x.dtype, x.shape[-1])
    min_dist = kwargs.get("min_dist", 1e-6)
    torch.testing.assert_close(out.distance.double(), ref.distance, rtol=tol["dist"], atol=tol["dist"] * 1e-3)
    torch.testing.assert_close(out.surprisal.double(), ref.surprisal, rtol=0, atol=tol["surprisal"])
    torch.testing.assert_close(out.entropy.double(), ref.entropy, rtol=0, atol=tol["surprisal"])
    # The chosen candidates are at the reference's sorted distances; equal distances may pick any tie.
    chosen = ref.all_distances.gather(-1, out.index).clamp_min(min_dist)
    torch.testing.assert_close(chosen, ref.distance, rtol=tol["dist"], atol=tol["dist"] * 1e-3)
    sorted_index = out.index.sort(-1).values
    assert (sorted_index[..., 1:] != sorted_index[..., :-1]).all(), "a candidate was chosen twice"
    if kwargs.get("reference") is None:
        own = torch.arange(x.shape[-2])[:, None]
        assert (out.index != (own if not grouped else own[None])).all(), "self chosen as its own neighbour"


@pytest.mark.parametrize("case", TORCH_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_torch_backend_matches_reference(case, dtype):
    x, k, kwargs = _case(case)
    x = x.to(dtype)
    kwargs = {key: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for key, v in kwargs.items()}
    assert_matches_reference(knn_entropy(x, k, backend="torch", **kwargs), x, k, **kwargs)


@pytest.mark.parametrize("case", TRITON_CASES + ["k64"])
def test_triton_backend_matches_reference(case):
    x, k, kwargs = _case(case)
    assert_matches_reference(knn_entropy(x, k, backend="triton", **kwargs), x, k, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_16bit_inputs_match_reference_on_their_values(backend, dtype):
    # Distances are computed in float32 from the 16-bit values, so the float64 reference of those same
    # values holds to float32 tolerances.
    x = _duplicated(torch.randn(2, 29, 12), {0: 4}).to(dtype)
    bank = torch.randn(2, 18, 12).to(dtype)
    assert_matches_reference(knn_entropy(x, 3, backend=backend), x, 3)
    assert_matches_reference(knn_entropy(x, 5, reference=bank, backend=backend), x, 5, reference=bank)


def test_all_identical_group_is_finite_and_clamped():
    x = torch.ones(2, 6, 3)
    x[1] = torch.randn(6, 3)
    out = knn_entropy(x, 2, min_dist=1e-4, backend="torch")
    offset = estimator.surprisal_offset(5, 2, 3)
    expected = torch.full((6,), offset + 3 * math.log(1e-4))
    torch.testing.assert_close(out.surprisal[0], expected)
    assert (out.distance[0] == 1e-4).all()


def test_estimator_constants_against_torch_special():
    for v in [1, 2, 3, 7.5, 9.99, 10, 63, 1024, 65537, 1e6]:
        expected = torch.special.digamma(torch.tensor(float(v), dtype=torch.float64)).item()
        assert estimator.digamma(v) == pytest.approx(expected, abs=1e-13)
    for dim in [1, 2, 3, 256, 512, 1024]:
        expected = dim / 2 * math.log(math.pi) - torch.lgamma(torch.tensor(dim / 2 + 1.0, dtype=torch.float64))
        assert estimator.log_unit_ball_volume(dim) == pytest.approx(expected.item(), abs=1e-10)
    # V_D underflows float64 around D = 400; its logarithm must not.
    assert math.isfinite(estimator.log_unit_ball_volume(4096))


# ---- backend kernels called directly: every output element written, and agreeing with torch ----

@pytest.mark.parametrize("mode", ["self", "shared_bank", "per_group_bank"])
def test_triton_kernels_match_torch_backend(mode):
    x = torch.randn(3, 21, 20)
    ref = {"self": None, "shared_bank": torch.randn(1, 26, 20), "per_group_bank": torch.randn(3, 26, 20)}[mode]
    k = 5
    index = triton_backend.select(x, ref, k)
    assert index.dtype == torch.int64 and index.shape == (3, 21, k)
    torch.testing.assert_close(index, torch_backend.select(x, ref, k), rtol=0, atol=0)
    dist = triton_backend.pair_distances(x, ref, index)
    torch.testing.assert_close(dist, torch_backend.pair_distances(x, ref, index))
    coef = torch.randn(3, 21, k)
    coef[:, ::3, 1] = 0.0  # skipped pairs
    grads = triton_backend.pair_grad(x, ref, index, coef)
    expected = torch_backend.pair_grad(x, ref, index, coef)
    torch.testing.assert_close(grads[0], expected[0], rtol=1e-5, atol=1e-5)
    if ref is None:
        assert grads[1] is None and expected[1] is None
    else:
        assert grads[1].shape == ref.shape
        torch.testing.assert_close(grads[1], expected[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["self", "per_group_bank"])
def test_triton_resident_query_tile_matches_streaming(monkeypatch, mode):
    """16-bit inputs with D <= 512 keep the query tile on chip across candidate tiles (RESIDENT_D); the
    streaming path (D in BLOCK_D blocks per candidate tile) must select the same neighbours. D = 40 is
    padded to 64 on chip, so the masked columns are exercised too."""
    x = torch.randn(2, 45, 40).to(torch.bfloat16)
    ref = None if mode == "self" else torch.randn(2, 37, 40).to(torch.bfloat16)
    assert triton_backend._resident_d(torch.bfloat16, 40, shifted=False) == 64
    assert triton_backend._resident_d(torch.float32, 40, shifted=True) == 0
    assert triton_backend._resident_d(torch.bfloat16, 1024, shifted=False) == 0
    resident = triton_backend.select(x, ref, 5)
    monkeypatch.setattr(triton_backend, "MAX_RESIDENT_D", 0)
    streamed = triton_backend.select(x, ref, 5)
    torch.testing.assert_close(resident, streamed, rtol=0, atol=0)
    torch.testing.assert_close(resident, torch_backend.select(x.float(), None if ref is None else ref.float(), 5),
                               rtol=0, atol=0)


# ---- dispatch ----

def test_auto_on_cpu_is_torch():
    x = torch.randn(12, 3)
    assert backends.resolve("auto", x[None], None, 3) is torch_backend
    auto, ref = knn_entropy(x, 3), knn_entropy(x, 3, backend="torch")
    torch.testing.assert_close(auto.surprisal, ref.surprisal, rtol=0, atol=0)


def test_auto_skips_an_optional_backend_that_is_missing_or_broken(monkeypatch):
    x = torch.randn(1, 12, 3)
    monkeypatch.setitem(backends._MODULES, "cuda", "pec_kernels.knn.no_such_module")
    assert backends._auto_candidate("cuda", x, None, 3) is None

    def broken(*args):
        raise RuntimeError("driver exploded")

    monkeypatch.setitem(backends._MODULES, "cuda", "pec_kernels.knn.torch_backend")
    monkeypatch.setattr(torch_backend, "supports", broken)
    with pytest.warns(RuntimeWarning, match="driver exploded"):
        assert backends._auto_candidate("cuda", x, None, 3) is None


def test_exact_select_distances_are_used_as_given(monkeypatch):
    """A backend with EXACT_SELECT hands its distances to the autograd Function, which must then not
    recompute them (the CUDA backend's path, exercised here through a torch-based stand-in)."""
    x = torch.randn(2, 10, 4, dtype=torch.float64, requires_grad=True)
    expected = knn_entropy(x, 3, backend="torch")
    (grad_expected,) = torch.autograd.grad(expected.entropy.sum(), x)

    pair_distances = torch_backend.pair_distances

    def select_with_distances(x_rank, ref_rank, k, *, valid=None, scale=None):
        index = torch_backend.select(x_rank, ref_rank, k, valid=valid, scale=scale)
        return index, pair_distances(x_rank, ref_rank, index, scale=scale)

    def no_second_pass(*args):
        raise AssertionError("pair_distances recomputed distances that select already gave")

    monkeypatch.setattr(torch_backend, "EXACT_SELECT", True)
    monkeypatch.setattr(torch_backend, "select_with_distances", select_with_distances, raising=False)
    monkeypatch.setattr(torch_backend, "pair_distances", no_second_pass)
    out = knn_entropy(x, 3, backend="torch")
    (grad,) = torch.autograd.grad(out.entropy.sum(), x)
    torch.testing.assert_close(out.surprisal, expected.surprisal)
    torch.testing.assert_close(out.distance, expected.distance)
    torch.testing.assert_close(grad, grad_expected)


# ---- validation: each bad input raises a ValueError whose message starts with the argument's name ----

def _bad_inputs():
    x = torch.randn(2, 8, 3)
    with_nan, with_inf = x.clone(), x.clone()
    with_nan[1, 2, 0], with_inf[0, 0, 2] = float("nan"), float("inf")
    bank = torch.randn(10, 3)
    bank_nan = bank.clone()
    bank_nan[3, 1] = float("nan")
    return [
        ("x", "not_a_tensor", dict(x=[[0.0, 1.0], [1.0, 0.0]])),
        ("x", "rank_1", dict(x=torch.randn(8))),
        ("x", "rank_4", dict(x=torch.randn(1, 2, 8, 3))),
        ("x", "int_dtype", dict(x=torch.ones(8, 3, dtype=torch.int64))),
        ("x", "no_rows", dict(x=torch.randn(0, 3))),
        ("x", "no_groups", dict(x=torch.randn(0, 8, 3))),
        ("x", "no_features", dict(x=torch.randn(8, 0))),
        ("x", "nan", dict(x=with_nan)),
        ("x", "inf", dict(x=with_inf)),
        ("k", "zero", dict(x=x, k=0)),
        ("k", "above_64", dict(x=torch.randn(80, 3), k=65)),
        ("k", "float", dict(x=x, k=2.0)),
        ("k", "bool", dict(x=x, k=True)),
        ("k", "at_least_n", dict(x=x, k=8)),
        ("k", "above_bank_size", dict(x=x, k=11, reference=bank)),
        ("reference", "not_a_tensor", dict(x=x, reference=bank.tolist())),
        ("reference", "rank_1", dict(x=x, reference=torch.randn(3))),
        ("reference", "empty", dict(x=x, reference=torch.randn(0, 3))),
        ("reference", "nan", dict(x=x, reference=bank_nan)),
        ("reference", "dtype", dict(x=x, reference=bank.double())),
        ("reference", "device", dict(x=x, reference=bank.to("meta"))),
        ("reference", "feature_dim", dict(x=x, reference=torch.randn(10, 4))),
        ("reference", "grouped_with_ungrouped_x", dict(x=x[0], reference=torch.randn(1, 10, 3))),
        ("reference", "group_count", dict(x=x, reference=torch.randn(3, 10, 3))),
        ("metric", "unknown", dict(x=x, metric="manhattan")),
        ("normalize", "unknown", dict(x=x, normalize="per_sample")),
        ("backend", "unknown", dict(x=x, backend="numpy")),
        ("backend", "triton_float64", dict(x=x.double(), backend="triton")),
        ("backend", "cuda_on_cpu", dict(x=x, backend="cuda")),
        ("min_dist", "zero", dict(x=x, min_dist=0.0)),
        ("min_dist", "negative", dict(x=x, min_dist=-1e-3)),
        ("min_dist", "nan", dict(x=x, min_dist=float("nan"))),
        ("min_dist", "inf", dict(x=x, min_dist=float("inf"))),
        ("min_dist", "string", dict(x=x, min_dist="1e-6")),
    ]


@pytest.mark.parametrize("name,kwargs", [(n, kw) for n, _, kw in _bad_inputs()],
                         ids=[f"{n}-{why}" for n, why, _ in _bad_inputs()])
def test_bad_input_raises_value_error_naming_the_argument(name, kwargs):
    kwargs = {"k": 3, **kwargs}
    with pytest.raises(ValueError) as info:
        knn_entropy(kwargs.pop("x"), kwargs.pop("k"), **kwargs)
    assert str(info.value).startswith(name), str(info.value)


# ---- torch backend chunking ----

def test_chunked_equals_unchunked(monkeypatch):
    x = torch.randn(3, 50, 6, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 50, dtype=torch.float64)

    def run():
        outs = [knn_entropy(x, 4, backend="torch"), knn_entropy(x, 4, reference=bank, backend="torch")]
        loss = sum((o.surprisal * weights).sum() + o.distance.sum() for o in outs)
        grads = torch.autograd.grad(loss, (x, bank))
        return [t for o in outs for t in o] + list(grads)

    whole = run()
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 97)  # a few rows per chunk, ragged last chunk
    for a, b in zip(whole, run()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest storage (in elements) produced by any op run under it."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize("chunk", [1024, None], ids=["chunked", "default"])
def test_torch_backend_never_allocates_n_by_n(monkeypatch, chunk):
    n, dim, k = 200, 4, 3
    x = torch.randn(n, dim, requires_grad=True)
    if chunk is not None:
        monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", chunk)
    with _LargestAllocation() as mode:
        out = knn_entropy(x, k, backend="torch")
        out.entropy.backward()
    if chunk is None:  # the detector sees the full distance matrix when the chunk is large enough
        assert mode.largest >= n * (n - 1)
    else:
        assert mode.largest <= max(chunk, n * dim, n * k) < n * (n - 1)
