"""kNN anchors from real libraries on the CPU (issue 11, item 6): knn_entropy against faiss-cpu and scikit-learn.

Forward only, self kNN, k = 5, fp32, the same process and thread settings for everyone:
  ours:    pec_kernels.knn_entropy(x, 5) (backend "auto" = torch on CPU), entropy and distances;
  faiss:   faiss.IndexFlatL2 (exact brute force, BLAS GEMM + heap select): add(x), search(x, k + 1)
           (the first hit is the point itself);
  sklearn: NearestNeighbors(algorithm="brute").fit(x).kneighbors(x, k + 1) (N = 20,000 only; it
           materialises chunked distance matrices and sorts them);
  floor:   the fp32 GEMM X·Xᵀ alone, in 4096-row blocks (N = 20,000 only).
Ratios are ours/anchor in time (< 1: ours is faster). Install the anchors with `pip install -e ".[bench]"`;
without faiss-cpu or scikit-learn their rows say why they are missing. Every case checks that ours and
faiss agree on the k-th-neighbour distances, so the comparison is of the same computation.
Run: `pytest benchmarks/bench_knn_cpu_anchors.py --benchmark-only -s` (a few minutes on 2 cores).
"""
from __future__ import annotations

import pytest
import torch

from _timing import Measurement, cpu_time_ms, ratio, run_benchmark
from pec_kernels import knn_entropy

K = 5
#: (N, D, reps): the cases of DESIGN.md §6's CPU anchors, plus D = 512 at N = 65,536 left out (minutes).
CASES = [(20_000, 64, 3), (20_000, 512, 3), (65_536, 128, 1)]


def _ours(x: torch.Tensor):
    with torch.no_grad():
        return knn_entropy(x, K, check_finite=False)


def _faiss_search(faiss, x_np):
    index = faiss.IndexFlatL2(x_np.shape[1])
    index.add(x_np)
    return index.search(x_np, K + 1)


def _missing(name: str, exc: ImportError) -> Measurement:
    return Measurement(None, None, f"n/a: {name} not installed ({exc}); pip install -e '.[bench]'")


@pytest.mark.parametrize("n, dim, reps", CASES, ids=[f"N{n}-D{d}" for n, d, _ in CASES])
def test_knn_cpu_against_faiss_and_sklearn(benchmark, result_table, n, dim, reps):
    x = torch.randn(n, dim)
    case = f"cpu self N={n} D={dim} k={K} fp32 fwd ({torch.get_num_threads()} threads)"
    ours_ms = cpu_time_ms(lambda: _ours(x), warmup=0 if reps == 1 else 1, reps=reps)
    run_benchmark(benchmark, lambda: _ours(x), rounds=1, warmup_rounds=0)
    result_table.add(case, "ours (knn_entropy, torch backend)", Measurement(ours_ms))
    x_np = x.numpy()
    try:
        import faiss
    except ImportError as exc:
        faiss_m = _missing("faiss-cpu", exc)
    else:
        faiss_m = Measurement(cpu_time_ms(lambda: _faiss_search(faiss, x_np), warmup=0 if reps == 1 else 1,
                                          reps=reps))
        squared, _ = _faiss_search(faiss, x_np) if n <= 20_000 else (None, None)
        if squared is not None:  # same k-th-neighbour distances, up to float32 rounding of two methods
            theirs = torch.from_numpy(squared[:, K]).clamp_min(0).sqrt()
            torch.testing.assert_close(_ours(x).distance[:, -1], theirs, rtol=2e-3, atol=2e-3)
    result_table.add(case, "faiss-cpu IndexFlatL2 (add + search k+1)", faiss_m)
    result_table.add_ratio(case, "ours / faiss", ratio(Measurement(ours_ms), faiss_m))
    if n > 20_000:
        return
    try:
        from sklearn.neighbors import NearestNeighbors
    except ImportError as exc:
        sk = _missing("scikit-learn", exc)
    else:
        sk = Measurement(cpu_time_ms(
            lambda: NearestNeighbors(n_neighbors=K + 1, algorithm="brute").fit(x_np).kneighbors(x_np),
            warmup=0, reps=1))
    result_table.add(case, "scikit-learn NearestNeighbors (brute)", sk)
    result_table.add_ratio(case, "ours / sklearn", ratio(Measurement(ours_ms), sk))
    floor = cpu_time_ms(lambda: [x[r0:r0 + 4096] @ x.T for r0 in range(0, n, 4096)], warmup=1, reps=reps)
    result_table.add(case, "floor (fp32 GEMM X·Xᵀ, 4096-row blocks)", Measurement(floor))
    result_table.add_ratio(case, "ours / floor", ours_ms / floor)
