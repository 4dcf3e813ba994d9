"""The trainer's host synchronisations, named in one place.

A training step reads device values on the host at exactly these points, each wrapped in
`documented_sync`, and nowhere else (a GPU test runs a step under
`torch.cuda.set_sync_debug_mode("error")`, which these contexts lift):
- the decision of each optimizer update, once per update, in one read: whether its loss and gradient
  norm are finite and whether its minibatch (and the step) holds a valid sample;
- the logged scalars, once per step, in one read;
- with `--method diverse_grpo`, torch's convergence check of the step's one batched `torch.linalg.eigh` (all
  groups' Laplacians at once, `pec.methods.spectral`): torch offers no unchecked eigh on a GPU.
The step's validity mask (`pec.run_safety`) is never read on the host: the entropy estimators, the
diversity metric, the advantages and the losses take it on the device as a mask of fixed shape.
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
