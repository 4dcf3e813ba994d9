"""`python -m pec.experiments.paper_table [--quick | --full]`: the paper's comparison on the embedded world,
decided claim by claim.

Every row of `ROWS` is trained from the same pretrained model on the same seeds (`--seeds`), with
milestone checkpoints every 20% of the run; every milestone is evaluated with `pec.evaluate` (gold
reward, held-out fidelity, diversity in every space, the evaluation-only `simclr_eval` included), and
`pec.experiments.paper_report` turns the evaluations into the table, the frontier plot, the sample
grids and the paired verdicts. Modes:
  --quick (default)  2 seeds, 100 steps: every row, ~25 min on 2 cores (budget 45 min)
  --full             3 seeds, 250 steps, long enough for GRPO's collapse: ~80 min (budget 100 min)
(With two minibatches a step, 100 steps already take GRPO's held-out diversity from 9.6 to 6.9; 250 such
steps are 500 half-batch updates, more than the 300 one-update steps at which issue 13 saw the collapse.)
Rows (run folders out/seed<s>/<row>; options in `ROWS`, plus `COMMON` for every row):
  grpo, grpo_kl (Flow-GRPO's beta 0.04 in its units), entropy_sample (per-sample -log pi bonus),
  pec at two lambdas, pcgs_policy (reward form, the `policy` reading of its generation density) and
  pcgs_latent (the theta-dependent `latent_group` reading), pcgs_guided at two weights (each evaluated
  twice: the policy alone, and `<row>+guidance`, sampled with its guidance on), clip_higher, clip_cov
  and kl_cov (perceptual: the paper's rows) and their `_native` variants. The analytic policy-entropy
  bonus is GRPO by construction (the entropy of each Gaussian step is fixed by the schedule, so the bonus
  is a constant with no gradient): its row `entropy_bonus` is the GRPO run, not a run of its own.
Every row trains with two minibatches per rollout batch (`COMMON`), since Clip-Higher and KL-Cov act
only off-policy; the same for all rows keeps the comparison paired.
Output (--out, default runs/paper_table/<mode>): per seed and row the run (metrics.jsonl, checkpoints,
milestones, train.log) and its milestone evaluations (eval/, eval_guided/); pretrained/ (the base
model's evaluation); table.md (final milestone, mean ± sd over seeds), tables per seed, claims.md (the
verdicts), frontier.png, grids.png, timing.json. Rerunning the command skips finished work and resumes
interrupted runs; options after `--` go to every training run and evaluation (e.g. `-- --model.path
tiny/embedded --assets tiny`); a run folder is reused whatever its options, so use a fresh --out after
changing them.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pec.atomic import atomic_write_text
from pec.checkpoint import has_checkpoint
from pec.cli import CommandError, command_parser, expected_errors
from pec.evaluate import PRETRAINED
from pec.experiments import split_passthrough
from pec.experiments.paper_report import write_report
from pec.experiments.rows import COMMON, MILESTONES, MODES, ROWS, Mode, guided, milestone_steps, seed_dir

PROG = "pec.experiments.paper_table"


@dataclass
class Job:
    """One subprocess of the experiment: `cmd` (logged to `log`), finished when `done` exists; starts after
    the job `after` (its key) has finished. A training job names its `run_dir`: when that holds a checkpoint
    (an interrupted run), `--resume` is added."""

    key: str
    cmd: list[str]
    log: Path
    done: Path
    after: str | None = None
    run_dir: Path | None = None


def run_jobs(jobs: Sequence[Job], parallel: int, label: str = "paper_table") -> dict[str, float]:
    """Run the unfinished `jobs`, `parallel` at a time, each after its `after` job; raise a CommandError
    (stopping the others) when one fails, naming its log. Returns the seconds each job ran."""
    pending = [job for job in jobs if not job.done.exists()]
    finished = {job.key for job in jobs if job.done.exists()}
    running: dict[str, tuple[Job, subprocess.Popen, float, object]] = {}
    seconds: dict[str, float] = {}
    while pending or running:
        for job in list(pending):
            if len(running) >= parallel:
                break
            if job.after is not None and job.after not in finished:
                continue
            pending.remove(job)
            job.log.parent.mkdir(parents=True, exist_ok=True)
            cmd = job.cmd + (["--resume"] if job.run_dir is not None and has_checkpoint(job.run_dir) else [])
            log = open(job.log, "a")
            print(f"[{label}] {job.key}", flush=True)
            running[job.key] = (job, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.perf_counter(),
                                log)
        time.sleep(0.5)
        for key, (job, proc, start, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[key]
            if proc.returncode != 0 or not job.done.exists():
                for _, other, _, other_log in running.values():
                    other.terminate()
                    other_log.close()
                raise CommandError(f"{key} failed (exit {proc.returncode}); see {job.log}")
            seconds[key] = time.perf_counter() - start
            finished.add(key)
    return seconds


def plan(out: Path, mode: Mode, images: int, extra: Sequence[str]) -> list[Job]:
    """The jobs of an experiment: the pretrained model's evaluation, and per seed and row its training run,
    then the evaluation of its milestones (twice for a guided row)."""
    py = [sys.executable, "-m"]
    evaluate = ["--eval.images_per_prompt", str(images), *extra]
    jobs = [Job("evaluate pretrained", [*py, "pec.evaluate", PRETRAINED, "--out", str(out / PRETRAINED), *evaluate],
                out / PRETRAINED / "evaluate.log", out / PRETRAINED / "metrics.json")]
    steps = milestone_steps(mode.steps)
    for seed in mode.seeds:
        for row in mode.rows:
            run = seed_dir(out, seed) / row
            train_key = f"train seed {seed} {row}"
            jobs.append(Job(train_key, [*py, "pec.train", "--run-dir", str(run), "--logging.progress", "false",
                                        "--seed", str(seed), "--train.steps", str(mode.steps),
                                        "--logging.milestone_every", str(max(1, mode.steps // MILESTONES)),
                                        *COMMON, *ROWS[row], *extra],
                            run / "train.log", run / "samples_end.png", run_dir=run))
            readings = [("eval", [])] + ([("eval_guided", ["--eval.guidance", "true"])] if guided(row) else [])
            for folder, options in readings:
                jobs.append(Job(f"evaluate seed {seed} {row} ({folder})",
                                [*py, "pec.evaluate", *(f"{run}@{s}" for s in steps), "--out", str(run / folder),
                                 *options, *evaluate],
                                run / folder / "evaluate.log", run / folder / "metrics.json", after=train_key))
    return jobs


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `python -m pec.experiments.paper_table`, with the exit codes of `pec.cli` (2: an option
    refused before any job starts; 1: a job or the report failed, in one line naming the job's log)."""

    argv, extra = split_passthrough(argv)
    parser = command_parser("python -m pec.experiments.paper_table", __doc__)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", dest="mode", action="store_const", const="quick", help="the quick mode (default)")
    which.add_argument("--full", dest="mode", action="store_const", const="full", help="the full mode (the README's)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/paper_table/<mode>)")
    parser.add_argument("--jobs", type=int, default=2, help="subprocesses at a time (default: 2, one per core)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: the mode's)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: the mode's)")
    parser.add_argument("--rows", nargs="+", default=None, choices=list(ROWS),
                        help="train only these rows (default: every row); grpo is always trained")
    parser.add_argument("--eval.images_per_prompt", dest="images", type=int, default=32,
                        help="images per prompt at evaluation (default: 32)")
    args = parser.parse_args(argv)
    base = MODES[args.mode or "quick"]
    rows = tuple(dict.fromkeys(["grpo", *(args.rows or base.rows)]))
    mode = Mode(seeds=tuple(args.seeds or base.seeds), steps=args.steps or base.steps, rows=rows,
                budget_min=base.budget_min)
    out = Path(args.out or f"runs/paper_table/{args.mode or 'quick'}")
    with expected_errors(PROG, before_work=True):
        if args.jobs < 1:
            raise ValueError("--jobs must be >= 1")
        if len(set(mode.seeds)) != len(mode.seeds):
            raise ValueError(f"--seeds must be distinct, got {list(mode.seeds)}")
        if mode.steps < 2:
            raise ValueError(f"--steps must be >= 2 (a curve needs two milestones), got {mode.steps}")
        out.mkdir(parents=True, exist_ok=True)
    print(f"[paper_table] {args.mode or 'quick'} mode: seeds {list(mode.seeds)}, {mode.steps} steps, rows "
          f"{list(mode.rows)}, {args.jobs} jobs, into {out}", flush=True)
    with expected_errors(PROG):
        start = time.perf_counter()
        seconds = run_jobs(plan(out, mode, args.images, extra), args.jobs)
        jobs_done = time.perf_counter()
        report = write_report(out, mode)
        wall = time.perf_counter() - start
        timing = {"mode": args.mode or "quick", "wall_min": wall / 60, "jobs_min": (jobs_done - start) / 60,
                  "report_min": (wall - (jobs_done - start)) / 60, "budget_min": mode.budget_min, "jobs": args.jobs,
                  "train_min": sum(v for k, v in seconds.items() if k.startswith("train")) / 60,
                  "evaluate_min": sum(v for k, v in seconds.items() if k.startswith("evaluate")) / 60,
                  "seconds_per_job": seconds}
        atomic_write_text(out / "timing.json", json.dumps(timing, indent=2))
        summary = (f"Wall time {wall / 60:.1f} min (budget {mode.budget_min:g} min; subprocesses "
                   f"{(jobs_done - start) / 60:.1f} min: training {timing['train_min']:.1f} and evaluation "
                   f"{timing['evaluate_min']:.1f} process-min on {args.jobs} at a time; report "
                   f"{timing['report_min']:.1f} min). Work finished by an earlier invocation is not counted.")
        atomic_write_text(out / "claims.md", report + "\n" + summary + "\n")
    print((out / "table.md").read_text())
    print(report)
    print(summary)


if __name__ == "__main__":
    main()
