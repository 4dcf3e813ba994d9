"""Paired verdicts over seeds: does a claim "A is higher than B" hold (issue 13, item 5)?

Every method runs on the same seeds, so the comparison is paired: d_s = a_s - b_s per seed s, with
mean m and standard error se = sd(d) / sqrt(n) (sample sd, n - 1 in the denominator). Sign
convention: the claim is always "a > b" (e.g. a = PEC's Overall, b = GRPO's; or the frontier
difference PEC - GRPO against 0); for a claim that something is lower, pass the arguments swapped.
- "holds":          m - 2 se > 0, the whole interval m +- 2 se is above 0;
- "does not hold":  m + 2 se <= 0, the interval is at or below 0. This includes identical methods
                    (every d_s = 0, so se = 0): a tie contradicts a strict "higher" claim, e.g. the
                    analytic entropy bonus, which is GRPO by construction, does not beat GRPO;
- "undecided":      otherwise, the interval straddles 0 (a difference within the seed noise);
- one seed:         always "undecided", whatever d is, since one seed cannot estimate the seed noise.
- fragile:          a verdict whose deciding bound lies within half an SE of the threshold,
                    |m - 2 se| < se / 2 or |m + 2 se| < se / 2: another machine's rounding (RL amplifies
                    it) can move it across, so the report marks it. One seed, or se = 0, is never fragile.
                    A claim counts a verdict as holding only when it holds and is not fragile (`firmly_holds`):
                    a fragile "holds" is read as undecided.
Differences are taken as given, with no tolerance: runs that differ only by floating-point noise are
judged on that noise (a constant difference of 1e-12 in every seed "holds").
Two standard errors is the issue's rule, not a 95% interval: with 3 seeds (2 degrees of freedom)
m +- 2 se covers the true mean difference only ~82% of the time (the t quantile is 4.30), and with
2 seeds ~70%. Many verdicts from 3 seeds will be "undecided"; they are reported as such.

Min-max normalised scores (`pec.metrics.minmax_table`) depend on which rows are compared, so a table
claim is judged per seed on that seed's own normalisation, both in the full table and in a row subset
(the paper's own rows, `paper_subset`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pec.experiments.frontier import N_LEVELS, Curve, frontier_differences
from pec.metrics import minmax_table

HOLDS, DOES_NOT_HOLD, UNDECIDED = "holds", "does not hold", "undecided"
# The paper's table rows other than PEC and PCGS, by this project's run names.
PAPER_BASELINES = ("pretrained", "grpo", "grpo_kl", "entropy_bonus", "clip_higher", "clip_cov", "kl_cov")
SCORES = ("overall", "quality_avg", "diversity_avg")


@dataclass(frozen=True)
class PairedVerdict:
    """A paired claim "a > b" judged over seeds: the verdict, the per-seed differences a - b, their
    mean and the standard error of that mean (nan for one seed)."""

    verdict: str
    differences: dict[int, float]
    mean: float
    se: float

    @property
    def fragile(self) -> bool:
        """Whether a bound of the interval lies within half an SE of 0 (the module's rule)."""
        if not self.se > 0:  # one seed (nan) or identical runs (0)
            return False
        return min(abs(self.mean - 2 * self.se), abs(self.mean + 2 * self.se)) < self.se / 2

    @property
    def firmly_holds(self) -> bool:
        """Whether the verdict holds and is not fragile: what a claim may count as holding."""
        return self.verdict == HOLDS and not self.fragile

    def describe(self, digits: int = 3) -> str:
        """One line for a report, e.g. 'holds: mean a - b +0.031, 2 se 0.012 (3 seeds: ...)'."""
        n = len(self.differences)
        seeds = ", ".join(f"{d:+.{digits}f}" for d in self.differences.values())
        spread = "no seed noise estimate" if n < 2 else f"2 se {2 * self.se:.{digits}f}"
        flag = " (fragile)" if self.fragile else ""
        return (f"{self.verdict}{flag}: mean a - b {self.mean:+.{digits}f}, {spread} ({n} seed{'s' * (n != 1)}: "
                f"{seeds})")


def verdict_from_differences(differences: Mapping[int, float]) -> PairedVerdict:
    """Judge "a > b" from per-seed differences a - b (seed -> difference) with the module's rule."""
    if not differences:
        raise ValueError("differences must hold at least one seed")
    d = {seed: float(v) for seed, v in differences.items()}
    if not all(math.isfinite(v) for v in d.values()):
        raise ValueError(f"differences must be finite, got {d}")
    n = len(d)
    mean = sum(d.values()) / n
    if n == 1:
        return PairedVerdict(UNDECIDED, d, mean, math.nan)
    se = math.sqrt(sum((v - mean) ** 2 for v in d.values()) / (n - 1) / n)
    verdict = HOLDS if mean - 2 * se > 0 else DOES_NOT_HOLD if mean + 2 * se <= 0 else UNDECIDED
    return PairedVerdict(verdict, d, mean, se)


def paired_verdict(a: Mapping[int, float], b: Mapping[int, float]) -> PairedVerdict:
    """Judge "a > b" from two methods' per-seed values (seed -> value, the same seeds in both)."""
    if set(a) != set(b):
        raise ValueError(f"a and b must have the same seeds, got {sorted(a)} and {sorted(b)}")
    return verdict_from_differences({seed: a[seed] - b[seed] for seed in a})


def frontier_claim(curves_a: Mapping[int, Curve], curves_b: Mapping[int, Curve],
                   n_levels: int = N_LEVELS, top: int | None = None) -> PairedVerdict:
    """Judge "a keeps more diversity than b at equal reward" over seeds: the per-seed frontier
    differences (`pec.experiments.frontier.frontier_differences`, over the highest `top` levels when
    given) against 0."""
    return verdict_from_differences(frontier_differences(curves_a, curves_b, n_levels, top))


def paper_subset(pec_row: str, pcgs_row: str, baselines: Sequence[str] = PAPER_BASELINES) -> list[str]:
    """The paper's own rows: its baselines (pretrained, GRPO, GRPO + KL, entropy, Clip-Higher, Clip-Cov,
    KL-Cov) plus one PEC and one PCGS row, the ones chosen to stand for the paper's."""
    return [*baselines, pec_row, pcgs_row]


def table_claim(tables: Mapping[int, Mapping[str, Mapping[str, float]]], quality: Sequence[str],
                diversity: Sequence[str], higher: str, lower: str, rows: Sequence[str] | None = None,
                score: str = "overall") -> PairedVerdict:
    """Judge "row `higher` scores above row `lower`" over seeds, each seed min-max normalised over
    `rows` of its own table (None: every row). `tables`: seed -> row -> column -> raw value; `score`:
    one of SCORES (the attributes of `pec.metrics.NormalisedTable`)."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if not tables:
        raise ValueError("tables must hold at least one seed")
    scores_higher, scores_lower = {}, {}
    for seed, table in tables.items():
        names = list(table) if rows is None else list(rows)
        missing = [r for r in names if r not in table]
        if missing:
            raise ValueError(f"rows {missing} are not in the table of seed {seed!r} (rows: {list(table)})")
        for arg, row in (("higher", higher), ("lower", lower)):
            if row not in names:
                raise ValueError(f"{arg} must be one of the compared rows {names}, got {row!r}")
        normalised = getattr(minmax_table({r: table[r] for r in names}, quality, diversity), score)
        scores_higher[seed], scores_lower[seed] = normalised[higher], normalised[lower]
    return paired_verdict(scores_higher, scores_lower)


def table_claim_full_and_subset(tables: Mapping[int, Mapping[str, Mapping[str, float]]], quality: Sequence[str],
                                diversity: Sequence[str], higher: str, lower: str, subset: Sequence[str],
                                score: str = "overall") -> dict[str, PairedVerdict]:
    """`table_claim` in the full table and in the row `subset` (e.g. `paper_subset(...)`):
    {"full": verdict, "subset": verdict}. Both are reported since they can disagree."""
    return {"full": table_claim(tables, quality, diversity, higher, lower, None, score),
            "subset": table_claim(tables, quality, diversity, higher, lower, subset, score)}
