"""MixGRPO as an algorithm behind the trainer (`--algorithm mixgrpo`), through `pec.train`'s main on the
embedded world shrunk to tools/metrics_equivalence.py's sizes (2 prompts x 4 samples) with 5 sampling steps,
so the window (w 2, moved every step) visits every position and rolls back within 4 steps:
the steps each step trains are WindowSchedule's windows, a group shares its initial noise, a run cut short and
resumed trains what the uninterrupted one did (the window position is in the checkpoint), and resuming under
settings that would move the window is refused. 2 processes against 1: tests/test_distributed.py."""
import sys
from pathlib import Path

import pytest
import torch

from pec.algorithms.mixgrpo import MixGRPO, window_schedule
from pec.checkpoint import checkpoint_files
from pec.config import parse_config
from pec.logging_utils import read_metrics
from pec.train import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from metrics_equivalence import COMMON  # noqa: E402

MIXGRPO = [*COMMON, "--sampling.num_steps", "5", "--train.steps", "4", "--algorithm", "mixgrpo", "--method", "pec",
           "--mixgrpo.window_size", "2", "--mixgrpo.shift_interval", "1"]
# limit = num_steps - 2 = 3: windows [0, 2), [1, 3), [2, 3), then back to [0, 2)
WINDOWS = [(0, 2), (1, 3), (2, 3), (0, 2)]


def _strip_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uninterrupted 4-step run: its rows and, per step, the trained steps and the initial noise."""
    run = tmp_path_factory.mktemp("mixgrpo") / "full"
    seen = []
    original = MixGRPO.update

    def update(self, batch):
        seen.append((batch.step, list(batch.trained), batch.rollout.latents[0].clone()))
        return original(self, batch)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MixGRPO, "update", update)
        main([*MIXGRPO, "--run-dir", str(run)])
    return {"rows": read_metrics(run / "metrics.jsonl"), "seen": seen}


def test_each_step_trains_the_schedules_window_and_groups_share_their_noise(full):
    schedule = window_schedule(parse_config(MIXGRPO))
    assert [step for step, _, _ in full["seen"]] == [1, 2, 3, 4]
    assert [schedule.window(step - 1) for step, _, _ in full["seen"]] == WINDOWS
    assert [trained for _, trained, _ in full["seen"]] == [list(range(*w)) for w in WINDOWS]
    for _, _, noise in full["seen"]:
        groups = noise.reshape(2, 4, -1)  # 2 prompt groups of 4 samples
        assert torch.equal(groups, groups[:, :1].expand_as(groups))  # one initial noise per group
        assert not torch.equal(groups[0, 0], groups[1, 0])
    rows = full["rows"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["first_update_ratio_dev"] == 0.0 and r["grad_norm"] > 0 for r in rows)
    assert all(r["shaped_reward_mean"] != r["reward_mean"] for r in rows)  # PEC's bonus is there


def test_resume_trains_what_the_uninterrupted_run_did(full, tmp_path, capsys):
    run = tmp_path / "cut"
    main([*MIXGRPO, "--run-dir", str(run), "--train.stop_after", "2"])
    saved = torch.load(checkpoint_files(run)[0], weights_only=True)
    assert saved["step"] == 2 and saved["extra"]["algorithm"] == {"window": {"iteration": 1, "start": 1, "end": 3}}
    # Settings that would put another window at the checkpoint's iteration are refused before any step.
    with pytest.raises(SystemExit) as refused:
        main(["--run-dir", str(run), "--resume", "--mixgrpo.shift_interval", "2"])
    message = capsys.readouterr().err
    assert refused.value.code == 2 and len(message.strip().splitlines()) == 1, message
    assert "the checkpoint's MixGRPO window at iteration 1 was [1, 3] but these mixgrpo settings give [0, 2]" in message
    main(["--run-dir", str(run), "--resume"])
    assert _strip_times(read_metrics(run / "metrics.jsonl")) == _strip_times(full["rows"])
