"""`python -m pec.experiments.paper_table [--quick | --full | --sweep]`: the paper's comparison on the embedded
world, with the field's diversity methods and RL algorithms, decided claim by claim.

Every row of `ROWS` is trained from the same pretrained model on the same seeds (`--seeds`), with
milestone checkpoints every 20% of the run; every milestone is evaluated with `pec.evaluate` (gold
reward, held-out fidelity, diversity in every space, the evaluation-only `simclr_eval` included), and
`pec.experiments.paper_report` turns the evaluations into the table, the frontier plot, the sample
grids and the paired verdicts (claims 1-5; fragile verdicts marked). Modes (times on 2 idle cores; each
mode is sized to take at most 1/1.5 of its budget on this project's machine, since another 2-core machine
took 1.5x as long):
  --quick (default)  2 seeds, 100 steps, the rows of `rows.QUICK_ROWS` (GRPO, GRPO + KL, one PEC and one
                     PCGS row, the field's methods, NFT and MixGRPO alone and with PEC): budget 45 min
  --full             3 seeds, 250 steps, every row: budget 150 min (the README's)
  --sweep            DiverseGRPO's open choices (`rows.SWEEP`) at --quick's seeds and steps, once; its
                     sweep.md names the chosen setting, which is the `diverse_grpo` row of --full
Rows (options in `ROWS`, plus `COMMON` for every row): grpo, grpo_kl (Flow-GRPO's beta 0.04 in its units),
entropy_sample, pec at two lambdas and pec_decay (lambda falling to 0 over the run, so the reward can reach
GRPO's), pcgs_policy, pcgs_latent, pcgs_guided at two weights (each evaluated twice: alone, and
`<row>+guidance`), clip_higher, clip_cov, kl_cov and their `_native` variants, the field's diversity methods
(gardo, diverse_grpo, in PEC's regulariser space), and nft, nft_pec, mixgrpo, mixgrpo_pec. The analytic
policy-entropy bonus is GRPO by construction: its row `entropy_bonus` is the GRPO run. Every row trains
with two minibatches per rollout batch (`COMMON`), since Clip-Higher and KL-Cov act only off-policy.
Output: the runs in --out (default runs/paper_table/<mode>: per seed and row the run folder with its
milestone evaluations); the kept results in --results (default OUT/results; `pec.experiments.results`: one
small JSON per finished run, to commit); the report in --report (default OUT: table.md, tables per seed,
claims.md, frontier.png, grids.png, timing.json). Rerunning skips every run whose result is kept (made by
this or another machine, with the same options) and resumes interrupted runs; options after `--` go to
every training run and evaluation (e.g. `-- --model.path tiny/embedded --assets tiny`). The README's table:
  python -m pec.experiments.paper_table --full --results docs/paper_table/results/full --report docs/paper_table
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pec.atomic import atomic_write_text
from pec.checkpoint import has_checkpoint
from pec.cli import CommandError, command_parser, expected_errors
from pec.evaluate import PRETRAINED
from pec.experiments import results as results_store
from pec.experiments import split_passthrough
from pec.experiments.paper_report import write_report, write_sweep
from pec.experiments.rows import (
    COMMON,
    HEADROOM,
    MILESTONES,
    MODES,
    ROWS,
    Mode,
    guided,
    milestone_steps,
    options_of,
    seed_dir,
)

PROG = "pec.experiments.paper_table"


@dataclass
class Job:
    """One subprocess of the experiment: `cmd` (logged to `log`), finished when `done` exists; starts after
    the job `after` (its key) has finished. A training job names its `run_dir`: when that holds a checkpoint
    (an interrupted run), `--resume` is added. A finished job's wall seconds are kept in `seconds.json`
    beside its `done` file."""

    key: str
    cmd: list[str]
    log: Path
    done: Path
    after: str | None = None
    run_dir: Path | None = None


def job_seconds(done: Path) -> dict[str, float]:
    """The wall seconds of the finished jobs whose `done` file is in `done`'s folder (job key -> seconds)."""
    path = done.parent / "seconds.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _keep_seconds(job: Job, seconds: float) -> None:
    atomic_write_text(job.done.parent / "seconds.json", json.dumps({**job_seconds(job.done), job.key: seconds}))


def run_jobs(jobs: Sequence[Job], parallel: int, label: str = "paper_table",
             on_done: Callable[[Job], None] | None = None) -> dict[str, float]:
    """Run the unfinished `jobs`, `parallel` at a time, each after its `after` job; raise a CommandError
    (stopping the others) when one fails, naming its log. `on_done(job)` runs after each job that finishes.
    Returns the seconds each job ran."""
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
            _keep_seconds(job, seconds[key])
            finished.add(key)
            if on_done is not None:
                on_done(job)
    return seconds


