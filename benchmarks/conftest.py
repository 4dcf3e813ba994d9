"""pytest configuration of the benchmark suites: `pytest benchmarks/ --benchmark-only`.

Collects bench_*.py files and gives each suite module one ResultTable that is printed and written to
$PEC_BENCH_DIR when the module's cases are done. The root conftest.py skips `gpu` cases without CUDA.
"""
from __future__ import annotations

import pytest

from _timing import ResultTable


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest's python plugin already: once is enough.
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="module")
def result_table(request):
    """The module's ResultTable, named after the module (bench_knn -> bench_knn.md)."""
    table = ResultTable(request.module.__name__)
    yield table
    if table.rows:
        table.write()
