"""Run safety (issue 7): bad numbers never reach the weights, checkpoints never go backwards, SIGTERM
checkpoints the last complete step and the resumed run matches an uninterrupted one, config errors are
one line. Tiny runs (2 prompts x 3 samples, 2 denoising steps) keep it fast."""
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import _bad_rewards  # noqa: F401  (registers the test rewards)
from pec.checkpoint import (NonFiniteStateError, checkpoint_files, load_checkpoint, milestone_files,
                            read_checkpoint, save_checkpoint)
from pec.config import to_dict
from pec.entropy import group_entropy
from pec.grpo import group_advantages
from pec.logging_utils import read_metrics
from pec.metrics import group_pairwise_distance, mean_pairwise_distance
from pec.regularizers import latent_group_log_density
from pec.run_safety import Preempted, PreemptionHandler, TrainingStopped, sample_validity
from pec.train import main
from pec.trainer import Trainer

from _tiny_runs import tiny_config

TESTS = Path(__file__).parent


def _strip_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def _all_finite(payload):
    tensors = list(payload["model"].values())
    for state in payload["optimizer"]["state"].values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


# ---------------------------------------------------------------------------------------------- masks


def test_masked_advantages_and_entropy_use_the_valid_samples_only():
    rewards = torch.tensor([1.0, float("nan"), 3.0, 0.5, 2.0, float("inf"), 4.0, 1.0])
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    feats = torch.randn(8, 5)
    finite, valid = sample_validity(4, 3, rewards, feats)
    assert finite.tolist() == [True, False, True, True, True, False, True, True]
    adv = group_advantages(rewards, group_ids, valid=valid)
    assert torch.isfinite(adv).all() and adv[1] == 0 and adv[5] == 0
    expected = group_advantages(rewards[valid], group_ids[valid])
    torch.testing.assert_close(adv[valid], expected)
    # A group left with fewer than min_valid samples drops out whole.
    _, valid = sample_validity(4, 4, rewards, feats)
    assert not valid.any()
    # The masked kNN entropy of a group is that of its valid rows alone.
    groups = feats.reshape(2, 4, 5).clone()
    groups[0, 1] = float("nan")
    mask = finite.reshape(2, 4)
    out = group_entropy(groups, k=1, valid=mask)
    alone = group_entropy(groups[0, [0, 2, 3]][None], k=1)
    torch.testing.assert_close(out.entropy[0], alone.entropy[0])
    assert out.surprisal[0, 1] == 0 and torch.isfinite(out.surprisal).all()
    # So are its within-group diversity and the PCGS latent_group density.
    latents = torch.randn(8, 2, 3)
    latents[1] = float("nan")
    density = latent_group_log_density(latents, 4, valid=finite)
    alone = latent_group_log_density(latents[[0, 2, 3]], 3)
    torch.testing.assert_close(density[[0, 2, 3]], alone)
    assert density[1] == 0
    spread = group_pairwise_distance(groups, mask)
    assert spread[0] == pytest.approx(mean_pairwise_distance(groups[0, [0, 2, 3]]))
    assert spread[1] == pytest.approx(mean_pairwise_distance(groups[1, [0, 2, 3]]))


def test_nan_reward_at_step_3_is_masked_and_never_reaches_a_checkpoint(world, tmp_path):
    # micro_batch 6: the whole batch is scored in one call, so call 3 is step 3.
    cfg = tiny_config(world, tmp_path, method="pec", reward="nan_at_call3", train={"steps": 4, "micro_batch": 6},
                      logging={"keep_checkpoints": 10})
    rows = Trainer(cfg).run()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert all(math.isfinite(v) for k, v in row.items() if isinstance(v, float)), row
        assert row["skipped_updates"] == 0
    # Sample 0 (group 0) and samples 3, 4 (group 1, which keeps 1 < k + 1 = 2 valid samples).
    masks = [(r["mask/invalid_samples"], r["mask/masked_samples"], r["mask/masked_groups"]) for r in rows]
    assert masks == [(0, 0, 0), (0, 0, 0), (3, 4, 1), (0, 0, 0)]
    logged = read_metrics(tmp_path / "metrics.jsonl")
    assert logged[2]["mask/masked_samples"] == 4
    files = checkpoint_files(tmp_path)
    assert len(files) == 4
    for path in files:
        assert _all_finite(read_checkpoint(path)), path


def test_non_finite_gradient_skips_the_update_and_leaves_the_weights(world, tmp_path):
    trainer = Trainer(tiny_config(world, tmp_path, train={"steps": 1}))
    before = {k: v.clone() for k, v in trainer.policy.trainable_state().items()}
    param = trainer.policy.trainable_parameters()[0]
    hook = param.register_hook(lambda g: g * float("nan"))
    (row,) = trainer.run()
    hook.remove()
    assert row["skipped_updates"] == 1 and math.isnan(row["grad_norm"])
    after = trainer.policy.trainable_state()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.optimizer.state_dict()["state"] == {}  # no moment was touched either
    assert _all_finite(load_checkpoint(tmp_path))


