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
4. At equal gold reward PEC keeps more held-out diversity than the field's diversity methods (GARDO,
   DiverseGRPO), each run in the regulariser space PEC uses; read as claim 2. Beside it, for context, each
   method against GRPO (does it keep more at equal reward at all?).
5. Under DiffusionNFT and under MixGRPO, PEC keeps more held-out diversity than the algorithm alone, at equal
   gold reward; read as claim 2. Beside it, each algorithm alone against Flow-GRPO (GRPO).
Frontier claims are read over the whole shared reward range (the verdict) and at its high-reward end (the
highest `TOP_LEVELS` of the 10 levels, where the whole-range mean is not diluted by the low end every curve
starts from). A verdict whose bound lies within half an SE of 0 is marked fragile (`pec.experiments.verdicts`):
a slower or different CPU can flip it, so it is not a finding on its own, and no claim counts it as holding.
Everything is read from the kept results (`pec.experiments.results`), not from the run folders.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from pec.atomic import atomic_write_text
from pec.config import PerceptualConfig
from pec.evaluate import PRETRAINED
from pec.experiments import results as results_store
from pec.experiments.frontier import Curve, plot_frontiers
from pec.experiments.rows import (
    ALIASES,
    GUIDANCE_SUFFIX,
    Mode,
    guided,
    milestone_steps,
)
from pec.experiments.verdicts import (
    PairedVerdict,
    frontier_claim,
    paired_verdict,
    paper_subset,
    table_claim_full_and_subset,
)
from pec.logging_utils import plt, save_figure
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
PEC_STANDIN = "pec_lambda0.5"  # the PEC row claim 4 compares (every PEC row is reported)
FIELD_METHODS = ("gardo", "diverse_grpo")  # claim 4
ALGORITHM_PAIRS = (("nft_pec", "nft"), ("mixgrpo_pec", "mixgrpo"))  # claim 5: (with PEC, alone)
TOP_LEVELS = 3  # the high-reward reading: the highest 3 of the 10 shared reward levels
FRONTIER_PLOT_ROWS = ("grpo", "grpo_kl", "pec_lambda0.5", "pec_decay", "pcgs_policy", "pcgs_guided_w0.05",
                      "clip_higher", "kl_cov", *FIELD_METHODS)
ALGORITHM_PLOT_ROWS = tuple(row for pair in ALGORITHM_PAIRS for row in pair)
GRID_ROWS = (PRETRAINED, "grpo", "pec_lambda0.5", "pcgs_policy", *FIELD_METHODS)
REWARDS = {"gold": "gold reward", "digit": "training reward (digit)"}

Points = dict[int, dict[str, dict[int, dict[str, float]]]]  # seed -> row -> step -> metrics


def regularised(row: str) -> bool:
    """Whether `row` is a PEC or PCGS run (claim 2's rows)."""
    return row.startswith(("pec", "pcgs")) and not row.endswith(GUIDANCE_SUFFIX)


class Ledger:
    """Every verdict a report judged, by label, so that the fragile ones can be listed at its end."""

    def __init__(self) -> None:
        self.verdicts: list[tuple[str, PairedVerdict]] = []

    def add(self, label: str, verdict: PairedVerdict | str) -> PairedVerdict | str:
        """Record `verdict` (a string: not comparable, not recorded) under `label`; return it."""
        if isinstance(verdict, PairedVerdict):
            self.verdicts.append((label, verdict))
        return verdict

    def fragile_lines(self) -> list[str]:
        """The report's closing lines: how many verdicts are fragile, and which."""
        fragile = [(label, v) for label, v in self.verdicts if v.fragile]
        return [f"Fragile verdicts (a bound within half an SE of 0; another machine's rounding can flip them): "
                f"{len(fragile)} of {len(self.verdicts)}", *(f"   - {label}: {_cell(v)}" for label, v in fragile)]