@dataclass
class RunPlan:
    """One (seed, row) run of the experiment: its folder, what makes it, its evaluation readings (folders of
    the run), its result file, and the key of its last job (its result is kept when that finishes)."""

    seed: int
    row: str
    run: Path
    made_by: dict
    readings: list[str]
    result: Path
    last_job: str

    def finished(self) -> bool:
        """Whether every reading's evaluation is written."""
        return all((self.run / r / "metrics.json").exists() for r in self.readings)


def plan(out: Path, results: Path, mode: Mode, images: int, extra: Sequence[str]) -> tuple[list[Job], list[RunPlan]]:
    """The jobs of an experiment: the pretrained model's evaluation, and per seed and row its training run,
    then the evaluation of its milestones (twice for a guided row, one after the other); none for a run
    whose result is kept in `results` (`pec.experiments.results`). Also returns the runs still to keep."""
    py = [sys.executable, "-m"]
    evaluate = ["--eval.images_per_prompt", str(images), *extra]
    jobs, runs = [], []
    pre = out / PRETRAINED
    pretrained_recipe = results_store.recipe(None, None, extra, images)
    if not results_store.check_recipe(results_store.pretrained_file(results), pretrained_recipe):
        jobs.append(Job("evaluate pretrained", [*py, "pec.evaluate", PRETRAINED, "--out", str(pre), *evaluate],
                        pre / "evaluate.log", pre / "metrics.json"))
    steps = milestone_steps(mode.steps)
    for seed in mode.seeds:
        for row in mode.rows:
            run = seed_dir(out, seed) / row
            options = [*COMMON, *options_of(row), *extra]
            made_by = results_store.recipe(seed, mode.steps, options, images)
            result = results_store.run_file(results, seed, row)
            if results_store.check_recipe(result, made_by):
                continue
            train_key = f"train seed {seed} {row}"
            jobs.append(Job(train_key, [*py, "pec.train", "--run-dir", str(run), "--logging.progress", "false",
                                        "--seed", str(seed), "--train.steps", str(mode.steps),
                                        "--logging.milestone_every", str(max(1, mode.steps // MILESTONES)),
                                        *options],
                            run / "train.log", run / "samples_end.png", run_dir=run))
            readings = [("eval", [])] + ([("eval_guided", ["--eval.guidance", "true"])] if guided(row) else [])
            for folder, reading_options in readings:
                jobs.append(Job(f"evaluate seed {seed} {row} ({folder})",
                                [*py, "pec.evaluate", *(f"{run}@{s}" for s in steps), "--out", str(run / folder),
                                 *reading_options, *evaluate],
                                run / folder / "evaluate.log", run / folder / "metrics.json", after=jobs[-1].key))
            runs.append(RunPlan(seed, row, run, made_by, [r for r, _ in readings], result, jobs[-1].key))
    return jobs, runs


def keep_results(out: Path, results: Path, mode: Mode, images: int, extra: Sequence[str], runs: Sequence[RunPlan]
                 ) -> None:
    """Keep the result of the pretrained evaluation and of every finished run of `runs` not yet kept."""
    pre, pre_file = out / PRETRAINED, results_store.pretrained_file(results)
    if not pre_file.exists() and (pre / "metrics.json").exists():
        results_store.write_pretrained(pre_file, results_store.recipe(None, None, extra, images), pre,
                                       job_seconds(pre / "metrics.json").get("evaluate pretrained"))
    last = milestone_steps(mode.steps)[-1]
    for r in runs:
        if r.finished() and not r.result.exists():
            seconds = {"train": job_seconds(r.run / "samples_end.png").get(f"train seed {r.seed} {r.row}"),
                       **{f"evaluate {x}": job_seconds(r.run / x / "metrics.json").get(
                           f"evaluate seed {r.seed} {r.row} ({x})") for x in r.readings}}
            results_store.write_run(r.result, r.made_by, r.run, r.readings, last, seconds)


def timing_of(results: Path, mode: Mode, jobs: int) -> dict[str, float]:
    """From the kept results of `mode`: the process-minutes of training and evaluation, and the wall time a run
    from scratch would take with `jobs` at a time (process-minutes / jobs; the pretrained evaluation included)."""
    train = evaluate = 0.0
    files = [results_store.run_file(results, seed, row) for seed in mode.seeds for row in mode.rows]
    for f in [results_store.pretrained_file(results), *files]:
        for key, sec in results_store.read(f)["seconds"].items():
            if sec is not None:
                train, evaluate = (train + sec, evaluate) if key == "train" else (train, evaluate + sec)
    return {"train_min": train / 60, "evaluate_min": evaluate / 60, "from_scratch_min": (train + evaluate) / 60 / jobs}


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `python -m pec.experiments.paper_table`, with the exit codes of `pec.cli` (2: an option
    refused before any job starts; 1: a job or the report failed, in one line naming the job's log)."""

    argv, extra = split_passthrough(argv)
    parser = command_parser("python -m pec.experiments.paper_table", __doc__)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", dest="mode", action="store_const", const="quick", help="the quick mode (default)")
    which.add_argument("--full", dest="mode", action="store_const", const="full", help="the full mode (the README's)")
    which.add_argument("--sweep", dest="mode", action="store_const", const="sweep",
                       help="DiverseGRPO's setting sweep at --quick's seeds and steps (sweep.md: the chosen setting)")
    parser.add_argument("--out", default=None, help="output folder of the runs (default: runs/paper_table/<mode>)")
    parser.add_argument("--results", default=None,
                        help="folder of the kept results, one small JSON per finished run: a run kept there is not "
                             "redone, whichever machine made it (default: OUT/results; the README's: "
                             "docs/paper_table/results/<mode>)")
    parser.add_argument("--report", default=None, help="folder of table.md, claims.md, frontier.png, grids.png and "
                                                       "timing.json (default: OUT)")
    parser.add_argument("--jobs", type=int, default=2, help="subprocesses at a time (default: 2, one per core)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: the mode's)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: the mode's)")
    parser.add_argument("--rows", nargs="+", default=None, choices=list(ROWS),
                        help="train only these rows (default: the mode's); grpo is always trained")
    parser.add_argument("--eval.images_per_prompt", dest="images", type=int, default=32,
                        help="images per prompt at evaluation (default: 32)")
    args = parser.parse_args(argv)
    name = args.mode or "quick"
    base = MODES[name]
    rows = tuple(dict.fromkeys(["grpo", *(args.rows or base.rows)]))
    mode = Mode(seeds=tuple(args.seeds or base.seeds), steps=args.steps or base.steps, rows=rows,
                budget_min=base.budget_min)
    out = Path(args.out or f"runs/paper_table/{name}")
    results = Path(args.results) if args.results else out / "results"
    report_dir = Path(args.report) if args.report else out
    with expected_errors(PROG, before_work=True):
        if args.jobs < 1:
            raise ValueError("--jobs must be >= 1")
        if len(set(mode.seeds)) != len(mode.seeds):
            raise ValueError(f"--seeds must be distinct, got {list(mode.seeds)}")
        if mode.steps < 2:
            raise ValueError(f"--steps must be >= 2 (a curve needs two milestones), got {mode.steps}")
        jobs, runs = plan(out, results, mode, args.images, extra)
        for folder in (out, results, report_dir):
            folder.mkdir(parents=True, exist_ok=True)
    print(f"[paper_table] {name} mode: seeds {list(mode.seeds)}, {mode.steps} steps, rows {list(mode.rows)}, "
          f"{args.jobs} jobs, runs in {out}, results in {results} ({len(runs)} runs to do)", flush=True)
    with expected_errors(PROG):
        by_last = {r.last_job: r for r in runs}

        def keep(job: Job) -> None:
            if job.key == "evaluate pretrained" or job.key in by_last:
                keep_results(out, results, mode, args.images, extra, [by_last[job.key]] if job.key in by_last else [])

        start = time.perf_counter()
        keep_results(out, results, mode, args.images, extra, runs)  # runs an earlier invocation finished
        run_jobs(jobs, args.jobs, on_done=keep)
        jobs_done = time.perf_counter()
        report = write_sweep(results, mode) if name == "sweep" else write_report(results, mode, report_dir)
        wall = time.perf_counter() - start
        timing = {"mode": name, "runs_trained": len(runs), "wall_min": wall / 60, "jobs_min": (jobs_done - start) / 60,
                  "report_min": (wall - (jobs_done - start)) / 60, "budget_min": mode.budget_min, "jobs": args.jobs,
                  "headroom": HEADROOM, **timing_of(results, mode, args.jobs)}
        atomic_write_text(report_dir / "timing.json", json.dumps(timing, indent=2) + "\n")
        summary = (f"This invocation: {len(runs)} run{'s' * (len(runs) != 1)} trained, {wall / 60:.1f} min wall "
                   f"(subprocesses {(jobs_done - start) / 60:.1f} min, report {timing['report_min']:.1f} min). "
                   f"From scratch, from the kept results' timings: training "
                   f"{timing['train_min']:.1f} and evaluation {timing['evaluate_min']:.1f} process-min, "
                   f"{timing['from_scratch_min']:.1f} min on {args.jobs} at a time (budget {mode.budget_min:g} min on "
                   f"2 idle cores; within budget on a {HEADROOM:g}x slower machine: "
                   f"{'yes' if timing['from_scratch_min'] * HEADROOM <= mode.budget_min else 'NO'}).")
        atomic_write_text(report_dir / ("sweep.md" if name == "sweep" else "claims.md"), report + "\n" + summary + "\n")
    if name != "sweep":
        print((report_dir / "table.md").read_text())
    print(report)
    print(summary)


if __name__ == "__main__":
    main()
