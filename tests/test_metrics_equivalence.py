"""Every kind of run trains as it did before the trainer was restructured into phases and algorithms: the
cases of tools/metrics_equivalence.py (every regulariser, the KL, Clip-Higher, SDE kinds and windows, CFG,
full fine-tuning, several minibatches, batch scope and bank, PCGS's forms) replayed in this process and
compared with the rows recorded from the version before (tests/data/metrics_before_algorithms.json) on
every key but time/*, at rtol 1e-6: CI may run on another CPU, which rounds differently. The bit-for-bit
comparison of two commits on one machine is `python tools/metrics_equivalence.py compare OLD NEW`."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import metrics_equivalence  # noqa: E402

RECORDED = Path(__file__).parent / "data" / "metrics_before_algorithms.json"


@pytest.fixture(scope="module")
def recorded():
    return json.loads(RECORDED.read_text())


def test_every_case_was_recorded(recorded):
    assert sorted(recorded) == sorted(metrics_equivalence.CASES)


@pytest.mark.parametrize("name", sorted(metrics_equivalence.CASES))
def test_a_run_trains_as_before_the_restructuring(recorded, tmp_path, name):
    rows = metrics_equivalence.run_case(name, tmp_path / name)
    assert metrics_equivalence.differences({name: recorded[name]}, {name: rows}, rtol=1e-6) == []


def test_the_comparison_sees_a_difference():
    old = {"a": [{"step": 1, "loss": 1.0, "kl": float("nan")}]}
    assert metrics_equivalence.differences(old, {"a": [{"step": 1, "loss": 1.0, "kl": float("nan")}]}) == []
    assert metrics_equivalence.differences(old, {"a": [{"step": 1, "loss": 1.0 + 1e-9, "kl": float("nan")}]})
    assert metrics_equivalence.differences(old, {"a": [{"step": 1, "loss": 1.0 + 1e-9, "kl": float("nan")}]},
                                           rtol=1e-6) == []
    assert metrics_equivalence.differences(old, {"a": [{"step": 1, "loss": 1.0}]})
