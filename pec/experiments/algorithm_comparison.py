"""`python -m pec.experiments.algorithm_comparison`: does PEC keep diversity under other RL algorithms?

On the embedded world, each algorithm of `ALGORITHMS` trains alone (`--method none`) and with PEC at its
shipped lambda (`--method pec`), from the same pretrained model, for each seed; every run's last checkpoint
and the pretrained model are evaluated by `pec.evaluate` on the same held-out seeds. The table gives the
mean and standard deviation over seeds of the gold reward (the evaluation-only classifier), the trained
digit reward, fidelity (precision against held-out digits in simclr_eval) and diversity (within-prompt
distances in simclr_eval, the evaluation-only space, and in simclr, the regulariser's space; recall);
curves.png shows the training reward and within-group simclr diversity over steps.

Options: --steps (default 300), --seeds (default 0 1), --out (default runs/algorithm_comparison), --jobs
(subprocesses at a time, default 2); options after `--` go to every training run. Rerunning skips
finished runs and resumes interrupted ones. Output: table.md, table.json, curves.png, one folder per seed
and row (the run, train.log) and eval-seed<s>/ (pec.evaluate's files).
"""
from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from pec.atomic import atomic_write_text
from pec.cli import command_parser, expected_errors
from pec.evaluate import PRETRAINED
from pec.experiments import split_passthrough
from pec.experiments.paper_table import Job, run_jobs
from pec.logging_utils import plt, read_metrics, save_figure

PROG = "pec.experiments.algorithm_comparison"
ALGORITHMS = ("nft", "mixgrpo")
# Every row trains with two minibatches per rollout batch, as the paper table's rows do (pec.experiments.rows).
COMMON = ["--train.minibatches", "2"]
COLUMNS = ("gold", "digit", "precision", "dist/simclr_eval", "dist/simclr", "recall")


def rows() -> dict[str, list[str]]:
    """Row name -> its training options: each algorithm alone and with PEC."""
    return {f"{a}{suffix}": ["--algorithm", a, "--method", method] for a in ALGORITHMS
            for suffix, method in (("", "none"), ("_pec", "pec"))}


def plan(out: Path, seeds: Sequence[int], steps: int, extra: Sequence[str]) -> list[Job]:
    """Per seed: every row's training run, then one evaluation of the pretrained model and every run."""
    py = [sys.executable, "-m"]
    jobs = []
    for seed in seeds:
        runs = []
        for row, options in rows().items():
            run = out / f"seed{seed}" / row
            jobs.append(Job(f"train seed {seed} {row}", [*py, "pec.train", "--run-dir", str(run), "--logging.progress",
                                                        "false", "--seed", str(seed), "--train.steps", str(steps),
                                                        *COMMON, *options, *extra],
                            run / "train.log", run / "samples_end.png", run_dir=run))
            runs.append(str(run))
        ev = out / f"eval-seed{seed}"
        jobs.append(Job(f"evaluate seed {seed}", [*py, "pec.evaluate", PRETRAINED, *runs, "--out", str(ev)],
                        ev / "evaluate.log", ev / "metrics.json", after=jobs[-1].key))
    return jobs


def summarise(out: Path, seeds: Sequence[int]) -> tuple[str, dict]:
    """The markdown table (mean ± sd over seeds per row and column) and its numbers."""
    names = [PRETRAINED, *rows()]
    per_row: dict[str, dict[str, list[float]]] = {n: {c: [] for c in COLUMNS} for n in names}
    for seed in seeds:
        metrics = list(json.loads((out / f"eval-seed{seed}" / "metrics.json").read_text()).values())
        for name, values in zip(names, metrics, strict=True):
            for column in COLUMNS:
                per_row[name][column].append(values[column])
    numbers = {n: {c: {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0}
                   for c, v in cols.items()} for n, cols in per_row.items()}
    lines = ["| row | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for name in names:
        cells = [f"{numbers[name][c]['mean']:.3f} ± {numbers[name][c]['sd']:.3f}" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines), numbers


def plot_curves(out: Path, seeds: Sequence[int]) -> None:
    """Training reward and within-group simclr diversity over steps, mean over seeds, one curve per row."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for row in rows():
        logs = [read_metrics(out / f"seed{s}" / row / "metrics.jsonl") for s in seeds]
        steps = [r["step"] for r in logs[0]]
        for ax, key in zip(axes, ("reward_mean", "diversity/simclr")):
            ax.plot(steps, [statistics.fmean(log[i][key] for log in logs) for i in range(len(steps))], label=row)
            ax.set_title(key)
            ax.set_xlabel("step")
    axes[1].legend(fontsize=8)
    save_figure(fig, out / "curves.png", title=f"embedded world, mean over seeds {list(seeds)}")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point (see the module docstring), with the exit codes of `pec.cli`."""
    argv, extra = split_passthrough(argv)
    parser = command_parser(f"python -m {PROG}", __doc__)
    parser.add_argument("--steps", type=int, default=300, help="training steps per run (default: 300)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (default: 0 1)")
    parser.add_argument("--out", default="runs/algorithm_comparison", help="output folder")
    parser.add_argument("--jobs", type=int, default=2, help="subprocesses at a time (default: 2)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    with expected_errors(PROG, before_work=True):
        if args.jobs < 1 or args.steps < 1 or len(set(args.seeds)) != len(args.seeds):
            raise ValueError("--jobs and --steps must be >= 1 and --seeds distinct")
        out.mkdir(parents=True, exist_ok=True)
    with expected_errors(PROG):
        run_jobs(plan(out, args.seeds, args.steps, extra), args.jobs, label="algorithm_comparison")
        table, numbers = summarise(out, args.seeds)
        atomic_write_text(out / "table.md", table + "\n")
        atomic_write_text(out / "table.json", json.dumps(numbers, indent=1))
        plot_curves(out, args.seeds)
    print(table)


if __name__ == "__main__":
    main()
