"""Falling back from a backend that fails at run time, for backend="auto".

`auto` orders the backends that take an input (e.g. CUDA, Triton, torch) and runs the first. If a
faster one fails to compile or launch (a Triton compiler error, a CUDA extension that loaded without
its ops, a kernel launch error), the call is rerun on the next one and a RuntimeWarning names the
backend and the error, once: the backend is then skipped by that op for the rest of the process
(`reset_fallbacks()` tries it again; `failed_backends()` lists what was skipped and why). The last
backend of a chain (torch, the reference) is never caught, and neither is running out of memory,
which a slower backend would not cure. An explicitly named backend is a chain of one, so it raises.
Under torch.compile there is no fallback (a try/except around a traced region cannot rerun it): the
first backend runs as is.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

R = TypeVar("R")
#: A chain of backend names, fastest first (each op maps a name to its module).
Chain = Sequence[str]

_failed: dict[tuple[str, str], str] = {}


def failed_backends() -> dict[tuple[str, str], str]:
    """{(op, backend): the error} for every backend that `auto` stopped using in this process."""
    return dict(_failed)


def reset_fallbacks() -> None:
    """Forget the failures: `auto` tries every backend again."""
    _failed.clear()


def usable(op: str, chain: Chain) -> tuple[str, ...]:
    """The chain without the backends that already failed for `op` (never empty: the last one stays)."""
    kept = tuple(name for name in chain if (op, name) not in _failed)
    return kept or tuple(chain[-1:])


def run(op: str, chain: Chain, fn: Callable[[Chain], R]) -> R:
    """fn(chain[i:]) for the first i whose backend, chain[i], does not fail; see the module docstring.

    fn receives the rest of the chain so that it can hand it on (e.g. to an autograd Function, whose
    backward then falls back the same way).
    """
    chain = usable(op, chain)
    for i, name in enumerate(chain):
        if i == len(chain) - 1 or torch.compiler.is_compiling():
            return fn(chain[i:])
        try:
            return fn(chain[i:])
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # compile/launch failure of an optional backend: rerun on the next
            _record(op, name, exc, chain[i + 1])
    raise AssertionError("unreachable: the last backend's call returns or raises")


def _record(op: str, name: str, exc: BaseException, next_name: str) -> None:
    lines = str(exc).strip().splitlines()
    reason = f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"
    _failed[(op, name)] = reason
    warnings.warn(f"pec_kernels.{op}: backend {name!r} failed ({reason}); rerunning on {next_name!r}, and "
                  f"using it instead of {name!r} for the rest of this process "
                  "(pec_kernels.reset_fallbacks() retries)", RuntimeWarning, stacklevel=4)
