"""Flow-GRPO-Fast as an algorithm behind the trainer (`--algorithm flow_grpo_fast`): through `pec.train`'s main
on the embedded world shrunk to tools/metrics_equivalence.py's sizes, with its configs' cps kind, each step
trains the window drawn from (seed, step); the draw reads nothing but the configuration (no process RNG, no
rank), so every process and a resumed run plan the same windows."""
import random
import sys
from pathlib import Path

import torch

from pec.algorithms.flow_grpo_fast import FlowGRPOFast, fast_window
from pec.config import parse_config
from pec.logging_utils import read_metrics
from pec.train import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from metrics_equivalence import COMMON  # noqa: E402

# 6 steps: the default range (0, 6 // 2) = (0, 3) with w = 2 draws the start from {0, 1}.
FAST = [*COMMON, "--sampling.num_steps", "6", "--sampling.kind", "cps", "--sampling.eta", "0.8",
        "--train.steps", "3", "--algorithm", "flow_grpo_fast", "--method", "pec", "--flow_grpo_fast.window_size", "2"]


def test_each_step_trains_the_window_drawn_from_the_seed(tmp_path, monkeypatch):
    seen = []
    original = FlowGRPOFast.update

    def update(self, batch):
        seen.append((batch.step, list(batch.trained)))
        return original(self, batch)

    monkeypatch.setattr(FlowGRPOFast, "update", update)
    main([*FAST, "--run-dir", str(tmp_path / "run")])
    windows = [fast_window(0, step - 1, 2, (0, 3), 6) for step in (1, 2, 3)]
    assert len(set(windows)) == 2  # the window moves
    assert seen == [(step, list(range(*w))) for step, w in zip((1, 2, 3), windows)]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(r["first_update_ratio_dev"] == 0.0 and r["grad_norm"] > 0 for r in rows)
    assert all(r["shaped_reward_mean"] != r["reward_mean"] for r in rows)  # PEC's bonus is there


def test_plans_are_the_same_on_every_rank_and_from_the_seed_alone(monkeypatch):
    cfg = parse_config([*FAST, "--flow_grpo_fast.window_range", "1", "5"])
    expected = [fast_window(0, step - 1, 2, (1, 5), 6) for step in range(1, 41)]
    assert {start for start, _ in expected} == {1, 2, 3}
    for rank in ("0", "1", "3"):
        monkeypatch.setenv("RANK", rank)
        random.seed(int(rank) + 11)
        torch.manual_seed(int(rank) + 11)
        algorithm = FlowGRPOFast(cfg, learner=None)  # the plan reads the configuration only
        assert [algorithm.plan(step).sde_window for step in reversed(range(1, 41))][::-1] == expected
    cfg.seed = 1
    assert [FlowGRPOFast(cfg, learner=None).plan(step).sde_window for step in range(1, 41)] != expected
