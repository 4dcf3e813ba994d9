"""Paired verdicts over seeds (pec.experiments.verdicts) on synthetic per-seed values."""
import math

import numpy as np
import pytest

from pec.experiments.verdicts import (DOES_NOT_HOLD, HOLDS, PAPER_BASELINES, UNDECIDED, frontier_claim, paired_verdict,
                                      paper_subset, table_claim, table_claim_full_and_subset,
                                      verdict_from_differences)

SEEDS = (0, 1, 2)


def _values(mean, jitter):
    return {s: mean + j for s, j in zip(SEEDS, jitter)}


def test_mean_and_standard_error_are_those_of_the_paired_differences():
    a, b = _values(1.0, [0.1, -0.2, 0.3]), _values(0.2, [0.4, 0.0, -0.1])
    v = paired_verdict(a, b)
    d = np.array([a[s] - b[s] for s in SEEDS])
    assert v.differences == pytest.approx({s: a[s] - b[s] for s in SEEDS})
    assert v.mean == pytest.approx(d.mean()) and v.se == pytest.approx(d.std(ddof=1) / math.sqrt(len(d)))


def test_clear_win_holds_clear_loss_does_not_and_the_sign_is_the_claims():
    b = _values(0.40, [0.02, -0.03, 0.01])
    a = _values(0.60, [0.03, -0.02, 0.00])  # PEC above GRPO in every seed by ~0.2, seed spread ~0.02
    assert paired_verdict(a, b).verdict == HOLDS
    assert paired_verdict(b, a).verdict == DOES_NOT_HOLD  # the claim is always "first > second"


def test_noise_is_undecided():
    a = _values(0.5, [0.10, -0.12, 0.05])
    b = _values(0.5, [-0.04, 0.08, 0.01])
    assert paired_verdict(a, b).verdict == UNDECIDED
    assert paired_verdict(b, a).verdict == UNDECIDED


def test_identical_methods_do_not_hold_a_strict_claim():
    # e.g. the analytic entropy bonus is GRPO by construction: a tie contradicts "higher"
    grpo = _values(0.46, [0.01, -0.07, 0.05])
    v = paired_verdict(dict(grpo), grpo)
    assert v.verdict == DOES_NOT_HOLD and v.mean == 0.0 and v.se == 0.0


def test_one_seed_is_always_undecided():
    for diff in (5.0, -5.0, 0.0):
        v = verdict_from_differences({0: diff})
        assert v.verdict == UNDECIDED and math.isnan(v.se)
        assert "no seed noise estimate" in v.describe()


def test_the_threshold_is_two_standard_errors_and_strict():
    # two seeds d = (x, y): mean (x + y) / 2, se |x - y| / 2
    assert verdict_from_differences({0: 1.0, 1: 3.0}).verdict == UNDECIDED  # mean - 2 se = 0 exactly
    assert verdict_from_differences({0: 1.0, 1: 2.0}).verdict == HOLDS      # mean - 2 se = 0.5
    assert verdict_from_differences({0: -1.0, 1: -3.0}).verdict == DOES_NOT_HOLD  # mean + 2 se = 0


def test_a_bound_within_half_an_se_of_zero_is_fragile_and_does_not_firmly_hold():
    # two seeds d = (x, y): mean (x + y) / 2, se |x - y| / 2
    fragile = verdict_from_differences({0: 1.0, 1: 2.5})  # mean - 2 se = 0.25 < se / 2 = 0.375
    assert fragile.verdict == HOLDS and fragile.fragile and not fragile.firmly_holds
    assert "holds (fragile)" in fragile.describe()
    firm = verdict_from_differences({0: 1.0, 1: 2.0})  # mean - 2 se = 0.5 >= se / 2 = 0.25
    assert firm.verdict == HOLDS and not firm.fragile and firm.firmly_holds
    near_loss = verdict_from_differences({0: -1.0, 1: -2.5})
    assert near_loss.verdict == DOES_NOT_HOLD and near_loss.fragile and not near_loss.firmly_holds
    assert not verdict_from_differences({0: 1.0}).fragile  # one seed: undecided, never fragile