def load_points(results: Path, mode: Mode) -> tuple[dict[str, float], Points]:
    """(the pretrained model's metrics, every run's milestone metrics) from the kept results, "+guidance"
    readings as rows of their own and aliases (`ALIASES`) as copies of their run."""
    pretrained = results_store.read(results_store.pretrained_file(results))["metrics"]
    points: Points = {}
    for seed in mode.seeds:
        runs: dict[str, dict[int, dict[str, float]]] = {}
        for row in mode.rows:
            kept = results_store.read(results_store.run_file(results, seed, row))
            runs[row] = results_store.evaluations(kept, "eval")
            if guided(row):
                runs[row + GUIDANCE_SUFFIX] = results_store.evaluations(kept, "eval_guided")
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
    """A verdict as a short table cell: 'holds (+0.41, 2se 0.20)', 'holds (+0.02, 2se 0.03, fragile)'."""
    if isinstance(verdict, str):
        return verdict
    spread = "" if math.isnan(verdict.se) else f", 2se {2 * verdict.se:.3f}"
    return f"{verdict.verdict} ({verdict.mean:+.3f}{spread}{', fragile' if verdict.fragile else ''})"


def _frontier_verdict(pretrained: Mapping[str, float], points: Points, row: str, base: str, reward: str,
                      diversity: str, ledger: Ledger, top: int | None = None) -> PairedVerdict | str:
    try:
        verdict = frontier_claim(curves(pretrained, points, row, reward, diversity),
                                 curves(pretrained, points, base, reward, diversity), top=top)
    except ValueError as err:  # e.g. no shared reward range in some seed
        return f"not comparable ({err})"
    where = f", top {top} levels" if top else ""
    return ledger.add(f"{row} vs {base} at equal {reward} reward ({diversity}{where})", verdict)


