"""The trainer's host synchronisations, named in one place.

A training step reads device values on the host at exactly these points, each wrapped in
`documented_sync`, and nowhere else (a GPU test runs a step under
`torch.cuda.set_sync_debug_mode("error")`, which these contexts lift):
- the validity mask of the step (`pec.run_safety`), once per step: which samples and groups count
  decides the shape of the masked entropy computations;
- the finiteness decision of each optimizer update (loss and gradient norm), once per update;
- the logged scalars, once per step, in one read.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def documented_sync() -> Iterator[None]:
    """A region allowed to synchronise with the device, even under sync debug mode "error"."""
    if not torch.cuda.is_available():
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
