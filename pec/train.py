"""`python -m pec.train`: an RL algorithm with a regulariser on a flow-matching model.

Algorithms (`--algorithm`, `pec.algorithms`): flow_grpo, mixgrpo (a sliding SDE window, --mixgrpo.*),
flow_grpo_fast (a random SDE window each step, --flow_grpo_fast.*), grpo_guard (GRPO-Guard's normalised
ratio, --grpo_guard.*), nft (DiffusionNFT, --nft.*). Regularisers (`--method`, `pec.methods`): none
(also spelled grpo; with --train.kl_beta: GRPO + KL; with --train.clip_range_high: Clip-Higher),
entropy_bonus and entropy_sample (the policy-entropy bonus, analytic and per sample), perc_entropy_bonus,
pec, pcgs (reward or guided form), clip_cov and kl_cov (native or perceptual). A regulariser that needs
what the algorithm lacks (per-step log-probs, a PPO ratio) is refused before any model loads.

The loop itself is `pec.trainer.Trainer`: a step reads as rollout, scoring, reward shaping and the
algorithm's update; see there. Every step appends a row to metrics.jsonl (and TensorBoard) and, by
default, writes a checkpoint; `--resume` continues from the newest valid one.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from pec.checks import check_run
from pec.cli import (
    EXPECTED,
    CommandError,
    best_effort,
    command_parser,
    expected_errors,
    fail,
    one_line,
    signal_exit_code,
)
from pec.config import Config, add_config_arguments, apply_dict, config_from_args, load_yaml
from pec.run_safety import Preempted, TrainingStopped
from pec.trainer import Trainer

PROG = "pec.train"


def build_parser() -> argparse.ArgumentParser:
    """The `python -m pec.train` argument parser (one option per config field)."""
    parser = command_parser("python -m pec.train", __doc__)
    add_config_arguments(parser)
    return parser


def config_from_argv(argv: Sequence[str] | None = None) -> Config:
    """Config from the command line; with --resume, the run folder's config.yaml is the base."""
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    if cfg.resume and cfg.run_dir:
        saved = Path(cfg.run_dir) / "config.yaml"
        if not saved.exists():
            raise ValueError(f"--resume: {saved} does not exist; is --run-dir the folder of an earlier run?")
        base = Config()
        apply_dict(base, load_yaml(saved))
        cfg = config_from_args(args, base)
    return check_run(cfg)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `python -m pec.train`, with the exit codes of `pec.cli`.

    Exits 2 with one line for a configuration or run folder refused at start-up; 1 with one line for a
    run that cannot go on (a full disk, a peer gone, too many skipped updates), naming the checkpoint to
    resume from, if any; 128 + the signal number after SIGTERM/SIGINT, once the last complete step is
    checkpointed.
    """
    with expected_errors(PROG, before_work=True):
        cfg = config_from_argv(argv)
        try:
            trainer = Trainer(cfg)
        except torch.distributed.DistError as err:
            raise CommandError(f"could not set up the process group ({one_line(err)}): a process died or did "
                               f"not join within --dist.timeout {cfg.dist.timeout:g} s") from err
    try:
        with expected_errors(PROG):
            try:
                trainer.run()
            except Preempted as sig:
                code = signal_exit_code(sig.signum)
                if trainer.dist.is_main:
                    fail(PROG, f"{sig.signame}: stopped after step {trainer.last_complete}; {trainer.recovery()}",
                         code)
                raise SystemExit(code) from None
            except (TrainingStopped, *EXPECTED) as err:
                raise CommandError(f"{one_line(err)}; {trainer.recovery()}") from err
            except RuntimeError as err:
                if not trainer.dist.active:
                    raise
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise CommandError(f"rank {trainer.dist.rank}: a collective failed ({first}): another process "
                                   f"died or did not answer within --dist.timeout {trainer.cfg.dist.timeout:g} s; "
                                   f"{trainer.recovery()}") from err
    finally:
        with best_effort("leaving the process group"):
            trainer.dist.close()
    if trainer.dist.is_main:
        print(f"run folder: {trainer.run_dir}")


if __name__ == "__main__":
    main()