def claim_one(results: Path, pretrained: Mapping[str, float], points: Points, last: int, ledger: Ledger
              ) -> tuple[bool, list[str]]:
    """Claim 1 (module docstring): (holds, report lines)."""
    lines, constant_all, rises = [], True, {}
    for seed in points:
        training = results_store.read(results_store.run_file(results, seed, "grpo"))["training"]
        rewards, entropies = training["reward_mean"], training["policy_entropy"]
        window = max(1, len(rewards) // 5)
        first = sum(rewards[:window]) / window
        end = sum(rewards[-window:]) / window
        spread = max(entropies) - min(entropies)
        constant = spread <= 1e-6 * max(1.0, abs(entropies[0]))
        constant_all &= constant
        rises[seed] = (end, first)
        lines.append(f"   - seed {seed}: training reward, first / last {window} steps {first:.4f} -> {end:.4f}; policy "
                     f"entropy {entropies[0]:.6f} over {len(entropies)} steps, max - min {spread:.3g} "
                     f"({'constant' if constant else 'NOT constant'})")
    reward_up = ledger.add("GRPO's training reward rises",
                           paired_verdict({s: v[0] for s, v in rises.items()}, {s: v[1] for s, v in rises.items()}))
    lines.append(f"   - training reward rises (last window > first): {reward_up.describe(4)}")
    gold = ledger.add("GRPO's gold reward rises", paired_verdict({s: r["grpo"][last]["gold"] for s, r in points.items()},
                                                                  {s: pretrained["gold"] for s in points}))
    lines.append(f"   - gold reward rises (GRPO > pretrained, last milestone): {gold.describe(4)}")
    falls = {}
    for space in JUDGE_SPACES:
        key = f"dist/{space}"
        falls[space] = ledger.add(f"GRPO's {key} falls", paired_verdict(
            {s: pretrained[key] for s in points}, {s: r["grpo"][last][key] for s, r in points.items()}))
        lines.append(f"   - {key} falls (pretrained {pretrained[key]:.4f} > GRPO): {falls[space].describe(4)}")
    holds = constant_all and reward_up.firmly_holds and falls[JUDGE_SPACES[0]].firmly_holds
    return holds, lines


def _holds(verdict: PairedVerdict | str) -> bool:
    return isinstance(verdict, PairedVerdict) and verdict.firmly_holds


def frontier_table(pretrained: Mapping[str, float], points: Points, pairs: Sequence[tuple[str, str]], ledger: Ledger
                   ) -> tuple[dict[tuple[str, str], bool], list[str]]:
    """Held-out diversity at equal reward for each (row, baseline) of `pairs`: the gold reward over the whole
    shared range (the verdict) and at its top `TOP_LEVELS` levels, and the training reward over the whole range.
    Returns ((row, baseline) -> the gold whole-range verdict holds, markdown table lines)."""
    header = ["gold reward", f"gold, top {TOP_LEVELS} levels", "training reward (digit)"]
    lines = ["   | row | baseline | " + " | ".join(header) + " |", "   |" + "---|" * (len(header) + 2)]
    held = {}
    for row, base in pairs:
        cells = [_frontier_verdict(pretrained, points, row, base, "gold", HELDOUT_DIVERSITY, ledger),
                 _frontier_verdict(pretrained, points, row, base, "gold", HELDOUT_DIVERSITY, ledger, TOP_LEVELS),
                 _frontier_verdict(pretrained, points, row, base, "digit", HELDOUT_DIVERSITY, ledger)]
        held[row, base] = _holds(cells[0])
        lines.append(f"   | {row} | {base} | " + " | ".join(_cell(c) for c in cells) + " |")
    return held, lines


def claim_two(pretrained: Mapping[str, float], points: Points, ledger: Ledger) -> tuple[dict[str, bool], list[str]]:
    """Claim 2 (module docstring): (row -> holds against both baselines with the gold reward in the held-out
    space, report lines: a verdict table, then the other judged spaces)."""
    present = next(iter(points.values()))
    rows = [r for r in present if regularised(r)]
    bases = [b for b in BASELINES if b in present]
    held, table = frontier_table(pretrained, points, [(r, b) for r in rows for b in bases], ledger)
    verdicts = {row: all(held[row, b] for b in bases) for row in rows}
    lines = [f"   Diversity {HELDOUT_DIVERSITY} at equal reward, mean paired difference over seeds (row − baseline):",
             "", *table, "", "   In the other spaces no regulariser used (gold reward, whole range):", "",
             "   | row | " + " | ".join(f"vs {b} (dist/{s})" for s in JUDGE_SPACES[1:] for b in bases) + " |",
             "   |" + "---|" * (len(bases) * (len(JUDGE_SPACES) - 1) + 1)]
    for row in rows:
        lines.append(f"   | {row} | " + " | ".join(
            _cell(_frontier_verdict(pretrained, points, row, b, "gold", f"dist/{s}", ledger))
            for s in JUDGE_SPACES[1:] for b in bases) + " |")
    return verdicts, lines


def claim_three(tables: Mapping[int, Mapping[str, Mapping[str, float]]], ledger: Ledger
                ) -> tuple[dict[str, bool], list[str]]:
    """Claim 3 (module docstring): (row -> holds in the full table and the subset, report lines), for every
    PEC row; PCGS rows are reported too."""
    names = list(next(iter(tables.values())))
    lines, verdicts = [], {}
    for row in (r for r in names if r.startswith(("pec", "pcgs"))):
        subset = [r for r in paper_subset(row if row.startswith("pec") else PEC_STANDIN,
                                          row if row.startswith("pcgs") else PCGS_STANDIN) if r in names]
        both = table_claim_full_and_subset(tables, QUALITY, DIVERSITY, row, "grpo", subset)
        for table, verdict in both.items():
            ledger.add(f"Overall {row} > grpo ({table} table)", verdict)
        if row.startswith("pec"):
            verdicts[row] = all(v.firmly_holds for v in both.values())
        lines.append(f"   - {row} − grpo: full table {_cell(both['full'])}; paper's rows ({len(subset)}) "
                     f"{_cell(both['subset'])}")
    return verdicts, lines


def claim_four(pretrained: Mapping[str, float], points: Points, ledger: Ledger) -> tuple[dict[str, bool], list[str]]:
    """Claim 4 (module docstring): (field method -> PEC's row keeps more than it, report lines); every PEC row
    is compared, the verdict is `PEC_STANDIN`'s; each method against GRPO follows, for context."""
    present = next(iter(points.values()))
    methods = [m for m in FIELD_METHODS if m in present]
    pecs = [r for r in present if r.startswith("pec") and not r.endswith(GUIDANCE_SUFFIX)]
    pairs = [(p, m) for m in methods for p in pecs] + [(m, "grpo") for m in methods if "grpo" in present]
    held, table = frontier_table(pretrained, points, pairs, ledger)
    return {m: held.get((PEC_STANDIN, m), False) for m in methods}, table


def claim_five(pretrained: Mapping[str, float], points: Points, ledger: Ledger) -> tuple[dict[str, bool], list[str]]:
    """Claim 5 (module docstring): (algorithm -> PEC keeps more than it alone, report lines); each algorithm
    alone against GRPO follows, for context."""
    present = next(iter(points.values()))
    pairs = [(with_pec, alone) for with_pec, alone in ALGORITHM_PAIRS if with_pec in present and alone in present]
    context = [(alone, "grpo") for _, alone in pairs if "grpo" in present]
    held, table = frontier_table(pretrained, points, pairs + context, ledger)
    return {alone: held[with_pec, alone] for with_pec, alone in pairs}, table


def plot_frontier(pretrained: Mapping[str, float], points: Points, path: Path) -> None:
    """Gold and training reward against held-out diversity, one curve per method (`FRONTIER_PLOT_ROWS`), and the
    other algorithms alone and with PEC (`ALGORITHM_PLOT_ROWS`, gold reward) in a panel of their own."""
    present = next(iter(points.values()))
    panels = {label: {row: curves(pretrained, points, row, reward, HELDOUT_DIVERSITY)
                      for row in FRONTIER_PLOT_ROWS if row in present}
              for reward, label in REWARDS.items()}
    algorithms = {row: curves(pretrained, points, row, "gold", HELDOUT_DIVERSITY)
                  for row in ALGORITHM_PLOT_ROWS if row in present}
    if algorithms:
        panels[f"{REWARDS['gold']} (DiffusionNFT, MixGRPO)"] = algorithms
    plot_frontiers(panels, path, diversity_label=f"held-out diversity ({HELDOUT_DIVERSITY})",
                   title="Reward vs diversity along training (pretrained, then every 20% of the run)")


def plot_grids(results: Path, seed: int, last: int, path: Path) -> None:
    """The sample grids of `GRID_ROWS` side by side: same prompts, same noise, the last milestone of `seed`."""
    files = {row: (results_store.pretrained_file(results) if row == PRETRAINED else
                   results_store.run_file(results, seed, row)).with_suffix(".png") for row in GRID_ROWS}
    files = {row: f for row, f in files.items() if f.exists()}
    cols = 2 if len(files) <= 4 else 3  # large enough to tell the digits apart
    rows = -(-len(files) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7.0 * cols, 4.8 * rows), squeeze=False)
    for ax in axes.flat[len(files):]:
        ax.axis("off")
    for ax, (row, f) in zip(axes.flat, files.items()):
        ax.imshow(plt.imread(f), cmap="gray")
        ax.set_title(row if row == PRETRAINED else f"{row} (step {last})", fontsize=10)
        ax.axis("off")
    save_figure(fig, path, f"Evaluation samples, seed {seed}: one row per digit prompt, the same noise in every panel")


