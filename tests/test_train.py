"""The trainer on a tiny random world: every method runs, on-policy ratio is 1, resume loses no step,
bad configs fail at start-up. Tiny sizes (2 prompts x 3 samples, 2 denoising steps) keep it fast."""
import math

import pytest
import torch

from pec.logging_utils import read_metrics
from pec.train import main
from pec.trainer import Trainer

from _tiny_runs import tiny_config


METHODS = {
    "grpo": {"method": "grpo"},
    "grpo_kl": {"method": "grpo", "train": {"kl_beta": 0.1}},
    "grpo_full_kl": {"method": "grpo", "train": {"kl_beta": 0.1, "lora": False}},
    "entropy_bonus": {"method": "entropy_bonus"},
    "pec": {"method": "pec"},
    "pec_gaussian": {"method": "pec", "perceptual": {"estimator": "gaussian"}},
    "pcgs_reward": {"method": "pcgs"},
    "pcgs_guided": {"method": "pcgs", "pcgs": {"form": "guided", "guidance_weight": 0.5}},
}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_and_first_ratio_is_exactly_one(world, tmp_path, name):
    trainer = Trainer(tiny_config(world, tmp_path / name, **METHODS[name]))
    before = {k: v.clone() for k, v in trainer.policy.trainable_state().items()}
    (row,) = trainer.run()
    assert row["step"] == 1
    assert all(math.isfinite(v) for k, v in row.items() if isinstance(v, float)), row
    assert row["first_update_ratio_dev"] == 0.0
    assert row["ratio_mean"] == 1.0 and row["clip_fraction"] == 0.0
    after = trainer.policy.trainable_state()
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter changed"
    if "kl_beta" in METHODS[name].get("train", {}):
        assert row["kl"] == 0.0  # the first update starts at the reference
    for space in trainer.cfg.perceptual.spaces:
        assert f"perc_knn/{space}" in row and f"perc_gauss/{space}" in row and f"diversity/{space}" in row
    for artefact in ("metrics.jsonl", "config.yaml", "checkpoints/step-00000001.pt", "samples_start.png",
                     "samples_end.png", "curves.png"):
        assert (tmp_path / name / artefact).exists(), artefact


def test_pcgs_guided_rollout_stores_the_guidance(world, tmp_path):
    trainer = Trainer(tiny_config(world, tmp_path, method="pcgs", pcgs={"form": "guided"}))
    rollout = trainer.rollout(1)
    assert rollout.guidance is not None and rollout.guidance.abs().sum() > 0
    assert Trainer(tiny_config(world, tmp_path / "b", method="pcgs")).rollout(1).guidance is None


def test_entropy_bonus_cannot_change_training_and_policy_entropy_is_constant(world, tmp_path):
    rows = {m: Trainer(tiny_config(world, tmp_path / m, method=m, train={"steps": 2, "lr": 1e-2})).run()
            for m in ("grpo", "entropy_bonus")}
    for a, b in zip(rows["grpo"], rows["entropy_bonus"]):
        assert a["reward_mean"] == b["reward_mean"] and a["grad_norm"] == b["grad_norm"]
        assert a["perc_knn/simclr"] == b["perc_knn/simclr"]
    entropies = [r["policy_entropy"] for r in rows["grpo"]]
    assert entropies[0] == entropies[1]  # weights changed between the steps; the entropy did not
    assert rows["grpo"][0]["reward_mean"] != rows["grpo"][1]["reward_mean"]


def test_sde_window_trains_only_window_steps(world, tmp_path):
    trainer = Trainer(tiny_config(world, tmp_path, sampling={"num_steps": 3, "sde_window": [1, 2]}))
    rollout = trainer.rollout(1)
    assert rollout.train_steps() == [1]
    assert (rollout.log_probs[[0, 2]] == 0).all() and (rollout.log_probs[1] != 0).all()
    (row,) = trainer.run()
    assert row["first_update_ratio_dev"] == 0.0


def test_micro_batching_accumulates_the_same_gradient(world, tmp_path):
    # AdamW's first moment after one update is (1 - beta1) * the accumulated gradient; the weights
    # themselves are a poor witness (Adam turns rounding noise in near-zero gradients into +-lr steps).
    moments = []
    for micro in (2, 6):
        trainer = Trainer(tiny_config(world, tmp_path / str(micro), train={"micro_batch": micro}))
        trainer.run()
        moments.append([s["exp_avg"] for s in trainer.optimizer.state_dict()["state"].values()])
    for a, b in zip(*moments):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


def test_second_minibatch_is_off_policy_and_clipped(world, tmp_path):
    trainer = Trainer(tiny_config(world, tmp_path, train={"minibatches": 2, "micro_batch": 3, "lr": 0.05,
                                                          "clip_range": 1e-6}))
    (row,) = trainer.run()
    assert row["first_update_ratio_dev"] == 0.0
    assert row["clip_fraction"] > 0.0


def _strip_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_resume_loses_and_duplicates_no_step(world, tmp_path):
    steps = {"train": {"steps": 3}}
    full = Trainer(tiny_config(world, tmp_path / "full", method="pec", **steps)).run()
    run = tmp_path / "cut"
    Trainer(tiny_config(world, run, method="pec", train={"steps": 3, "stop_after": 2})).run()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    # A step that finished after the last checkpoint is dropped and redone on resume.
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "reward_mean": 123.0}\n{"step": 4, "rew')
    main(["--run-dir", str(run), "--resume", "--logging.progress", "false"])
    resumed = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert _strip_times(resumed) == _strip_times(full)


@pytest.mark.parametrize("argv, message", [
    (["--method", "ppo"], "method must be one of"),
    (["--method", "pec", "--sampling.group_size", "1"], "group_size 2 or more"),
    (["--sampling.group_size", "3", "--perceptual.k", "3"], "lower --perceptual.k"),
    (["--resume", "--run-dir", "nowhere"], "config.yaml does not exist"),
])
def test_bad_configs_fail_at_start_up(argv, message, capsys):
    with pytest.raises(SystemExit, match=message) as exc:
        main(argv)
    assert exc.value.code == 2  # input refused before any work (README, "Exit codes")
    assert "Traceback" not in capsys.readouterr().err


def test_existing_run_needs_resume(world, tmp_path):
    Trainer(tiny_config(world, tmp_path)).run()
    with pytest.raises(ValueError, match="pass --resume"):
        Trainer(tiny_config(world, tmp_path))


def test_batch_scope_and_feature_bank_survive_a_resume(world, tmp_path):
    overrides = {"method": "pec", "perceptual": {"k": 1, "scope": "batch", "bank_steps": 2}, "train": {"steps": 3}}
    full = Trainer(tiny_config(world, tmp_path / "full", **overrides)).run()
    assert "perc_knn_bank/simclr" not in full[0]
    for row in full[1:]:
        assert math.isfinite(row["perc_knn_bank/simclr"]) and math.isfinite(row["perc_knn_batch/simclr"])
    run = tmp_path / "cut"
    Trainer(tiny_config(world, run, **{**overrides, "train": {"steps": 3, "stop_after": 2}})).run()
    main(["--run-dir", str(run), "--resume", "--logging.progress", "false"])
    assert _strip_times(read_metrics(run / "metrics.jsonl")) == _strip_times(full)
