"""The paper table's report: tables, frontier plot, sample grids and paired verdicts from the evaluations
that `pec.experiments.paper_table` ran (issue 13).

Where each claim is judged: diversity in the spaces the regulariser did not use (`JUDGE_SPACES`: the
evaluation-only `simclr_eval`, a second SimCLR encoder no run trains against, first; then the classifier
and autoencoder spaces), fidelity (precision, recall, coverage) against held-out digits no model trained
on, and quality with the gold classifier beside the training reward. The regulariser's own space
(`simclr`) is reported apart, never judged on. Verdicts are paired over seeds (`pec.experiments.verdicts`:
mean paired difference against two standard errors).
1. Under GRPO the training reward rises, the policy entropy stays constant and held-out diversity
   falls: reward and entropy from GRPO's metrics.jsonl per seed, diversity as a paired verdict
   "pretrained > GRPO" at the last milestone.
2. At equal reward, PEC and PCGS keep more diversity than GRPO and GRPO + KL: per seed, each curve
   (the pretrained model, then the milestones) is read through its upper envelope at 10 reward levels
   spanning the overlap of the two methods' reward ranges (`pec.experiments.frontier`), and the mean
   paired difference is judged over seeds; with the gold reward (the verdict) and the training reward.
   The "+guidance" readings are sampled differently from their start, so they are in the table only.
3. Overall (min-max over the rows) is higher for PEC than for GRPO, judged per seed on that seed's own
   normalisation, in the full table and in the paper's own row subset.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from pec.atomic import atomic_write_text
from pec.config import PerceptualConfig
from pec.evaluate import PRETRAINED
from pec.experiments.frontier import Curve, plot_frontiers
from pec.experiments.rows import (
    ALIASES,
    GUIDANCE_SUFFIX,
    Mode,
    guided,
    milestone_steps,
    seed_dir,
)
from pec.experiments.verdicts import (
    HOLDS,
    PairedVerdict,
    frontier_claim,
    paired_verdict,
    paper_subset,
    table_claim_full_and_subset,
)
from pec.logging_utils import plt, read_metrics, save_figure
from pec.metrics import NormalisedTable, minmax_table, table_markdown
from pec.perceptual import EVAL_ONLY_SPACES

REGULARISED_SPACE = PerceptualConfig().space  # every row trains with the default regulariser space
# Evaluation-only space first (the held-out diversity), then the other default spaces no regulariser used.
JUDGE_SPACES = (*EVAL_ONLY_SPACES, *(s for s in PerceptualConfig().spaces if s != REGULARISED_SPACE))
HELDOUT_DIVERSITY = f"dist/{JUDGE_SPACES[0]}"
QUALITY = ("digit", "gold", "contrast", "precision")
DIVERSITY = (*(f"dist/{s}" for s in JUDGE_SPACES), *(f"vendi/{s}" for s in JUDGE_SPACES), "recall", "coverage")
BASELINES = ("grpo", "grpo_kl")  # claim 2 compares against these
PCGS_STANDIN = "pcgs_policy"  # the PCGS row in the paper's row subset
FRONTIER_PLOT_ROWS = ("grpo", "grpo_kl", "pec_lambda0.5", "pcgs_policy", "pcgs_guided_w0.05", "clip_higher", "kl_cov")
GRID_ROWS = (PRETRAINED, "grpo", "pec_lambda0.5", "pcgs_policy")
REWARDS = {"gold": "gold reward", "digit": "training reward (digit)"}

Points = dict[int, dict[str, dict[int, dict[str, float]]]]  # seed -> row -> step -> metrics


def regularised(row: str) -> bool:
    """Whether `row` is a PEC or PCGS run (claim 2's rows)."""
    return row.startswith(("pec", "pcgs")) and not row.endswith(GUIDANCE_SUFFIX)


def _read_evaluation(folder: Path) -> dict[int, dict[str, float]]:
    """step -> metrics of one run's milestone evaluation (rows named `<run>@<step>` by `pec.evaluate`)."""
    raw = json.loads((folder / "metrics.json").read_text())
    return {int(name.rpartition("@")[2]): metrics for name, metrics in raw.items()}


def load_points(out: Path, mode: Mode) -> tuple[dict[str, float], Points]:
    """(the pretrained model's metrics, every run's milestone metrics), "+guidance" readings as rows of their
    own and aliases (`ALIASES`) as copies of their run."""
    pretrained = json.loads((out / PRETRAINED / "metrics.json").read_text())[PRETRAINED]
    points: Points = {}
    for seed in mode.seeds:
        runs: dict[str, dict[int, dict[str, float]]] = {}
        for row in mode.rows:
            run = seed_dir(out, seed) / row
            runs[row] = _read_evaluation(run / "eval")
            if guided(row):
                runs[row + GUIDANCE_SUFFIX] = _read_evaluation(run / "eval_guided")
            runs.update({alias: runs[row] for alias, target in ALIASES.items() if target == row})  # next to it
        points[seed] = runs
    return pretrained, points


def final_tables(pretrained: Mapping[str, float], points: Points, last: int) -> dict[int, dict[str, dict[str, float]]]:
    """seed -> row -> metrics at the last milestone, the pretrained model first."""
    return {seed: {PRETRAINED: dict(pretrained), **{row: steps[last] for row, steps in runs.items()}}
            for seed, runs in points.items()}


def curve(pretrained: Mapping[str, float], steps: Mapping[int, Mapping[str, float]], reward: str,
          diversity: str) -> Curve:
    """(reward, diversity) of the pretrained model and then of each milestone."""
    return [(pretrained[reward], pretrained[diversity])] + [(m[reward], m[diversity]) for _, m in sorted(steps.items())]


def curves(pretrained: Mapping[str, float], points: Points, row: str, reward: str, diversity: str) -> dict[int, Curve]:
    """seed -> `curve` of `row`."""
    return {seed: curve(pretrained, runs[row], reward, diversity) for seed, runs in points.items()}


def _stats(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(values) / len(values)
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0)


def mean_table(tables: Sequence[NormalisedTable], names: Sequence[str]) -> str:
    """Markdown of per-seed min-max tables averaged over seeds: raw columns as means, Q-norm, D-norm and Overall
    as mean ± sd (each seed normalised over its own rows)."""
    t0 = tables[0]
    header = ["run", *t0.quality, "Q-norm", *t0.diversity, "D-norm", "Overall"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def pm(values: list[float]) -> str:
        m, sd = _stats(values)
        return f"{m:.3f}" if len(values) == 1 else f"{m:.3f} ± {sd:.3f}"

    def raw(name: str, c: str) -> str:
        return f"{_stats([t.raw[name][c] for t in tables])[0]:.4g}"

    for name in names:
        cells = [name, *(raw(name, c) for c in t0.quality), pm([t.quality_avg[name] for t in tables]),
                 *(raw(name, c) for c in t0.diversity), pm([t.diversity_avg[name] for t in tables]),
                 pm([t.overall[name] for t in tables])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def regulariser_space_table(tables: Mapping[int, Mapping[str, Mapping[str, float]]], names: Sequence[str]) -> str:
    """Markdown of the columns not judged on, mean over seeds: the regulariser's own space, and the gap between
    the training reward and the gold one (reward hacking widens it)."""
    cols = [f"dist/{REGULARISED_SPACE}", f"precision/{REGULARISED_SPACE}", f"recall/{REGULARISED_SPACE}"]
    lines = ["| run | " + " | ".join(cols) + " | digit − gold |", "|" + "---|" * (len(cols) + 2)]
    for name in names:
        values = [_stats([t[name][c] for t in tables.values()])[0] for c in cols]
        gap = _stats([t[name]["digit"] - t[name]["gold"] for t in tables.values()])[0]
        lines.append(f"| {name} | " + " | ".join(f"{v:.4g}" for v in values) + f" | {gap:+.4f} |")
    return "\n".join(lines) + "\n"


def _cell(verdict: PairedVerdict | str) -> str:
    """A verdict as a short table cell: 'holds (+0.41, 2se 0.20)'."""
    if isinstance(verdict, str):
        return verdict
    spread = "" if math.isnan(verdict.se) else f", 2se {2 * verdict.se:.3f}"
    return f"{verdict.verdict} ({verdict.mean:+.3f}{spread})"


def _frontier_verdict(pretrained: Mapping[str, float], points: Points, row: str, base: str, reward: str,
                      diversity: str) -> PairedVerdict | str:
    try:
        return frontier_claim(curves(pretrained, points, row, reward, diversity),
                              curves(pretrained, points, base, reward, diversity))
    except ValueError as err:  # e.g. no shared reward range in some seed
        return f"not comparable ({err})"


def claim_one(out: Path, pretrained: Mapping[str, float], points: Points, last: int) -> tuple[bool, list[str]]:
    """Claim 1 (module docstring): (holds, report lines)."""
    lines, constant_all, rises = [], True, {}
    for seed in points:
        rows = read_metrics(seed_dir(out, seed) / "grpo" / "metrics.jsonl")
        window = max(1, len(rows) // 5)
        first = sum(r["reward_mean"] for r in rows[:window]) / window
        end = sum(r["reward_mean"] for r in rows[-window:]) / window
        entropies = [r["policy_entropy"] for r in rows]
        spread = max(entropies) - min(entropies)
        constant = spread <= 1e-6 * max(1.0, abs(entropies[0]))
        constant_all &= constant
        rises[seed] = (end, first)
        lines.append(f"   - seed {seed}: training reward, first / last {window} steps {first:.4f} -> {end:.4f}; policy "
                     f"entropy {entropies[0]:.6f} over {len(entropies)} steps, max - min {spread:.3g} "
                     f"({'constant' if constant else 'NOT constant'})")
    reward_up = paired_verdict({s: v[0] for s, v in rises.items()}, {s: v[1] for s, v in rises.items()})
    lines.append(f"   - training reward rises (last window > first): {reward_up.describe(4)}")
    gold = paired_verdict({s: r["grpo"][last]["gold"] for s, r in points.items()}, {s: pretrained["gold"] for s in points})
    lines.append(f"   - gold reward rises (GRPO > pretrained, last milestone): {gold.describe(4)}")
    falls = {}
    for space in JUDGE_SPACES:
        key = f"dist/{space}"
        falls[space] = paired_verdict({s: pretrained[key] for s in points}, {s: r["grpo"][last][key] for s, r in points.items()})
        lines.append(f"   - {key} falls (pretrained {pretrained[key]:.4f} > GRPO): {falls[space].describe(4)}")
    holds = constant_all and reward_up.verdict == HOLDS and falls[JUDGE_SPACES[0]].verdict == HOLDS
    return holds, lines


def claim_two(pretrained: Mapping[str, float], points: Points) -> tuple[dict[str, bool], list[str]]:
    """Claim 2 (module docstring): (row -> holds against both baselines with the gold reward in the held-out
    space, report lines: a verdict table, then the other judged spaces)."""
    rows = [r for r in next(iter(points.values())) if regularised(r)]
    bases = [b for b in BASELINES if b in next(iter(points.values()))]
    header = [f"vs {b} ({reward})" for reward in REWARDS for b in bases]
    lines = [f"   Diversity {HELDOUT_DIVERSITY} at equal reward, mean paired difference over seeds (row − baseline):", "",
             "   | row | " + " | ".join(header) + " |", "   |" + "---|" * (len(header) + 1)]
    verdicts: dict[str, bool] = {}
    for row in rows:
        cells = {(reward, b): _frontier_verdict(pretrained, points, row, b, reward, HELDOUT_DIVERSITY)
                 for reward in REWARDS for b in bases}
        verdicts[row] = all(isinstance(cells["gold", b], PairedVerdict) and cells["gold", b].verdict == HOLDS
                            for b in bases)
        lines.append(f"   | {row} | " + " | ".join(_cell(cells[key]) for key in cells) + " |")
    lines += ["", "   In the other spaces no regulariser used (gold reward):", "",
              "   | row | " + " | ".join(f"vs {b} (dist/{s})" for s in JUDGE_SPACES[1:] for b in bases) + " |",
              "   |" + "---|" * (len(bases) * (len(JUDGE_SPACES) - 1) + 1)]
    for row in rows:
        lines.append(f"   | {row} | " + " | ".join(_cell(_frontier_verdict(pretrained, points, row, b, "gold", f"dist/{s}"))
                                              for s in JUDGE_SPACES[1:] for b in bases) + " |")
    return verdicts, lines


def claim_three(tables: Mapping[int, Mapping[str, Mapping[str, float]]]) -> tuple[dict[str, bool], list[str]]:
    """Claim 3 (module docstring): (row -> holds in the full table and the subset, report lines), for every
    PEC row; PCGS rows are reported too."""
    names = list(next(iter(tables.values())))
    lines, verdicts = [], {}
    for row in (r for r in names if r.startswith(("pec", "pcgs"))):
        subset = [r for r in paper_subset(row if row.startswith("pec") else "pec_lambda0.5",
                                          row if row.startswith("pcgs") else PCGS_STANDIN) if r in names]
        both = table_claim_full_and_subset(tables, QUALITY, DIVERSITY, row, "grpo", subset)
        if row.startswith("pec"):
            verdicts[row] = all(v.verdict == HOLDS for v in both.values())
        lines.append(f"   - {row} − grpo: full table {_cell(both['full'])}; paper's rows ({len(subset)}) "
                     f"{_cell(both['subset'])}")
    return verdicts, lines


def plot_frontier(pretrained: Mapping[str, float], points: Points, path: Path) -> None:
    """Gold and training reward against held-out diversity, one curve per method (`FRONTIER_PLOT_ROWS`)."""
    present = [r for r in FRONTIER_PLOT_ROWS if r in next(iter(points.values()))]
    panels = {label: {row: curves(pretrained, points, row, reward, HELDOUT_DIVERSITY) for row in present}
              for reward, label in REWARDS.items()}
    plot_frontiers(panels, path, diversity_label=f"held-out diversity ({HELDOUT_DIVERSITY})",
                   title="Reward vs diversity along training (pretrained, then every 20% of the run)")


def plot_grids(out: Path, seed: int, last: int, path: Path) -> None:
    """The sample grids of `GRID_ROWS` side by side: same prompts, same noise, the last milestone of `seed`."""
    files = {row: (out / PRETRAINED / f"samples_{PRETRAINED}.png" if row == PRETRAINED else
                   seed_dir(out, seed) / row / "eval" / f"samples_{row}@{last}.png") for row in GRID_ROWS}
    files = {row: f for row, f in files.items() if f.exists()}
    cols = 2 if len(files) > 2 else len(files)  # 2 x 2: large enough to tell the digits apart
    rows = -(-len(files) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7.0 * cols, 4.8 * rows), squeeze=False)
    for ax in axes.flat[len(files):]:
        ax.axis("off")
    for ax, (row, f) in zip(axes.flat, files.items()):
        ax.imshow(plt.imread(f), cmap="gray")
        ax.set_title(row if row == PRETRAINED else f"{row} (step {last})", fontsize=10)
        ax.axis("off")
    save_figure(fig, path, f"Evaluation samples, seed {seed}: one row per digit prompt, the same noise in every panel")


def write_report(out: Path, mode: Mode) -> str:
    """Write table.md, table_seed<s>.md, frontier.png and grids.png into `out`; return the claims (markdown)."""
    last = milestone_steps(mode.steps)[-1]
    pretrained, points = load_points(out, mode)
    tables = final_tables(pretrained, points, last)
    names = list(next(iter(tables.values())))
    normalised = [minmax_table(t, QUALITY, DIVERSITY) for t in tables.values()]
    for seed, table in zip(tables, normalised):
        atomic_write_text(out / f"table_seed{seed}.md", table_markdown(table))
    n = len(tables)
    atomic_write_text(
        out / "table.md",
        f"Last milestone (step {last}), {n} seed{'s' * (n != 1)} ({', '.join(map(str, tables))}); raw columns are means, "
        f"Q-norm / D-norm / Overall mean ± sd of each seed's min-max over these rows. Diversity and fidelity in the "
        f"spaces no regulariser used ({', '.join(JUDGE_SPACES)}; recall / coverage / precision in {JUDGE_SPACES[0]}, "
        f"against held-out digits).\n\n" + mean_table(normalised, names)
        + f"\nNot judged on: the regulariser's own space ({REGULARISED_SPACE}) and the proxy-gold gap.\n\n"
        + regulariser_space_table(tables, names))
    plot_frontier(pretrained, points, out / "frontier.png")
    plot_grids(out, mode.seeds[0], last, out / "grids.png")
    one, lines1 = claim_one(out, pretrained, points, last)
    two, lines2 = claim_two(pretrained, points)
    three, lines3 = claim_three(tables)
    verdict = {True: "**holds**", False: "**does not hold / undecided**"}
    held2 = [r for r, ok in two.items() if ok]
    held3 = [r for r, ok in three.items() if ok]
    return "\n".join([
        "# The paper's claims on the embedded world", "",
        f"{n} seed{'s' * (n != 1)}, {mode.steps} steps, verdicts paired over seeds (mean ± 2 SE of the paired "
        f"differences; 'undecided' when the interval straddles 0, always with one seed).", "",
        f"1. Under GRPO the reward rises, the policy entropy is constant, held-out diversity falls: {verdict[one]}",
        *lines1, "",
        f"2. At equal gold reward PEC and PCGS keep more held-out diversity than GRPO and GRPO + KL: holds for "
        f"{len(held2)}/{len(two)} rows" + (f" ({', '.join(held2)})" if held2 else ""), "", *lines2, "",
        f"3. Overall is higher for PEC than for GRPO (full table and the paper's rows): holds for "
        f"{len(held3)}/{len(three)} PEC rows" + (f" ({', '.join(held3)})" if held3 else ""), *lines3, ""])
