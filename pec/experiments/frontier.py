"""Reward-diversity frontiers from milestone evaluations, and the "at equal reward" comparison (issue 13).

A curve is one training run (one method, one seed) evaluated at milestone checkpoints: a sequence of
(reward, diversity) points, e.g. every 20% of the run plus the pretrained start. Two methods are
compared at equal reward, per seed: both curves are read at `n_levels` reward levels spread evenly
over the overlap of their reward ranges, and the paired differences are averaged over the levels.
`pec.experiments.verdicts` then judges the per-seed differences over seeds.

Non-monotone curves: a run's reward need not rise at every milestone (noise, or a gold reward that
falls back while the policy hacks the training one), so (reward, diversity) is not a function of
reward. Each curve is read through its *upper (Pareto) envelope*: the milestones that no other
milestone matches in both reward and diversity, linear in reward between them, and flat at the most
diverse milestone's diversity below its reward. Why this rule rather than sorting the points by reward:
- it is what early stopping can reach: at each knot some milestone has at least that reward and
  that diversity, so a method is credited with its best checkpoint, not its last;
- it treats both methods alike, so it is conservative for a claim "A keeps more diversity than B":
  B's late collapsed checkpoints (reward hacking) do not pull B's curve down at a reward it had
  already reached with more diversity, which sorting would do (and would zigzag through them);
- it is a function of reward (non-increasing), so reading it at a level is well defined, and a
  dominated milestone changes nothing (not even the interpolation between its neighbours).
Its costs: with noisy evaluations the best of several milestones is biased upwards, equally for
methods evaluated at the same number of milestones; and a milestone that lies below the line between
its neighbours yet is beaten in both by no single milestone is a knot, so it still counts. A curve
whose diversity falls as its reward rises (the usual case, e.g. linear) is its own envelope, so it
is read exactly.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pec.logging_utils import plt, save_figure

Curve = Sequence[tuple[float, float]]  # (reward, diversity) at each milestone, in any order
N_LEVELS = 10


def _points(curve: Curve | np.ndarray, name: str) -> np.ndarray:
    """`curve` as a float (n, 2) array of finite (reward, diversity) rows with n >= 2."""
    pts = np.asarray(curve, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"{name} must be a sequence of (reward, diversity) pairs, got shape {pts.shape}")
    if pts.shape[0] < 2:
        raise ValueError(f"{name} must hold at least 2 milestone points, got {pts.shape[0]}")
    if not np.isfinite(pts).all():
        raise ValueError(f"{name} must hold finite rewards and diversities")
    return pts


def upper_envelope(curve: Curve | np.ndarray, name: str = "curve") -> tuple[np.ndarray, np.ndarray]:
    """The knots of the curve's upper envelope (see the module notes), rewards ascending, diversities
    decreasing: the non-dominated milestones, preceded by (lowest reward, highest diversity) when the
    most diverse milestone is not the lowest in reward. At each knot's reward r its diversity is the
    largest among the milestones with reward >= r."""
    pts = _points(curve, name)
    pts = pts[np.lexsort((-pts[:, 1], pts[:, 0]))]  # ascending reward, ties most diverse first
    rewards, first = np.unique(pts[:, 0], return_index=True)
    div = pts[first, 1]
    later_best = np.append(np.maximum.accumulate(div[::-1])[::-1][1:], -np.inf)
    keep = div > later_best  # nothing at a higher reward is at least as diverse
    knots_r, knots_d = rewards[keep], div[keep]
    if rewards[0] < knots_r[0]:
        knots_r, knots_d = np.insert(knots_r, 0, rewards[0]), np.insert(knots_d, 0, knots_d[0])
    return knots_r, knots_d


def envelope_at(curve: Curve | np.ndarray, levels: Sequence[float] | np.ndarray, name: str = "curve") -> np.ndarray:
    """The upper envelope read at reward `levels` (linear between its knots); every level must lie
    inside the curve's reward range."""
    rewards, env = upper_envelope(curve, name)
    lv = np.asarray(levels, dtype=np.float64)
    if lv.size and (lv.min() < rewards[0] or lv.max() > rewards[-1]):
        raise ValueError(f"levels must lie in {name}'s reward range [{rewards[0]:.6g}, {rewards[-1]:.6g}], "
                         f"got [{lv.min():.6g}, {lv.max():.6g}]")
    return np.interp(lv, rewards, env)