def _summary(held: Mapping[str, bool], what: str) -> str:
    names = [r for r, ok in held.items() if ok]
    return f"holds for {len(names)}/{len(held)} {what}" + (f" ({', '.join(names)})" if names else "")


def write_report(results: Path, mode: Mode, report_dir: Path) -> str:
    """Write table.md, table_seed<s>.md, frontier.png and grids.png into `report_dir` from the kept `results`;
    return the claims (markdown)."""
    last = milestone_steps(mode.steps)[-1]
    pretrained, points = load_points(results, mode)
    tables = final_tables(pretrained, points, last)
    names = list(next(iter(tables.values())))
    normalised = [minmax_table(t, QUALITY, DIVERSITY) for t in tables.values()]
    for seed, table in zip(tables, normalised):
        atomic_write_text(report_dir / f"table_seed{seed}.md", table_markdown(table))
    n = len(tables)
    atomic_write_text(
        report_dir / "table.md",
        f"Last milestone (step {last}), {n} seed{'s' * (n != 1)} ({', '.join(map(str, tables))}); raw columns are means, "
        f"Q-norm / D-norm / Overall mean ± sd of each seed's min-max over these rows. Diversity and fidelity in the "
        f"spaces no regulariser used ({', '.join(JUDGE_SPACES)}; recall / coverage / precision in {JUDGE_SPACES[0]}, "
        f"against held-out digits).\n\n" + mean_table(normalised, names)
        + f"\nNot judged on: the regulariser's own space ({REGULARISED_SPACE}) and the proxy-gold gap.\n\n"
        + regulariser_space_table(tables, names))
    plot_frontier(pretrained, points, report_dir / "frontier.png")
    plot_grids(results, mode.seeds[0], last, report_dir / "grids.png")
    ledger = Ledger()
    one, lines1 = claim_one(results, pretrained, points, last, ledger)
    two, lines2 = claim_two(pretrained, points, ledger)
    three, lines3 = claim_three(tables, ledger)
    four, lines4 = claim_four(pretrained, points, ledger)
    five, lines5 = claim_five(pretrained, points, ledger)
    verdict = {True: "**holds**", False: "**does not hold / undecided**"}
    return "\n".join([
        "# The paper's claims on the embedded world", "",
        f"{n} seed{'s' * (n != 1)}, {mode.steps} steps, verdicts paired over seeds (mean ± 2 SE of the paired "
        f"differences; 'undecided' when the interval straddles 0, always with one seed; 'fragile' when a bound lies "
        f"within half an SE of 0). Frontier verdicts are read over the whole shared gold-reward range; the top "
        f"{TOP_LEVELS} of its 10 levels are shown beside it.", "",
        f"1. Under GRPO the reward rises, the policy entropy is constant, held-out diversity falls: {verdict[one]}",
        *lines1, "",
        f"2. At equal gold reward PEC and PCGS keep more held-out diversity than GRPO and GRPO + KL: "
        f"{_summary(two, 'rows')}", "", *lines2, "",
        f"3. Overall is higher for PEC than for GRPO (full table and the paper's rows): {_summary(three, 'PEC rows')}",
        *lines3, "",
        f"4. At equal gold reward PEC ({PEC_STANDIN}) keeps more held-out diversity than the field's diversity "
        f"methods: {_summary(four, 'methods') if four else 'not run (no GARDO or DiverseGRPO row)'}", "", *lines4, "",
        f"5. Under DiffusionNFT and MixGRPO, PEC keeps more held-out diversity than the algorithm alone: "
        f"{_summary(five, 'algorithms') if five else 'not run (no algorithm pair)'}", "", *lines5, "",
        *ledger.fragile_lines(), ""])


