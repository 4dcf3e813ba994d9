"""The "at equal reward" frontier comparison (pec.experiments.frontier) on synthetic milestone curves."""
import numpy as np
import pytest

from pec.experiments.frontier import (N_LEVELS, envelope_at, frontier_difference, frontier_differences,
                                      overlap_levels, plot_frontiers, upper_envelope)


def _line(intercept, slope, rewards):
    """Milestones on diversity = intercept + slope * reward, in a scrambled order."""
    rewards = np.asarray(rewards, dtype=float)
    order = np.random.default_rng(0).permutation(len(rewards))
    return [(r, intercept + slope * r) for r in rewards[order]]


def test_linear_curves_give_the_exact_mean_difference_over_the_overlap():
    ia, sa, ib, sb = 4.0, -1.0, 3.0, -2.0
    a = _line(ia, sa, np.linspace(0.0, 2.0, 6))           # milestones do not fall on the levels
    b = _line(ib, sb, [0.5, 1.1, 2.9, 3.0])
    lo, hi = 0.5, 2.0                                      # overlap of [0, 2] and [0.5, 3]
    levels = overlap_levels(a, b)
    assert len(levels) == N_LEVELS and levels[0] == lo and levels[-1] == hi
    # the difference is linear in reward, so its mean over evenly spaced levels is its value at the midpoint
    expected = (ia - ib) + (sa - sb) * (lo + hi) / 2
    assert frontier_difference(a, b) == pytest.approx(expected, abs=1e-12)
    assert frontier_difference(b, a) == pytest.approx(-expected, abs=1e-12)
    np.testing.assert_allclose(envelope_at(a, levels), ia + sa * levels, atol=1e-12)


def test_per_seed_differences_are_paired_by_seed():
    offsets = {0: 0.3, 1: -0.1, 7: 0.05}
    base = {s: _line(5.0, -1.5 - 0.1 * i, np.linspace(0.1 * i, 2.0, 5)) for i, s in enumerate(offsets)}
    shifted = {s: [(r, d + offsets[s]) for r, d in base[s]] for s in offsets}
    got = frontier_differences(shifted, base)
    assert set(got) == set(offsets)
    for s, off in offsets.items():
        assert got[s] == pytest.approx(off, abs=1e-12)
    with pytest.raises(ValueError, match="curves_a and curves_b must have the same seeds"):
        frontier_differences(shifted, {0: base[0], 1: base[1]})
    with pytest.raises(ValueError, match=r"curves_b\[1\].*at least 2"):
        frontier_differences(shifted, {**base, 1: [(0.5, 1.0)]})


@pytest.mark.parametrize("b, match", [
    ([(3.0, 1.0), (4.0, 0.0)], "overlapping reward ranges"),      # disjoint
    ([(2.0, 1.0), (4.0, 0.0)], "overlapping reward ranges"),      # touching at one reward: no width
    ([(1.0, 1.0), (1.0, 0.5)], "overlapping reward ranges"),      # a single reward
    ([(1.0, 1.0)], "curve_b must hold at least 2"),
    ([(1.0, 1.0), (1.5, float("nan"))], "curve_b must hold finite"),
    ([1.0, 2.0, 3.0], "curve_b must be a sequence of"),
])
def test_bad_curves_raise_naming_the_argument(b, match):
    a = [(0.0, 2.0), (2.0, 1.0)]
    with pytest.raises(ValueError, match=match):
        frontier_difference(a, b)


def test_levels_outside_the_range_and_too_few_levels_raise():
    a = [(0.0, 2.0), (2.0, 1.0)]
    with pytest.raises(ValueError, match="n_levels must be >= 2"):
        frontier_difference(a, a, n_levels=1)
    with pytest.raises(ValueError, match="levels must lie in curve's reward range"):
        envelope_at(a, [2.5])


def test_envelope_knots_are_the_best_diversity_at_or_above_their_reward():
    rng = np.random.default_rng(1)
    for _ in range(20):
        pts = np.round(rng.normal(size=(9, 2)), 1)         # rounding makes ties in reward likely
        rewards, env = upper_envelope(pts)
        assert np.all(np.diff(rewards) > 0) and np.all(np.diff(env) <= 0)
        assert rewards[0] == pts[:, 0].min() and rewards[-1] == pts[:, 0].max()
        best_at_or_above = lambda r: pts[pts[:, 0] >= r, 1].max()  # noqa: E731
        np.testing.assert_array_equal(env, [best_at_or_above(r) for r in rewards])
        between = np.unique(pts[:, 0])
        assert np.all(envelope_at(pts, between) >= [best_at_or_above(r) for r in between])


def test_non_monotone_curves_use_the_envelope_not_the_last_checkpoint():
    clean = _line(4.0, -1.0, [0.0, 1.0, 2.0, 3.0])
    # the same run, then late milestones that fell back in reward and collapsed in diversity: each is
    # beaten in both by an earlier milestone, so the frontier is unchanged, between knots too
    hacked = clean + [(1.5, 0.2), (2.5, 0.8), (2.0, 0.5)]
    assert frontier_difference(hacked, clean) == pytest.approx(0.0, abs=1e-12)
    # an early milestone that gained reward and diversity together: lower rewards are credited with
    # the later, more diverse point (flat), everything above it is unchanged
    dip = [(0.0, 1.0), (1.0, 2.0), (2.0, 1.0), (3.0, 0.0)]
    levels = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0])
    np.testing.assert_allclose(envelope_at(dip, levels), [2.0, 2.0, 2.0, 1.5, 1.0, 0.0])


def test_plot_writes_a_png_with_both_reward_panels(tmp_path):
    curves = {m: {s: _line(3.0 + off + 0.1 * s, -1.0, np.linspace(0.0, 2.0 + 0.2 * s, 5)) for s in range(3)}
              for m, off in (("grpo", 0.0), ("pec", 0.5))}
    curves["lonely"] = {0: [(0.0, 1.0), (0.5, 0.9)], 1: [(1.0, 1.0), (1.5, 0.5)]}  # seeds share no range
    path = tmp_path / "frontier.png"
    plot_frontiers({"gold reward": curves, "training reward": curves}, path, title="synthetic")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="panels must hold at least one"):
        plot_frontiers({}, tmp_path / "none.png")