def overlap_levels(curve_a: Curve | np.ndarray, curve_b: Curve | np.ndarray, n_levels: int = N_LEVELS,
                   names: tuple[str, str] = ("curve_a", "curve_b")) -> np.ndarray:
    """`n_levels` rewards evenly spaced over the overlap of two curves' reward ranges, both ends included."""
    if n_levels < 2:
        raise ValueError(f"n_levels must be >= 2, got {n_levels}")
    a, b = _points(curve_a, names[0]), _points(curve_b, names[1])
    lo = max(a[:, 0].min(), b[:, 0].min())
    hi = min(a[:, 0].max(), b[:, 0].max())
    if not hi > lo:
        raise ValueError(f"{names[0]} and {names[1]} must have overlapping reward ranges, got "
                         f"[{a[:, 0].min():.6g}, {a[:, 0].max():.6g}] and [{b[:, 0].min():.6g}, {b[:, 0].max():.6g}]")
    return np.linspace(lo, hi, n_levels)


def _difference(curve_a: Curve | np.ndarray, curve_b: Curve | np.ndarray, n_levels: int,
                names: tuple[str, str], top: int | None = None) -> float:
    if top is not None and not 1 <= top <= n_levels:
        raise ValueError(f"top must be in [1, n_levels={n_levels}], got {top}")
    levels = overlap_levels(curve_a, curve_b, n_levels, names)[-(top or n_levels):]
    diff = envelope_at(curve_a, levels, names[0]) - envelope_at(curve_b, levels, names[1])
    return float(diff.mean())


def frontier_difference(curve_a: Curve | np.ndarray, curve_b: Curve | np.ndarray, n_levels: int = N_LEVELS,
                        top: int | None = None) -> float:
    """Mean over `n_levels` shared reward levels (or over the highest `top` of them: the high-reward end,
    where the whole-range mean is diluted by the low end every curve starts from) of diversity(a) -
    diversity(b), both read through their upper envelopes: > 0 means `a` keeps more diversity than `b`
    at equal reward (one seed)."""
    return _difference(curve_a, curve_b, n_levels, ("curve_a", "curve_b"), top)


def frontier_differences(curves_a: Mapping[int, Curve], curves_b: Mapping[int, Curve],
                         n_levels: int = N_LEVELS, top: int | None = None) -> dict[int, float]:
    """`frontier_difference` (with its `top`) per seed: seed -> mean diversity(a) - diversity(b) at equal reward. The two
    methods must have been run on the same seeds (paired comparison)."""
    if not curves_a:
        raise ValueError("curves_a must hold at least one seed")
    if set(curves_a) != set(curves_b):
        raise ValueError(f"curves_a and curves_b must have the same seeds, got {sorted(curves_a)} and "
                         f"{sorted(curves_b)}")
    return {seed: _difference(curves_a[seed], curves_b[seed], n_levels,
                              (f"curves_a[{seed!r}]", f"curves_b[{seed!r}]"), top)
            for seed in curves_a}


def plot_frontiers(panels: Mapping[str, Mapping[str, Mapping[int, Curve]]], path: str | Path,
                   diversity_label: str = "held-out diversity", title: str = "", grid: int = 50) -> None:
    """Save reward-vs-diversity frontiers as a PNG, one panel per reward (e.g. {"gold reward": ...,
    "training reward": ...}), each panel mapping method -> seed -> curve.

    Per method: the milestones as dots, the mean over seeds of the upper envelopes (the curves the
    comparison reads) over the reward range all its seeds share, and the seeds' min-max spread shaded.
    A method whose seeds share no reward range shows each seed's envelope instead of a mean.
    """
    if not panels:
        raise ValueError("panels must hold at least one reward panel")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.8), squeeze=False)
    for ax, (reward_label, methods) in zip(axes[0], panels.items()):
        if not methods:
            raise ValueError(f"panels[{reward_label!r}] must hold at least one method")
        for i, (method, seeds) in enumerate(methods.items()):
            if not seeds:
                raise ValueError(f"panels[{reward_label!r}][{method!r}] must hold at least one seed")
            color = f"C{i % 10}"
            pts = {s: _points(c, f"panels[{reward_label!r}][{method!r}][{s!r}]") for s, c in seeds.items()}
            for p in pts.values():
                ax.scatter(p[:, 0], p[:, 1], s=10, color=color, alpha=0.5)
            lo = max(p[:, 0].min() for p in pts.values())
            hi = min(p[:, 0].max() for p in pts.values())
            if hi > lo:
                levels = np.linspace(lo, hi, grid)
                env = np.stack([envelope_at(p, levels) for p in pts.values()])
                ax.plot(levels, env.mean(0), color=color, label=f"{method} ({len(pts)} seeds)")
                ax.fill_between(levels, env.min(0), env.max(0), color=color, alpha=0.2, linewidth=0)
            else:
                for j, p in enumerate(pts.values()):
                    rewards, env_pts = upper_envelope(p)
                    ax.plot(rewards, env_pts, color=color, alpha=0.6, label=method if j == 0 else None)
        ax.set_xlabel(reward_label)
        ax.set_ylabel(diversity_label)
        ax.legend(fontsize=7)
    save_figure(fig, path, title)
