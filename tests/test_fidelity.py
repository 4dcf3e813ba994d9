"""Fidelity to the references (DESIGN.md 2.1, 2.3): which steps are SDE steps and which train.

- A step whose noise std is 0 (the last `cps` step, sigma_next = 0) is an ODE step: never trained, no
  policy entropy, and it does not dilute the gradient of the steps that do train.
- `train.timestep_fraction` (Flow-GRPO's rule): the first int(T * fraction) steps train; the later ones
  are still sampled with noise. The shipped Flow-GRPO configs set 0.99.
"""
import math
from pathlib import Path

import pytest
import torch

from pec.config import Config, apply_dict, load_yaml
from pec.regularizers import policy_entropy
from pec.sampling import sample, step_log_prob
from pec.trainer import Trainer
from pec_kernels.sde import guided_sde_step, step_sigmas

from _tiny_runs import tiny_config

PROMPTS = ["a handwritten 3", "the digit seven"]
CONFIGS = Path(__file__).resolve().parent.parent / "pec" / "configs"


def _capture_updates(trainer):
    """Record the batch of each algorithm update, and the parameters and their gradients before each
    optimizer step."""
    calls, grads = [], []
    update, step = trainer.algorithm.update, trainer.optimizer.step

    def recording_update(batch):
        calls.append({"rollout": batch.rollout, "trained": list(batch.trained),
                      "advantages": batch.advantages.clone()})
        return update(batch)

    def recording_step(*args, **kwargs):
        grads.append([(p.detach().clone(), p.grad.clone())
                      for group in trainer.optimizer.param_groups for p in group["params"]])
        return step(*args, **kwargs)

    trainer.algorithm.update = recording_update
    trainer.optimizer.step = recording_step
    return calls, grads


# ---------------------------------------------------------------------------------------------------
# Item 9: zero-std steps are ODE steps.

def test_cps_last_step_is_an_ode_step_and_never_trained(model):
    r = sample(model, PROMPTS, group_size=2, num_steps=4, eta=0.7, kind="cps", seed=0)
    assert r.sde_steps.tolist() == [True, True, True, False]
    assert r.train_steps() == [0, 1, 2]
    assert r.step_std[-1] == 0 and (r.step_std[:-1] > 0).all()
    assert (r.log_probs[-1] == 0).all() and (r.log_probs[:-1] != 0).all()
    with pytest.raises(ValueError, match="noise std"):
        step_log_prob(model, r, 3)
    # The host's noise std of each trained step is the kernel's.
    for t in r.train_steps():
        torch.testing.assert_close(step_log_prob(model, r, t).std, r.step_std[t].expand(r.batch_size))
    # The window does not make the zero-std step an SDE step; the other kinds keep their last step.
    assert sample(model, PROMPTS, num_steps=4, kind="cps", sde_window=(2, 4), seed=0).train_steps() == [2]
    for kind in ("flow", "dance"):
        assert sample(model, PROMPTS, num_steps=4, kind=kind, seed=0).train_steps() == [0, 1, 2, 3]


def test_policy_entropy_refuses_a_zero_std():
    with pytest.raises(ValueError, match="ODE step"):
        policy_entropy(torch.tensor([0.3, 0.0]), 64)
    with pytest.raises(ValueError, match="ODE step"):
        policy_entropy(float("nan"), 64)
    assert math.isfinite(float(policy_entropy(0.3, 64)))


def test_cps_run_logs_a_finite_policy_entropy(world, tmp_path):
    cfg = tiny_config(world, tmp_path, sampling={"kind": "cps", "num_steps": 3})
    (row,) = Trainer(cfg).run()
    assert math.isfinite(row["policy_entropy"]) and math.isfinite(row["policy_entropy_per_dim"])
    assert row["skipped_updates"] == 0


def test_entropy_bonus_with_cps_trains(world, tmp_path):
    cfg = tiny_config(world, tmp_path, method="entropy_bonus", sampling={"kind": "cps", "num_steps": 3},
                      train={"steps": 2})
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.policy.trainable_state().items()}
    rows = trainer.run()
    assert [r["skipped_updates"] for r in rows] == [0, 0]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    after = trainer.policy.trainable_state()
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter changed"


