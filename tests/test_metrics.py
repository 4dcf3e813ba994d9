"""Diversity / fidelity metrics and the paper's min-max table."""
import math

import pytest
import torch

from pec.metrics import (mean_pairwise_distance, minmax_table, precision_recall_coverage, table_markdown,
                         table_rows, vendi_score)


def test_mean_pairwise_distance_against_loop():
    x = torch.randn(7, 5)
    ref = sum((x[i] - x[j]).norm().item() for i in range(7) for j in range(i + 1, 7)) / 21
    assert mean_pairwise_distance(x) == pytest.approx(ref, rel=1e-6)
    assert mean_pairwise_distance(torch.ones(4, 3)) == pytest.approx(0.0, abs=1e-6)


def test_vendi_score_limits():
    assert vendi_score(torch.ones(6, 4)) == pytest.approx(1.0, abs=1e-6)  # all identical: one "mode"
    assert vendi_score(torch.eye(5)) == pytest.approx(5.0, rel=1e-6)  # orthogonal: n modes
    two_modes = torch.cat([torch.tensor([[1.0, 0.0]]).repeat(3, 1), torch.tensor([[0.0, 1.0]]).repeat(3, 1)])
    assert vendi_score(two_modes) == pytest.approx(2.0, rel=1e-6)


def test_precision_recall_coverage():
    real = torch.randn(200, 2)
    same = precision_recall_coverage(real, torch.randn(200, 2), k=5)
    assert same.precision > 0.8 and same.recall > 0.8 and same.coverage > 0.8
    collapsed = precision_recall_coverage(real, torch.randn(200, 2) * 0.05, k=5)
    assert collapsed.precision > 0.9 and collapsed.recall < 0.3 and collapsed.coverage < 0.3
    far = precision_recall_coverage(real, torch.randn(200, 2) + 20, k=5)
    assert far.precision == 0.0 and far.coverage == 0.0


def test_minmax_table_reproduces_paper_rows():
    # Three rows of the paper's Table 1 (notes/paper.md 6.3), normalised among themselves.
    q = ["ps", "aes"]
    d = ["dino", "vs"]
    values = {"flux": {"ps": 0.226, "aes": 5.837, "dino": 104.76, "vs": 13.45},
              "grpo": {"ps": 0.243, "aes": 6.305, "dino": 84.17, "vs": 7.18},
              "pec": {"ps": 0.240, "aes": 6.412, "dino": 105.01, "vs": 10.73}}
    t = minmax_table(values, q, d)
    z_ps_pec = (0.240 - 0.226) / (0.243 - 0.226)
    assert t.quality_avg["pec"] == pytest.approx((z_ps_pec + 1.0) / 2)
    assert t.quality_avg["flux"] == 0.0 and t.diversity_avg["grpo"] == 0.0
    z_vs_pec = (10.73 - 7.18) / (13.45 - 7.18)
    assert t.diversity_avg["pec"] == pytest.approx((1.0 + z_vs_pec) / 2)
    for r in values:
        assert t.overall[r] == pytest.approx((t.quality_avg[r] + t.diversity_avg[r]) / 2)
    md = table_markdown(t)
    assert md.count("\n") == 5 and "Overall" in md
    rows = table_rows(t)
    assert rows[2]["run"] == "pec" and math.isclose(rows[2]["overall"], t.overall["pec"])


def test_minmax_table_constant_column_and_bad_input():
    t = minmax_table({"a": {"q": 1.0, "d": 2.0}, "b": {"q": 1.0, "d": 3.0}}, ["q"], ["d"])
    assert t.quality_avg == {"a": 0.0, "b": 0.0}
    with pytest.raises(ValueError, match="lacks"):
        minmax_table({"a": {"q": 1.0}}, ["q"], ["d"])
    with pytest.raises(ValueError, match="lacks"):
        minmax_table({"a": {"q": float("nan"), "d": 1.0}}, ["q"], ["d"])