def test_consecutive_skipped_updates_stop_the_run_naming_step_and_cause(world, tmp_path):
    trainer = Trainer(tiny_config(world, tmp_path, train={"steps": 6, "max_bad_steps": 2}))
    param = trainer.policy.trainable_parameters()[0]
    param.register_hook(lambda g: g * float("inf"))
    with pytest.raises(TrainingStopped, match=r"stopped at step 2: 2 consecutive.*step 1: minibatch 0: "
                                              r"non-finite gradient.*step 2"):
        trainer.run()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert load_checkpoint(tmp_path)["step"] == 2


# ---------------------------------------------------------------------------------------------- checkpoints


def _state(value=1.0):
    return {"w": torch.full((3,), value)}


def test_non_finite_state_is_never_written(tmp_path):
    save_checkpoint(tmp_path, step=1, model_state=_state(), optimizer_state={}, config={})
    with pytest.raises(NonFiniteStateError, match="model.w"):
        save_checkpoint(tmp_path, step=2, model_state=_state(float("nan")), optimizer_state={}, config={})
    moments = {"state": {0: {"exp_avg_sq": torch.tensor([1.0, float("inf")])}}, "param_groups": []}
    with pytest.raises(NonFiniteStateError, match="exp_avg_sq"):
        save_checkpoint(tmp_path, step=2, model_state=_state(), optimizer_state=moments, config={})
    assert [p.name for p in checkpoint_files(tmp_path)] == ["step-00000001.pt"]


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_a_write_killed_halfway_leaves_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    save_checkpoint(tmp_path, step=1, model_state=_state(1.0), optimizer_state={}, config={})
    real_save = torch.save

    def torn_save(obj, fh):
        real_save(obj, fh)
        fh.truncate(fh.tell() // 2)
        raise failure if isinstance(failure, OSError) else failure()

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(type(failure) if isinstance(failure, OSError) else failure):
        save_checkpoint(tmp_path, step=2, model_state=_state(2.0), optimizer_state={}, config={})
    monkeypatch.undo()
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    payload = load_checkpoint(tmp_path)
    assert payload["step"] == 1 and torch.equal(payload["model"]["w"], _state(1.0)["w"])


def test_resume_skips_a_torn_newest_checkpoint_and_says_which_it_took(world, tmp_path, capsys):
    Trainer(tiny_config(world, tmp_path, train={"steps": 2})).run()
    newest = tmp_path / "checkpoints" / "step-00000002.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # e.g. a copy that died halfway
    trainer = Trainer(tiny_config(world, tmp_path, train={"steps": 3}, resume=True))
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step-00000002.pt" in err
    assert "resuming from" in err and "step-00000001.pt (step 1)" in err
    assert trainer.start_step == 1


def test_resume_rejects_a_checkpoint_of_another_model_config(world, tmp_path):
    Trainer(tiny_config(world, tmp_path)).run()
    with pytest.raises(FileNotFoundError, match="train.lora_rank is 8 in the checkpoint but 4 now"):
        Trainer(tiny_config(world, tmp_path, train={"steps": 2, "lora_rank": 4}, resume=True))


def test_rotation_keeps_the_newest_and_every_milestone(world, tmp_path):
    Trainer(tiny_config(world, tmp_path, train={"steps": 5},
                        logging={"keep_checkpoints": 2, "milestone_every": 2})).run()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004.pt", "step-00000005.pt"]
    assert [p.name for p in milestone_files(tmp_path)] == ["step-00000002.pt", "step-00000004.pt"]
    assert read_checkpoint(milestone_files(tmp_path)[0])["step"] == 2


# ---------------------------------------------------------------------------------------------- signals


def test_a_signal_abandons_an_abandonable_region_and_is_held_outside_it():
    with PreemptionHandler() as handler:
        with pytest.raises(Preempted):
            with handler.abandonable():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
        handler.signum = None
        with handler.abandonable():
            handler.commit()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
        with pytest.raises(Preempted, match="SIGTERM"):
            handler.check()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_mid_step_checkpoints_the_last_complete_step_and_resume_matches(world, tmp_path):
    overrides = dict(method="pec", reward="slow_at_call3", train={"steps": 4, "micro_batch": 6},
                     logging={"checkpoint_every": 10})
    full = Trainer(tiny_config(world, tmp_path / "full", **overrides)).run()

    run = tmp_path / "cut"
    config = tmp_path / "cut.yaml"
    config.write_text(yaml.safe_dump(to_dict(tiny_config(world, run, **overrides))))
    marker = tmp_path / "in_step_3"
    script = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import _bad_rewards; "
              f"from pec.train import main; main(['--config', {str(config)!r}])")
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PEC_TEST_MARKER": str(marker)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never reached step 3"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err and "--resume" in err and f"--run-dir {run}" in err
    assert [p.name for p in checkpoint_files(run)] == ["step-00000002.pt"]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]

    main(["--run-dir", str(run), "--resume", "--logging.progress", "false"])
    assert _strip_times(read_metrics(run / "metrics.jsonl")) == _strip_times(full)


# ---------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("content", [None, "method: [unclosed"])
def test_a_missing_or_broken_config_file_is_one_line_naming_it(tmp_path, content):
    path = tmp_path / "run.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(path)])
    message = str(exc.value)
    assert message.startswith("pec.train: ") and str(path) in message and "\n" not in message
    assert exc.value.code == 2
