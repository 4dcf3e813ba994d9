"""DiffusionNFT behind the trainer's loop (`--algorithm nft`, issue 18): one step with each regulariser it
composes with, on the embedded model and on tiny real-layout SD3.5 and FLUX folders; the update against a
float64 re-derivation with the math functions (pec.algorithms.nft, tested on their own in test_nft.py);
the old policy (what the rollout samples with, how it moves, that a resume after SIGKILL restores it); two
processes (FSDP2) against one; and one forward batch per expert of a two-expert model."""
import contextlib
import copy
import dataclasses
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import pec
from pec.algorithms.nft import (NOISE_STREAM, TIMESTEP_STREAM, DiffusionNFT, forward_noise, nft_loss, nft_timesteps,
                                old_policy_decay, optimality_probability, update_old_policy, velocity_penalty)
from pec.checkpoint import load_checkpoint
from pec.checks import check_run
from pec.config import parse_config, to_dict
from pec.distributed import sample_noise
from pec.grpo import group_advantages
from pec.logging_utils import read_metrics
from pec.rewards import REWARDS
from pec.sampling import guidance_shift, sample
from pec.seeding import step_seed
from pec.train import main
from pec.trainer import Trainer

from _tiny_runs import tiny_config

TESTS = Path(__file__).parent


def nft_config(world, run_dir, **overrides):
    """tiny_config with --algorithm nft (and --method pec unless given)."""
    return tiny_config(world, run_dir, **{"algorithm": "nft", "method": "pec", **overrides})


def _rows(run_dir):
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in read_metrics(run_dir / "metrics.jsonl")]


@REWARDS.register("nft_test_nan_at_row0")
def _nan_at_row0(device="cpu", directory=None):
    """The digit reward with NaN for the first image of every scoring call."""
    inner = REWARDS.build("digit", device=device, directory=directory)

    def score(images, prompts):
        rewards = inner(images, prompts).clone()
        rewards[0] = float("nan")
        return rewards
    return score


# ------------------------------------------------------------------------------------------- smoke runs


def test_nft_pec_runs_on_the_embedded_default_through_main(tmp_path):
    run = tmp_path / "run"
    main(["--algorithm", "nft", "--method", "pec", "--train.steps", "1", "--sampling.prompts_per_step", "2",
          "--sampling.group_size", "4", "--sampling.num_steps", "4", "--train.micro_batch", "8",
          "--logging.tensorboard", "false", "--logging.progress", "false", "--logging.grid_samples", "1",
          "--device", "cpu", "--run-dir", str(run)])
    (row,) = _rows(run)
    assert math.isfinite(row["loss"]) and row["grad_norm"] > 0 and row["skipped_updates"] == 0
    assert row["nft/decay"] == old_policy_decay(1, 1) and row["nft/optimizer_steps"] == 1
    assert row["shaped_reward_mean"] != row["reward_mean"]  # PEC's surprisal is in the reward
    assert "ratio_mean" not in row and "policy_entropy" not in row
    saved = load_checkpoint(run)
    assert saved["extra"]["algorithm"]["optimizer_steps"] == 1
    assert saved["extra"]["algorithm"]["old"].keys() == saved["model"].keys()


@pytest.mark.parametrize("method, sections", [
    ("none", {}), ("perc_entropy_bonus", {}),
    ("pcgs", {"pcgs": {"form": "guided", "guidance_weight": 0.5}}),
    ("pcgs", {"pcgs": {"generation_density": "latent_group"}}),
    ("pec", {"nft": {"solver": "euler", "decay": 2, "beta": 0.1}, "train": {"lora": False, "lr": 1e-4}}),
])
def test_each_composing_regulariser_trains_a_step(world, tmp_path, method, sections):
    trainer = Trainer(nft_config(world, tmp_path, method=method, **sections))
    before = {k: v.clone() for k, v in trainer.policy.trainable_state().items()}
    (row,) = trainer.run()
    assert all(math.isfinite(v) for k, v in row.items() if isinstance(v, float)), row
    assert any(not torch.equal(before[k], v) for k, v in trainer.policy.trainable_state().items())
    rollout = trainer.rollout(2)
    assert rollout.solver == trainer.cfg.nft.solver and not rollout.sde_steps.any()  # deterministic, all ODE steps
    if method == "pcgs" and trainer.cfg.pcgs.form == "guided":
        assert rollout.guidance is not None and rollout.guidance.abs().sum() > 0


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    pytest.importorskip("open_clip")
    from _tiny_diffusers import (tiny_clip_folder, tiny_dino_folder, tiny_flux_folder, tiny_open_clip_folder,
                                 tiny_sd3_folder)

    tmp = tmp_path_factory.mktemp("real")
    return {"sd3": tiny_sd3_folder(tmp), "flux": tiny_flux_folder(tmp), "dino": tiny_dino_folder(tmp),
            "pickscore": tiny_clip_folder(tmp), "clip": tiny_open_clip_folder(tmp)}


