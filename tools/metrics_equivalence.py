"""Do two versions of the trainer train the same? Runs a fixed set of short runs, one per kind of run the
package offers (every regulariser, the KL, Clip-Higher, the SDE kinds and windows, CFG, full fine-tuning,
several minibatches, the batch scope and feature bank, PCGS's forms and densities), and compares their
metrics.jsonl rows on every key but `time/*`.

    python tools/metrics_equivalence.py compare OLD_COMMIT [NEW_COMMIT] [--save-old OLD.json]   # bit for bit
    python tools/metrics_equivalence.py record OUT.json [--tree DIR]      # the rows of one tree, as JSON

`compare` checks out each commit into a temporary git worktree (NEW_COMMIT defaults to the working tree)
and runs every case there as `python -m pec.train` with that tree first on PYTHONPATH, so it can compare
any two commits, even ones that predate this script. Exit status 0 when every row is equal bit for bit.

Shown on this project's 2-core CPU machine, 2026-12-06: `compare 7c92baa HEAD` (7c92baa: main after the
trust issue, before the restructuring into algorithms; HEAD: with five algorithms, the sampler's experts,
solvers and renorm, video and sharded loading merged) printed "20 cases, 40 rows: bit for bit equal".

The recorded rows of the version before the trainer's restructuring live in
tests/data/metrics_before_algorithms.json; tests/test_metrics_equivalence.py replays every case in CI and
compares at rtol 1e-6 (CI may run on another CPU, which rounds differently).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Short runs of the shipped embedded world: 2 prompts x 4 samples, 4 denoising steps, 2 training steps.
COMMON = ["--train.steps", "2", "--sampling.prompts_per_step", "2", "--sampling.group_size", "4",
          "--sampling.num_steps", "4", "--train.micro_batch", "8", "--perceptual.k", "2",
          "--logging.tensorboard", "false", "--logging.progress", "false", "--logging.grid_samples", "1",
          "--device", "cpu", "--threads", "1"]
CASES: dict[str, list[str]] = {
    "grpo": ["--method", "grpo"],
    "grpo_kl": ["--method", "grpo", "--train.kl_beta", "0.04", "--train.kl_units", "flow_grpo"],
    "clip_higher": ["--method", "grpo", "--train.minibatches", "2", "--train.clip_range_high", "1.4e-3"],
    "entropy_bonus": ["--method", "entropy_bonus"],
    "entropy_sample": ["--method", "entropy_sample"],
    "perc_entropy_bonus": ["--method", "perc_entropy_bonus"],
    "pec": ["--method", "pec"],
    "pec_late_gaussian": ["--method", "pec", "--pec.omega", "late", "--perceptual.estimator", "gaussian"],
    "pec_batch_bank": ["--method", "pec", "--perceptual.scope", "batch", "--perceptual.bank_steps", "2"],
    "pcgs_policy": ["--method", "pcgs"],
    "pcgs_latent": ["--method", "pcgs", "--pcgs.generation_density", "latent_group"],
    "pcgs_guided": ["--method", "pcgs", "--pcgs.form", "guided", "--pcgs.guidance_window", "0", "2"],
    "clip_cov": ["--method", "clip_cov", "--cov.variant", "perceptual", "--train.minibatches", "2"],
    "clip_cov_native": ["--method", "clip_cov", "--cov.variant", "native", "--train.minibatches", "2"],
    "kl_cov": ["--method", "kl_cov", "--cov.variant", "perceptual", "--train.minibatches", "2"],
    "kl_cov_native": ["--method", "kl_cov", "--cov.variant", "native", "--train.minibatches", "2"],
    "dance_window": ["--method", "pec", "--sampling.kind", "dance", "--sampling.sde_window", "1", "3"],
    "cps_fraction": ["--method", "grpo", "--sampling.kind", "cps", "--train.timestep_fraction", "0.99"],
    "cfg_local_std": ["--method", "pec", "--sampling.guidance_scale", "2", "--train.global_std", "false"],
    "full_finetune": ["--method", "pec", "--train.lora", "false", "--train.lr", "1e-4"],
}


def run_case(name: str, run_dir: Path, tree: Path | None = None) -> list[dict]:
    """Train case `name` into `run_dir` (with `tree` first on PYTHONPATH, in a subprocess; in this process
    when None) and return its metrics rows without `time/*`."""
    argv = [*COMMON, *CASES[name], "--run-dir", str(run_dir)]
    if tree is None:
        from pec.train import main

        main(argv)
    else:
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
        subprocess.run([sys.executable, "-m", "pec.train", *argv], cwd=tree, env=env, check=True,
                       stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


def record(tree: Path | None, names: list[str] | None = None) -> dict[str, list[dict]]:
    """Every case's rows on `tree` (None: this process's `pec`)."""
    with tempfile.TemporaryDirectory() as tmp:
        return {name: run_case(name, Path(tmp) / name, tree) for name in names or CASES}


def differences(old: dict[str, list[dict]], new: dict[str, list[dict]], rtol: float = 0.0) -> list[str]:
    """Where `new` differs from `old`: missing cases, other keys, or values beyond `rtol` (0: bit for bit;
    NaN equals NaN)."""
    out = []
    for name, rows in old.items():
        if name not in new:
            out.append(f"{name}: missing")
            continue
        if len(rows) != len(new[name]):
            out.append(f"{name}: {len(rows)} rows, then {len(new[name])}")
            continue
        for a, b in zip(rows, new[name]):
            if set(a) != set(b):
                out.append(f"{name} step {a.get('step')}: keys differ: {sorted(set(a) ^ set(b))}")
                continue
            for key in a:
                x, y = a[key], b[key]
                same = (x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
                        or (rtol > 0 and isinstance(x, (int, float)) and isinstance(y, (int, float))
                            and abs(x - y) <= rtol * max(abs(x), abs(y))))
                if not same:
                    out.append(f"{name} step {a.get('step')}: {key} {x!r} -> {y!r}")
    return out


def _worktree(commit: str, folder: Path) -> Path:
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(folder), commit], check=True)
    for ext in REPO.glob("pec_kernels/_C*.so"):  # the compiled extension is not tracked: share this tree's
        (folder / "pec_kernels" / ext.name).symlink_to(ext)
    return folder


def main(argv: list[str] | None = None) -> int:
    """Entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python tools/metrics_equivalence.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record", help="write one tree's rows as JSON")
    rec.add_argument("out", type=Path)
    rec.add_argument("--tree", type=Path, default=None, help="a source tree (default: this process's pec)")
    cmp = commands.add_parser("compare", help="run both commits here and compare bit for bit")
    cmp.add_argument("old")
    cmp.add_argument("new", nargs="?", default=None, help="default: the working tree")
    cmp.add_argument("--save-old", type=Path, default=None, help="also write the old commit's rows as JSON")
    args = parser.parse_args(argv)
    if args.command == "record":
        args.out.write_text(json.dumps(record(args.tree), indent=1) + "\n")
        print(f"recorded {len(CASES)} cases in {args.out}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = _worktree(args.old, Path(tmp) / "old")
        new_tree = REPO if args.new is None else _worktree(args.new, Path(tmp) / "new")
        try:
            old, new = record(old_tree), record(new_tree)
        finally:
            for tree in {old_tree, new_tree} - {REPO}:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    if args.save_old is not None:
        args.save_old.write_text(json.dumps(old, indent=1) + "\n")
    diffs = differences(old, new)
    for line in diffs:
        print(line)
    print(f"{len(CASES)} cases, {sum(len(r) for r in old.values())} rows: "
          f"{'bit for bit equal' if not diffs else f'{len(diffs)} differences'} ({args.old} vs {args.new or 'working tree'})")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
