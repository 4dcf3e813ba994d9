"""pytest configuration shared by tests/ and benchmarks/.

Without a CUDA device, Triton runs through its interpreter (TRITON_INTERPRET must be set before triton
decorates the kernels, i.e. before pec_kernels' Triton modules are imported, so it is set here, at
collection time), and anything marked `gpu` is skipped.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