@pytest.mark.parametrize("name, resolution", [("sd3", 16), ("flux", 32)])
def test_nft_pec_runs_on_tiny_sd35_and_flux_checkpoints(real, tmp_path, name, resolution):
    run = tmp_path / "run"
    main(["--algorithm", "nft", "--method", "pec", "--model.name", name, "--model.path", str(real[name]),
          "--model.resolution", str(resolution), "--model.dtype", "float32", "--model.max_sequence_length", "8",
          "--device", "cpu", "--reward", "jpeg:1.0", "--paths.dino", str(real["dino"]), "--perceptual.spaces", "dino",
          "--perceptual.space", "dino", "--sampling.prompts_per_step", "2", "--sampling.group_size", "3",
          "--sampling.num_steps", "3", "--train.steps", "1", "--train.micro_batch", "3", "--train.timestep_fraction",
          "0.99", "--logging.progress", "false", "--logging.tensorboard", "false", "--logging.grid_samples", "1",
          "--run-dir", str(run)])
    (row,) = _rows(run)
    assert math.isfinite(row["loss"]) and row["grad_norm"] > 0 and row["nft/velocity_penalty"] == 0.0
    assert row["shaped_reward_mean"] != row["reward_mean"]


@pytest.mark.parametrize("variant, method", [("", "none"), ("_pec", "pec")])
def test_the_shipped_sd35_configs_are_the_authors_preset(real, variant, method):
    config = Path(pec.__file__).parent / "configs" / f"nft_sd35{variant}.yaml"
    cfg = check_run(parse_config(["--config", str(config), "--model.path", str(real["sd3"]), "--paths.pickscore",
                                  str(real["pickscore"]), "--paths.dino", str(real["dino"]), "--paths.clip",
                                  str(real["clip"])]))
    assert cfg.algorithm == "nft" and cfg.method == method and cfg.reward == "pickscore"
    assert (cfg.sampling.num_steps, cfg.sampling.group_size, cfg.sampling.guidance_scale) == (10, 24, 1.0)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.lora_rank, cfg.train.lora_alpha) == (3e-4, 1e-4, 32, 64)
    assert (cfg.train.timestep_fraction, cfg.train.adv_clip, cfg.train.global_std, cfg.train.minibatches) == (
        0.99, 5.0, True, 1)
    assert dataclasses.asdict(cfg.nft) == {"beta": 1.0, "decay": 1, "ref_coef": 1e-4, "loss_scale": None,
                                           "solver": "dpm2"}
    assert cfg.perceptual.space == "pickscore" and (method == "none" or cfg.pec.lambda_ == 0.05)


def test_dpm2_sampling_adds_the_guidance_shift_to_the_velocity(world, tmp_path):
    model = Trainer(nft_config(world, tmp_path)).model.eval()
    prompts = ["a handwritten 3", "a handwritten 7"]

    def direction(x, sigma, v):
        return torch.ones_like(x)

    kwargs = dict(group_size=2, num_steps=3, guidance_scale=1.0, eta=0.0, seed=4, solver="dpm2")
    guided = sample(model, prompts, guidance_fn=direction, guidance_weight=0.3, **kwargs)
    plain = sample(model, prompts, **kwargs)
    assert torch.equal(guided.latents[0], plain.latents[0])
    # The first DPM-Solver++ step is first order: x + dt (v + shift), the shift as guidance_shift makes it.
    cond = model.encode_prompts([p for p in prompts for _ in range(2)])
    with torch.no_grad():
        v = model.velocity(guided.latents[0], guided.sigmas[0].expand(4), cond)
    shift = guidance_shift(torch.ones_like(v), v, 0.3)
    torch.testing.assert_close(guided.guidance[0], shift)
    dt = guided.sigmas[1] - guided.sigmas[0]
    torch.testing.assert_close(guided.latents[1], guided.latents[0] + dt * (v + shift), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(guided.latents[-1], plain.latents[-1])


# ------------------------------------------------------------------------------------------- the update


def _double(batch):
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).double() for f in dataclasses.fields(batch)
                                         if isinstance(getattr(batch, f.name), torch.Tensor)
                                         and getattr(batch, f.name).is_floating_point()})