def test_cps_gradient_is_the_mean_over_the_trained_steps_only(world, tmp_path):
    # No gradient clipping, one minibatch: the optimizer sees the gradient of the loss itself.
    cfg = tiny_config(world, tmp_path, sampling={"kind": "cps", "num_steps": 3}, train={"max_grad_norm": 1e9})
    trainer = Trainer(cfg)
    calls, grads = _capture_updates(trainer)
    trainer.run()
    (call,), (trained_grads,) = calls, grads
    rollout, advantages = call["rollout"], call["advantages"]
    assert call["trained"] == [0, 1] and advantages.shape == (rollout.batch_size, 2)
    # Direct computation: on-policy the clipped surrogate's gradient is that of -mean_{b,t} A_bt * ratio_bt.
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    with torch.no_grad():  # back to the weights the update's gradient was taken at
        for p, (value, _) in zip(params, trained_grads):
            p.copy_(value)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.model.train()
    loss = 0.0
    for col, t in enumerate(call["trained"]):
        log_prob = step_log_prob(trainer.model, rollout, t).log_prob
        loss = loss - (advantages[:, col] * torch.exp(log_prob - rollout.log_probs[t])).mean()
    (loss / len(call["trained"])).backward()
    assert any(g.abs().sum() > 0 for _, g in trained_grads)
    for (_, ours), p in zip(trained_grads, params):
        torch.testing.assert_close(ours, p.grad, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# Item 11: train.timestep_fraction.

def test_train_steps_follow_flow_grpos_fraction(model):
    r = sample(model, PROMPTS, num_steps=10, seed=0)
    assert r.train_steps(0.99) == list(range(9)) and r.train_steps(1.0) == list(range(10))
    assert r.train_steps(0.5) == list(range(5))
    # The fraction counts the whole trajectory, then keeps the SDE steps among them.
    windowed = sample(model, PROMPTS, num_steps=10, sde_window=(3, 10), seed=0)
    assert windowed.train_steps(0.99) == list(range(3, 9))
    for bad in (0.0, 1.5, float("nan"), 0.05):
        with pytest.raises(ValueError, match="timestep_fraction"):
            r.train_steps(bad)


def test_flow_grpo_like_run_trains_all_but_the_last_step_which_stays_stochastic(world, tmp_path):
    cfg = tiny_config(world, tmp_path, sampling={"num_steps": 4}, train={"timestep_fraction": 0.99})
    trainer = Trainer(cfg)
    calls, _ = _capture_updates(trainer)
    (row,) = trainer.run()
    (call,) = calls
    rollout = call["rollout"]
    assert call["trained"] == [0, 1, 2] and call["advantages"].shape[1] == 3
    assert row["skipped_updates"] == 0 and math.isfinite(row["policy_entropy"])
    # The last step is still an SDE step: sampled with noise, its log-prob recorded ...
    assert bool(rollout.sde_steps[3]) and (rollout.log_probs[3] != 0).all()
    # ... and its result is not the ODE step's from the same state.
    x = rollout.latents[3]
    sig = step_sigmas(rollout.sigmas, torch.full((x.shape[0],), 3))
    with torch.no_grad():
        v = trainer.model.velocity(x, sig.sigma, rollout.cond)
    ode = guided_sde_step(x, v, v, 1.0, sig.sigma, sig.sigma_next, noise=torch.zeros_like(x), eta=0.0,
                          sigma_max=rollout.sigma_max)
    assert (rollout.latents[4] - ode.prev_sample).flatten(1).norm(dim=1).min() > 1e-3


def test_default_fraction_trains_every_sde_step(world, tmp_path):
    trainer = Trainer(tiny_config(world, tmp_path, sampling={"num_steps": 4}))
    calls, _ = _capture_updates(trainer)
    trainer.run()
    assert trainer.cfg.train.timestep_fraction == 1.0 and calls[0]["trained"] == [0, 1, 2, 3]


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("flow_grpo_*.yaml")
                                        if ("sd35" in p.name or "flux" in p.name) and "fast" not in p.name))
def test_shipped_flow_grpo_configs_train_all_but_the_last_step(name):
    """Flow-GRPO's SD3.5 and FLUX runs (Qwen-Image's and the Fast configs train an SDE window of their own, all of it)."""
    cfg = Config()
    apply_dict(cfg, load_yaml(CONFIGS / name))
    t = cfg.sampling.num_steps
    assert cfg.train.timestep_fraction == 0.99
    assert int(t * cfg.train.timestep_fraction) == t - 1  # 9 of 10 (SD3.5), 5 of 6 (FLUX)