def test_bad_inputs_raise_naming_the_argument():
    with pytest.raises(ValueError, match="a and b must have the same seeds"):
        paired_verdict({0: 1.0, 1: 2.0}, {0: 1.0, 2: 2.0})
    with pytest.raises(ValueError, match="differences must hold at least one seed"):
        verdict_from_differences({})
    with pytest.raises(ValueError, match="differences must be finite"):
        verdict_from_differences({0: 1.0, 1: float("nan")})


def test_the_frontier_claim_judges_the_per_seed_differences():
    rewards = np.linspace(0.0, 1.0, 6)
    grpo = {s: [(r, 5.0 - 3.0 * r + 0.01 * s) for r in rewards] for s in SEEDS}
    pec = {s: [(r, 5.3 - 2.5 * r - 0.01 * s) for r in rewards[:-1] * 0.9] for s in SEEDS}
    assert frontier_claim(pec, grpo).verdict == HOLDS
    assert frontier_claim(grpo, pec).verdict == DOES_NOT_HOLD
    tangled = {s: [(r, d + (0.6 if s == 1 else -0.3)) for r, d in grpo[s]] for s in SEEDS}  # 2 seeds below, 1 above
    assert frontier_claim(tangled, grpo).verdict == UNDECIDED


def _tables():
    """Per seed: PEC's Overall is above GRPO's among the paper's rows, but an extra row with a
    far larger diversity squeezes the diversity column in the full table and reverses it."""
    tables = {}
    for s, jitter in zip(SEEDS, (0.0, 0.02, -0.02)):
        rows = {name: {"q": 0.8, "d": 0.2} for name in PAPER_BASELINES}
        rows["pretrained"] = {"q": 0.5, "d": 0.4}
        rows["grpo"] = {"q": 1.0, "d": 0.0}
        rows["pec_lambda0.5"] = {"q": 0.6 + jitter, "d": 0.5}
        rows["pcgs_lambda0.5"] = {"q": 0.6, "d": 0.45}
        rows["kl_cov_perceptual"] = {"q": 0.5, "d": 10.0}
        tables[s] = rows
    return tables


def test_a_table_claim_is_judged_in_the_full_table_and_in_the_paper_subset():
    subset = paper_subset("pec_lambda0.5", "pcgs_lambda0.5")
    assert len(subset) == 9 and "kl_cov_perceptual" not in subset
    got = table_claim_full_and_subset(_tables(), ["q"], ["d"], "pec_lambda0.5", "grpo", subset)
    assert got["subset"].verdict == HOLDS         # subset: PEC 0.6 +- 0.02 vs GRPO 0.5
    assert got["full"].verdict == DOES_NOT_HOLD   # full: PEC ~0.125 vs GRPO 0.5
    # each seed is normalised over its own rows: seed 0's subset Overall of PEC is (0.2 + 1) / 2
    assert got["subset"].differences[0] == pytest.approx(0.6 - 0.5)
    quality = table_claim(_tables(), ["q"], ["d"], "grpo", "pec_lambda0.5", subset, score="quality_avg")
    assert quality.verdict == HOLDS


def test_table_claim_rejects_rows_it_cannot_compare():
    tables = _tables()
    with pytest.raises(ValueError, match=r"rows \['clip_higher_x'\] are not in the table of seed 0"):
        table_claim(tables, ["q"], ["d"], "pec_lambda0.5", "grpo", ["grpo", "pec_lambda0.5", "clip_higher_x"])
    with pytest.raises(ValueError, match="higher must be one of the compared rows"):
        table_claim(tables, ["q"], ["d"], "pec_lambda0.25", "grpo", ["grpo", "pretrained"])
    with pytest.raises(ValueError, match="score must be one of"):
        table_claim(tables, ["q"], ["d"], "pec_lambda0.5", "grpo", score="Overall")