def test_the_update_is_the_math_functions_in_float64(world, tmp_path):
    """Two minibatches (the second off the old policy), a masked sample per group, the velocity penalty on,
    3 of 4 grid points per sample: the trainer's loss diagnostics and gradients equal a float64 computation
    with nft_timesteps, forward_noise, nft_loss, velocity_penalty and optimality_probability."""
    beta, ref_coef, fraction = 0.5, 0.5, 0.8
    cfg = nft_config(world, tmp_path, reward="nft_test_nan_at_row0", sampling={"num_steps": 4},
                     train={"minibatches": 2, "micro_batch": 3, "timestep_fraction": fraction, "lr": 0.05},
                     nft={"beta": beta, "ref_coef": ref_coef})
    trainer = Trainer(cfg)
    seen, states, grads = {}, [], []
    update, shape, opt_step = trainer.algorithm.update, trainer.shape, trainer.optimizer.step
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]

    def capture_update(batch):
        seen["batch"] = batch
        return update(batch)

    def capture_shape(*args):
        out = shape(*args)
        seen["shaped"] = out[2]
        return out

    def capture_step(*args, **kwargs):
        states.append({k: v.clone() for k, v in trainer.policy.trainable_state().items()})
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
        return opt_step(*args, **kwargs)

    trainer.algorithm.update, trainer.shape, trainer.optimizer.step = capture_update, capture_shape, capture_step
    row = trainer.train_step(1)
    batch = seen["batch"]
    assert len(states) == 2 and row["skipped_updates"] == 0
    valid = batch.valid
    assert valid.tolist() == [False, True, True, False, True, True]  # NaN rewards are masked

    # Shaping: one column, group-normalised with the global std, clipped, then r.
    adv = group_advantages(seen["shaped"], torch.arange(6) // 3, global_std=True, clip=5.0, valid=valid, num_groups=2)
    assert seen["shaped"].shape == (6, 1) and torch.equal(adv, batch.advantages)
    r = optimality_probability(adv[:, 0].double(), 5.0)

    model = copy.deepcopy(trainer.model).double()
    params = dict(model.named_parameters())
    T, B = 4, 6
    sigmas = trainer.model.schedule(T).double()
    slots = nft_timesteps(B, T, fraction, torch.Generator().manual_seed(step_seed(cfg.seed, 1, TIMESTEP_STREAM)))
    assert slots.shape == (B, 3)
    eps = sample_noise(torch.arange(B), tuple(model.sample_shape), 2, step_seed(cfg.seed, 1, NOISE_STREAM), "cpu").double()
    x0 = batch.rollout.latents[-1].double()
    cond = _double(batch.rollout.cond)

    def load(state):
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def losses(theta, rows):
        """(len(rows), slots) per-piece losses, L+, L-, penalties with theta (old policy: the first state)."""
        c = cond.index(rows)
        sigma = [sigmas[slots[rows, j]] for j in range(slots.shape[1])]
        x_sigma = [forward_noise(x0[rows], eps[j, rows], sigma[j]) for j in range(slots.shape[1])]
        with torch.no_grad():
            load(states[0])
            v_old = [model.velocity(x, s, c) for x, s in zip(x_sigma, sigma)]
            model.transformer.disable_adapters()
            v_ref = [model.velocity(x, s, c) for x, s in zip(x_sigma, sigma)]
            model.transformer.enable_adapters()
            load(theta)
        out = {"loss": [], "pos": [], "neg": [], "pen": []}
        for x, s, vo, vr in zip(x_sigma, sigma, v_old, v_ref):
            v_theta = model.velocity(x, s, c)
            parts = nft_loss(v_theta, vo, x, x0[rows], s, r[rows], beta, scale=5.0)
            penalty = velocity_penalty(v_theta, vr)
            for key, value in (("loss", parts.loss + ref_coef * penalty), ("pos", parts.loss_pos),
                               ("neg", parts.loss_neg), ("pen", penalty)):
                out[key].append(value)
        return {k: torch.stack(v, dim=1) for k, v in out.items()}

    totals = {k: 0.0 for k in ("loss", "pos", "neg", "pen")}
    for m, (chunks, mb) in enumerate(batch.minibatches):
        rows = torch.cat(chunks)
        pieces = losses(states[m], rows)
        keep = valid[rows][:, None].double()
        mean = (pieces["loss"] * keep).sum() / (len(mb) * slots.shape[1])
        expected = torch.autograd.grad(mean, [params[n] for n in trainable])
        norm = torch.sqrt(sum(g.square().sum() for g in expected))
        clip = min(1.0, cfg.train.max_grad_norm / (float(norm) + 1e-6))
        for name, g in zip(trainable, expected):
            torch.testing.assert_close(grads[m][name].double(), g * clip, rtol=1e-4, atol=1e-10)
        for key in totals:
            totals[key] += float((pieces[key].detach() * keep).sum())
    count = int(valid.sum()) * slots.shape[1]
    for key, name in (("loss", "loss"), ("pos", "nft/loss_pos"), ("neg", "nft/loss_neg"),
                      ("pen", "nft/velocity_penalty")):
        assert row[name] == pytest.approx(totals[key] / count, rel=1e-5), name
    # The second minibatch is off the old policy: L+ and L- part by far more than the tolerance above.
    assert row["nft/loss_pos"] != pytest.approx(row["nft/loss_neg"], rel=1e-4)
    assert row["nft/r_mean"] == pytest.approx(float(r[valid].mean()), rel=1e-6)


def test_the_old_policy_is_theta_until_the_first_update_then_moves_by_the_decay(world, tmp_path):
    trainer = Trainer(nft_config(world, tmp_path, train={"minibatches": 2, "lr": 0.05}, nft={"decay": 1}))
    alg, params = trainer.algorithm, trainer.algorithm.learner.params
    assert all(torch.equal(o, p) for o, p in zip(alg.old, params))
    theta0 = [p.detach().clone() for p in params]
    row = trainer.train_step(1)
    decay = old_policy_decay(1, 2)  # two optimizer steps so far
    assert row["nft/decay"] == decay and row["nft/optimizer_steps"] == 2 and decay > 0
    expected = [t.clone() for t in theta0]
    update_old_policy(expected, params, decay)
    assert all(torch.equal(o, e) for o, e in zip(alg.old, expected))
    assert not all(torch.equal(o, p) for o, p in zip(alg.old, params))
    assert row["nft/old_distance"] > 0


@pytest.mark.parametrize("decay", [1, 0])
def test_rollouts_sample_the_old_policy(world, tmp_path, decay):
    trainer = Trainer(nft_config(world, tmp_path, train={"lr": 0.05}, nft={"decay": decay}))
    trainer.train_step(1)
    by_old = trainer.rollout(2)
    trainer.algorithm.sampling_policy = contextlib.nullcontext
    by_theta = trainer.rollout(2)
    assert torch.equal(by_old.latents[0], by_theta.latents[0])
    # Decay 0 keeps the old policy at theta; otherwise the old policy lags behind and samples differently.
    assert torch.equal(by_old.latents[-1], by_theta.latents[-1]) == (decay == 0)
    with trainer.algorithm.old_policy():  # theta is restored afterwards, bit for bit
        again = sample(trainer.model, by_old.prompts[::3], group_size=3, num_steps=2, guidance_scale=1.0, eta=0.0,
                       solver="dpm2", noise=torch.cat([by_old.latents[:1], torch.zeros_like(by_old.latents[1:])]),
                       batch_size=trainer.cfg.train.micro_batch)
        assert torch.equal(again.latents[-1], by_old.latents[-1])
    assert torch.equal(trainer.rollout(2).latents[-1], by_theta.latents[-1])


class _Experts:
    """Turns the trainer's model into a two-expert model (expert 1 below sigma 0.5, as Wan2.2's low-noise
    expert) and records, per velocity call, the expert and the sigmas of the batch."""

    def __init__(self, model):
        self.model, self.active, self.calls = model, 0, []
        velocity = model.velocity

        def use_expert(index):
            @contextlib.contextmanager
            def ctx():
                previous, self.active = self.active, index
                try:
                    yield
                finally:
                    self.active = previous
            return ctx()

        def recorded(latents, sigma, prompts):
            self.calls.append((self.active, sigma.tolist()))
            return velocity(latents, sigma, prompts)

        model.expert_at = lambda sigma: int(sigma < 0.5)
        model.use_expert, model.velocity = use_expert, recorded


def test_a_forward_batch_never_mixes_two_experts(world, tmp_path):
    trainer = Trainer(nft_config(world, tmp_path, sampling={"num_steps": 4}, train={"micro_batch": 6}))
    experts = _Experts(trainer.model)
    trainer.algorithm = DiffusionNFT(trainer.cfg, trainer.algorithm.learner)
    trainer.train_step(1)
    training = experts.calls[4:]  # after the rollout's 4 steps: old, reference and theta per pass
    assert {e for e, _ in training} == {0, 1}
    for expert, sigmas in training:
        assert {int(s < 0.5) for s in sigmas} == {expert}
    assert sum(len(s) for _, s in training) == 3 * 6 * 4  # every (sample, grid point) once in each of the three


# ------------------------------------------------------------------------------------------- resume, processes


def test_a_resumed_run_equals_the_uninterrupted_one(world, tmp_path):
    """A run stopped after step 2 and resumed from its checkpoint, as a SIGKILL in step 3 leaves it (the
    checkpoint of step 2 and a torn row), in a fresh process state: the old policy and the optimizer-step
    count come back from the checkpoint, so steps 3 and 4 are the uninterrupted run's, bit for bit."""
    overrides = dict(train={"steps": 4, "minibatches": 2, "lr": 0.05})
    full = Trainer(nft_config(world, tmp_path / "full", **overrides))
    full_rows = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in full.run()]

    run = tmp_path / "cut"
    Trainer(nft_config(world, run, **{**overrides, "train": {**overrides["train"], "stop_after": 2}})).run()
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "rew')
    main(["--run-dir", str(run), "--resume", "--logging.progress", "false"])
    assert _rows(run) == full_rows
    resumed, uninterrupted = load_checkpoint(run), load_checkpoint(tmp_path / "full")
    assert resumed["extra"]["algorithm"]["optimizer_steps"] == 8
    assert all(torch.equal(resumed["model"][k], v) for k, v in uninterrupted["model"].items())
    old, old_full = resumed["extra"]["algorithm"]["old"], uninterrupted["extra"]["algorithm"]["old"]
    assert old.keys() == old_full.keys() and all(torch.equal(old[k], v) for k, v in old_full.items())
    assert not all(torch.equal(old[k], resumed["model"][k]) for k in old)  # the old policy lags behind theta


