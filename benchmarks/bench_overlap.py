"""Rewards off the critical path (issue 20, item 5): training steps with a slow `http` reward, scored after the
whole rollout (`--train.overlap_scoring false`) against scored micro-batch by micro-batch while the next one
samples (the default), both trainers in this process.

The reward server is `pec.rewards.serve` on loopback in its own process (as a real reward server is; in this
one it would take the trainers' interpreter lock to parse and decode requests). It serves a reward that
sleeps SLEEP_S (50 ms) per request, then returns each image's mean pixel, and scores one request at a time,
as a GPU reward server does. Both trainers run the embedded default (4 prompts x 8 samples, 10 SDE steps,
no CFG, LoRA) with `train.micro_batch` MICRO_BATCH, so a step sends 32 / MICRO_BATCH requests, one per
micro-batch. Their steps are timed in turns (`bench_iteration._interleaved_medians_s`), and their metrics
rows (but time/*) must be equal: the serial and overlapped paths train the same.
Run: `pytest benchmarks/bench_overlap.py --benchmark-only -s` (about a minute on 2 cores).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from _timing import Measurement, run_benchmark
from bench_iteration import _interleaved_medians_s
from pec.config import Config, apply_dict
from pec.trainer import Trainer

SLEEP_S = 0.05
MICRO_BATCH = 8
REPS = 5
REPO = Path(__file__).resolve().parents[1]
# The server process: each image's mean pixel, after sleeping argv[1] seconds per call (one call per request).
SERVER = """
import sys, time, torch
from pec.rewards.serve import start_server
class SlowReward(torch.nn.Module):
    def forward(self, images, prompts):
        time.sleep(float(sys.argv[1]))
        return images.float().mean(dim=tuple(range(1, images.dim())))
torch.set_num_threads(1)
with start_server(SlowReward(), "slow") as server:
    print(server.url, flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
"""


@contextlib.contextmanager
def slow_reward_server(sleep_s: float) -> Iterator[str]:
    """The URL of a reward server process that sleeps `sleep_s` per request (stopped on exit)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(sleep_s)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://"), f"the reward server did not start (said {url!r})"
        yield url
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def _trainer(run_dir: Path, url: str, overlap: bool) -> Trainer:
    cfg = Config()
    apply_dict(cfg, {"device": "cpu", "run_dir": str(run_dir), "seed": 0, "reward": "http",
                     "paths": {"reward_url": url},
                     "train": {"micro_batch": MICRO_BATCH, "overlap_scoring": overlap},
                     "logging": {"tensorboard": False, "progress": False}})
    return Trainer(cfg)


def test_overlapped_scoring_with_a_slow_http_reward(benchmark, result_table):
    torch.manual_seed(0)
    rows: dict[str, list[dict]] = {"serial": [], "overlapped": []}
    with tempfile.TemporaryDirectory() as tmp, slow_reward_server(SLEEP_S) as url:
        trainers = {name: _trainer(Path(tmp) / name, url, name == "overlapped") for name in rows}
        s, b = trainers["serial"].cfg.sampling, trainers["serial"].cfg.sampling.prompts_per_step
        case = (f"cpu step, embedded model, B={b}x{s.group_size}, {s.num_steps} SDE steps, micro_batch {MICRO_BATCH}, "
                f"http reward sleeping {SLEEP_S * 1e3:.0f} ms a request ({torch.get_num_threads()} threads)")
        medians = _interleaved_medians_s(
            {name: (lambda rep, name=name: rows[name].append(trainers[name].train_step(rep + 1)))
             for name in trainers}, REPS)
        run_benchmark(benchmark, lambda: trainers["overlapped"].train_step(REPS + 2), rounds=1, warmup_rounds=0)
        for trainer in trainers.values():
            trainer.scorer.close()
    same = [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows["serial"]] == \
           [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows["overlapped"]]
    assert same, "the overlapped steps' metrics differ from the serial steps'"
    for name, seconds in medians.items():
        phases = {key: statistics.median(row[f"time/{key}"] for row in rows[name]) * 1e3
                  for key in ("rollout", "reward")}
        result_table.add(case, f"{name} (Trainer.train_step)", Measurement(seconds * 1e3),
                         f"median phases: rollout {phases['rollout']:.0f} ms, then waiting for rewards "
                         f"{phases['reward']:.0f} ms")
    result_table.add_ratio(case, "speed overlapped / serial", medians["serial"] / medians["overlapped"])
    result_table.note(f"ms are medians of {REPS} steps, the two trainers timed in turns after one warm-up step each; "
                      "their metrics rows (but time/*) are equal")
    print(f"\nspeed overlapped / serial: {medians['serial'] / medians['overlapped']:.2f}x", flush=True)
