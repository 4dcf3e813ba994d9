"""Timing, memory and result-table helpers shared by the benchmark suites (bench_knn.py, bench_sde.py).

GPU times come from CUDA events around `reps` calls after `warmup` calls (median), peak memory from the
caching allocator, floors from quantities measured in the same process (copy bandwidth, GEMM rate).
A variant that fails (OOM, compiler error, unsupported shape) is recorded as "n/a" with the reason
instead of failing the suite: anchors are allowed to break, our own kernels are not (call them directly).
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

GIB = float(1 << 30)


@dataclasses.dataclass
class Measurement:
    """One timed variant: median milliseconds and peak extra memory (GiB), or a reason it did not run."""

    ms: float | None
    peak_gib: float | None = None
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.ms is not None


def sync() -> None:
    """Wait for the GPU (no-op without CUDA): every timed callable must end with this."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gpu_time_ms(fn: Callable[[], object], *, warmup: int = 1, reps: int = 5) -> float:
    """Median CUDA-event time of fn() in milliseconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cpu_time_ms(fn: Callable[[], object], *, warmup: int = 1, reps: int = 5) -> float:
    """Median wall-clock time of fn() in milliseconds (CPU tensors)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_memory_gib(fn: Callable[[], object]) -> float:
    """Peak memory allocated by one call of fn() beyond what was allocated before it, in GiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / GIB


def measure(fn: Callable[[], object], *, warmup: int = 1, reps: int = 5, catch: bool = True) -> Measurement:
    """Time and memory of fn() on the GPU; with `catch`, a failure becomes Measurement(None, note=reason).

    The first (warmup) call also compiles whatever needs compiling; the memory peak is taken on a warm call.
    """
    try:
        ms = gpu_time_ms(fn, warmup=warmup, reps=reps)
        return Measurement(ms, peak_memory_gib(fn))
    except Exception as exc:  # an anchor that cannot run is reported, not fatal
        if not catch:
            raise
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        return Measurement(None, None, f"n/a: {type(exc).__name__}: {reason}")


def copy_bandwidth_bytes_per_s(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Device-to-device copy rate, counting the bytes read plus the bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = gpu_time_ms(lambda: dst.copy_(src), warmup=2, reps=reps)
    return 2 * nbytes / (ms * 1e-3)


def device_name() -> str:
    """The GPU's name, or "cpu"."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def ratio(numerator: Measurement | float | None, denominator: Measurement | float | None) -> float | None:
    """numerator / denominator in time, None when either did not run."""
    num = numerator.ms if isinstance(numerator, Measurement) else numerator
    den = denominator.ms if isinstance(denominator, Measurement) else denominator
    return None if num is None or den is None or den == 0 else num / den


class ResultTable:
    """Rows of one benchmark suite, rendered as a Markdown table, printed and written to a file.

    The file is $PEC_BENCH_DIR/<name>.md (default: <tmp>/pec_bench/<name>.md); benchmarks/gpu_check.sh
    points PEC_BENCH_DIR at its log folder.
    """

    def __init__(self, name: str):
        self.name = name
        self.rows: list[tuple[str, str, str, str, str]] = []
        self.notes: list[str] = []

    def add(self, case: str, variant: str, m: Measurement, note: str = "") -> None:
        """One timed variant of a case."""
        ms = f"{m.ms:.3f}" if m.ok else "n/a"
        peak = f"{m.peak_gib:.2f}" if m.peak_gib is not None else "-"
        self.rows.append((case, variant, ms, peak, "; ".join(s for s in (m.note, note) if s)))

    def add_ratio(self, case: str, what: str, value: float | None, target: str = "") -> None:
        """A ratio row (e.g. ours/floor) with the target it is held to, written "<= 2x" or ">= 5x"."""
        shown = f"{value:.2f}x" if value is not None else "n/a"
        verdict = ""
        if target and value is not None:
            op, bound = target.split()
            limit = float(bound.rstrip("x"))
            verdict = " (met)" if (value <= limit if op == "<=" else value >= limit) else " (MISSED)"
        self.rows.append((case, what, shown, "-", f"target {target}{verdict}" if target else ""))

    def note(self, text: str) -> None:
        """A line printed under the table (device, bandwidth, how a number was scaled)."""
        self.notes.append(text)

    def render(self) -> str:
        header = ("case", "variant / ratio", "ms or ratio", "peak GiB", "note")
        lines = [f"## {self.name} on {device_name()}, torch {torch.__version__}", "",
                 "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def write(self) -> str:
        """Print the table and write it to its file; return the file's path."""
        out_dir = os.environ.get("PEC_BENCH_DIR") or os.path.join(tempfile.gettempdir(), "pec_bench")
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"{self.name}.md")
        text = self.render()
        with open(path, "w") as f:
            f.write(text)
        print("\n" + text + f"(written to {path})", flush=True)
        return path


def run_benchmark(benchmark, fn: Callable[[], object], *, rounds: int = 3, warmup_rounds: int = 1) -> None:
    """Time fn with pytest-benchmark's wall clock, synchronising inside each round."""

    def synced() -> None:
        fn()
        sync()

    benchmark.pedantic(synced, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
