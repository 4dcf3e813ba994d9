"""GRPO-Guard as an algorithm behind the trainer (`--algorithm grpo_guard`): the rollout keeps each step's mean,
the first update's ratio is exactly 1, a piece's loss equals a float64 re-derivation from the Gaussian
log-probabilities (log rho = s (log p_theta - log p_old + b), the form the algorithm does not compute), with
and without the |dt| scaling, and Clip-Cov's detach and KL-Cov's penalty act on log rho. On the embedded world
shrunk to tools/metrics_equivalence.py's sizes, through `pec.train`'s main where a run is needed."""
import math
import sys
from pathlib import Path

import pytest
import torch

from pec.config import parse_config
from pec.covariance import CovSelection
from pec.logging_utils import read_metrics
from pec.methods.covariance import _CovTerms
from pec.sampling import guided_velocity
from pec.train import main
from pec.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from metrics_equivalence import COMMON  # noqa: E402

GUARD = [*COMMON, "--algorithm", "grpo_guard"]


@pytest.mark.parametrize("method", [["pec"], ["entropy_bonus"], ["kl_cov", "--train.minibatches", "2"]])
def test_one_step_with_a_regulariser_starts_exactly_on_policy(tmp_path, method):
    run = tmp_path / "run"
    main([*GUARD, "--train.steps", "1", "--method", *method, "--run-dir", str(run)])
    (row,) = read_metrics(run / "metrics.jsonl")
    assert row["first_update_ratio_dev"] == 0.0  # rho = exp(mean((mu_theta - mu_old) xi)) = exp(0) bit for bit
    assert math.isfinite(row["loss"]) and row["grad_norm"] > 0
    if method[0] == "kl_cov":
        assert row["cov/penalised"] > 0 and row["ratio_max"] > 1  # the second minibatch is off-policy


@pytest.fixture(scope="module")
def piece(tmp_path_factory):
    """A rollout, one of its steps, the policy moved off the rollout's, and that step in float64."""
    cfg = parse_config([*GUARD, "--method", "none", "--run-dir", str(tmp_path_factory.mktemp("guard") / "run")])
    trainer = Trainer(cfg)
    rollout = trainer.rollout(1)
    assert rollout.means is not None and rollout.means.shape == rollout.latents[1:].shape
    t, idx = 1, torch.arange(rollout.batch_size)
    with torch.no_grad():
        on_policy = trainer.algorithm.piece_loss(rollout, t, 0, idx, torch.ones(len(idx)),
                                                 torch.ones(len(idx), dtype=torch.bool), None, None)
        v_old = guided_velocity(trainer.model, rollout, t, idx).double()
        gen = torch.Generator().manual_seed(0)
        for p in trainer.policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        v_new = guided_velocity(trainer.model, rollout, t, idx).double()
    # DESIGN.md 2.1, kind flow, in float64
    sigma, sigma_next = rollout.sigmas[t].double(), rollout.sigmas[t + 1].double()
    dt = sigma_next - sigma
    std = cfg.sampling.eta * torch.sqrt(sigma / (1 - sigma))
    x = rollout.latents[t].double()

    def mean(v):
        return x * (1 + std**2 * dt / (2 * sigma)) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt

    mu_old, mu_new = mean(v_old), mean(v_new)
    s = std * torch.sqrt(-dt)
    x_next = rollout.latents[t + 1].double()

    def log_prob(mu):
        return (-(x_next - mu).square() / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)

    b = (mu_new - mu_old).square().flatten(1).mean(1) / (2 * s**2)
    log_rho = s * (log_prob(mu_new) - log_prob(mu_old) + b)
    return {"trainer": trainer, "rollout": rollout, "t": t, "idx": idx, "on_policy": on_policy,
            "mu_old": mu_old, "log_rho": log_rho, "dt": dt}


def test_the_on_policy_ratio_is_exactly_one_and_mu_old_is_the_rollouts(piece):
    _, stats, _ = piece["on_policy"]
    assert stats.ratio_max.item() == stats.ratio_min.item() == 1.0
    torch.testing.assert_close(piece["rollout"].means[piece["t"]].double(), piece["mu_old"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dt_scaling", [True, False])
def test_the_loss_equals_a_float64_rederivation(piece, dt_scaling):
    trainer, log_rho = piece["trainer"], piece["log_rho"]
    rho = log_rho.exp()
    assert (log_rho.abs() > 1e-4).all()  # off-policy: the comparison is not of ones
    eps = (rho - 1).abs().median().item() * 1.01  # about half the ratios clipped, none at the edge
    adv = torch.linspace(-2, 2, len(rho), dtype=torch.float64)[torch.randperm(len(rho),
                                                                                generator=torch.Generator().manual_seed(1))]
    expected = torch.maximum(-adv * rho, -adv * rho.clamp(1 - eps, 1 + eps)).mean()
    if dt_scaling:
        expected = expected / piece["dt"].abs()
    trainer.cfg.train.clip_range, trainer.cfg.grpo_guard.dt_scaling = eps, dt_scaling
    keep = torch.ones(len(rho), dtype=torch.bool)
    loss, stats, _ = trainer.algorithm.piece_loss(piece["rollout"], piece["t"], 0, piece["idx"], adv.float(), keep,
                                                  None, None)
    assert 0 < stats.clip_fraction.item() < 1
    assert stats.clip_fraction.item() == ((rho - 1).abs() > eps).double().mean().item()
    torch.testing.assert_close(stats.ratio_mean.double(), rho.mean(), rtol=0, atol=1e-6)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)


def test_clip_cov_detaches_and_kl_cov_penalises_log_rho(piece):
    trainer, log_rho, dt = piece["trainer"], piece["log_rho"], piece["dt"]
    trainer.cfg.train.clip_range, trainer.cfg.grpo_guard.dt_scaling = 1.0, True
    n = len(log_rho)
    adv, keep = torch.linspace(-1, 1, n), torch.ones(n, dtype=torch.bool)
    params = [p for p in trainer.policy.trainable_parameters() if p.requires_grad]

    def run(mode=None, kl_coef=0.0):
        terms = None if mode is None else _CovTerms(CovSelection(mode, torch.ones(n, 1, dtype=torch.bool), kl_coef,
                                                                 torch.tensor(n)))
        loss, _, _ = trainer.algorithm.piece_loss(piece["rollout"], piece["t"], 0, piece["idx"], adv, keep, None,
                                                  terms)
        return loss, torch.autograd.grad(loss, params, allow_unused=True)

    plain, plain_grads = run()
    detached, grads = run("clip")
    assert detached.item() == plain.item() and any(g.abs().sum() > 0 for g in plain_grads if g is not None)
    assert all(g is None or (g == 0).all() for g in grads)  # every entry selected: no gradient left
    penalised, _ = run("kl", kl_coef=0.5)
    expected = 0.5 * log_rho.abs().mean() / dt.abs()
    torch.testing.assert_close((penalised - plain).double(), expected, rtol=1e-5, atol=0)