def write_sweep(results: Path, mode: Mode) -> str:
    """The sweep's report (markdown): per swept setting, its last-milestone gold reward and held-out diversity and
    its frontier against GRPO (held-out diversity at equal gold reward, whole range and top levels), and the
    chosen setting: the largest mean whole-range frontier difference."""
    last = milestone_steps(mode.steps)[-1]
    pretrained, points = load_points(results, mode)
    ledger = Ledger()
    swept = [r for r in mode.rows if r != "grpo"]
    lines = ["| setting | gold (last) | held-out diversity (last) | vs grpo at equal gold | top levels |",
             "|---|---|---|---|---|"]
    score = {}
    for row in ("grpo", *swept):
        gold, div = (_stats([runs[row][last][c] for runs in points.values()])[0] for c in ("gold", HELDOUT_DIVERSITY))
        cells = ["", ""]  # grpo: the reference the settings are judged against
        if row != "grpo":
            whole = _frontier_verdict(pretrained, points, row, "grpo", "gold", HELDOUT_DIVERSITY, ledger)
            top = _frontier_verdict(pretrained, points, row, "grpo", "gold", HELDOUT_DIVERSITY, ledger, TOP_LEVELS)
            score[row] = whole.mean if isinstance(whole, PairedVerdict) else -math.inf
            cells = [_cell(whole), _cell(top)]
        lines.append(f"| {row} | {gold:.4f} | {div:.3f} | " + " | ".join(cells) + " |")
    chosen = max(score, key=score.get) if score else None
    return "\n".join(["# DiverseGRPO's setting sweep", "",
                      f"{len(points)} seeds, {mode.steps} steps; the regulariser space is PEC's ({REGULARISED_SPACE}).",
                      "", *lines, "", f"Chosen: {chosen} (the largest mean frontier difference against GRPO).", ""])