def test_two_processes_fsdp2_equal_one(world, tmp_path):
    """Full fine-tuning (the old policy is each rank's FSDP2 shards), the velocity penalty to the sharded
    reference copy, 2 steps: the metrics and the final weights and old policy of 2 processes equal 1's."""
    overrides = dict(sampling={"prompts_per_step": 2, "group_size": 3}, dist={"timeout": 60},
                     train={"steps": 2, "micro_batch": 3, "lora": False, "lr": 1e-4}, nft={"ref_coef": 0.5})
    single = Trainer(nft_config(world, tmp_path / "one", **overrides))
    single_rows = single.run()
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(to_dict(nft_config(world, tmp_path / "two", **overrides))))
    with socket.socket() as sock:  # a free port for the process group (two plain processes: no launcher)
        sock.bind(("127.0.0.1", 0))
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(sock.getsockname()[1]), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-m", "pec.train", "--config", str(config)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
    two_rows = read_metrics(tmp_path / "two" / "metrics.jsonl")
    for one, two in zip(single_rows, two_rows, strict=True):
        assert [k for k in one if not k.startswith("time/")] == [k for k in two if not k.startswith("time/")]
        for key, a in one.items():
            if not key.startswith("time/"):
                # FSDP2 reduce-scatters each micro-batch's gradient (one process sums them in another order):
                # float32 rounding, which a step of RL carries into the next rollout's rewards.
                assert two[key] == pytest.approx(a, rel=1e-4, abs=1e-8), (one["step"], key)
    a, b = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "two")
    assert b["config"]["dist"]["processes"] == 2
    for key in ("model", "old"):
        first = a["model"] if key == "model" else a["extra"]["algorithm"]["old"]
        second = b["model"] if key == "model" else b["extra"]["algorithm"]["old"]
        assert first.keys() == second.keys()
        for name, value in first.items():
            torch.testing.assert_close(second[name], value, rtol=1e-5, atol=1e-7)
    assert b["extra"]["algorithm"]["optimizer_steps"] == a["extra"]["algorithm"]["optimizer_steps"] == 2
