"""pytest configuration of the benchmark suites: `pytest benchmarks/ --benchmark-only`.

Collects bench_*.py files, skips cases marked `gpu` without a CUDA device (tests/conftest.py does the
same for the tests, but does not apply here), and gives each suite module one ResultTable that is
printed and written to $PEC_BENCH_DIR when the module's cases are done.
"""
from __future__ import annotations

import pytest
import torch

from _timing import ResultTable


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def result_table(request):
    """The module's ResultTable, named after the module (bench_knn -> bench_knn.md)."""
    table = ResultTable(request.module.__name__)
    yield table
    if table.rows:
        table.write()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
