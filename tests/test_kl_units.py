"""The KL to the reference in its two units (DESIGN.md 2.1): the exact Gaussian KL, and Flow-GRPO's,
checked against Flow-GRPO's formula written out here; configs that quote Flow-GRPO's beta use its units."""
import math
from pathlib import Path

import pytest
import torch

from pec.config import Config, apply_dict, load_yaml
from pec.experiments.rows import ROWS
from pec.models.embedded import EmbeddedFlowModel
from pec.sampling import guided_velocity, kl_in_units, sample, step_log_prob

from _tiny_runs import TINY

PROMPTS = ["a handwritten 3", "number 0"]
CONFIGS = Path(__file__).resolve().parent.parent / "pec" / "configs"


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    policy = EmbeddedFlowModel(TINY).eval()
    torch.manual_seed(1)
    return policy, EmbeddedFlowModel(TINY).eval()


def flow_grpo_kl(x, v, v_ref, sigma, sigma_prev, sigma_max, eta, sde_type):
    """Flow-GRPO's KL term (train_sd3.py with sd3_sde_with_logprob.py), written out independently:
    ((prev_sample_mean - prev_sample_mean_ref)^2).mean over non-batch dims / (2 * std_dev_t^2)."""
    sigma, sigma_prev = sigma.double().view(-1, 1, 1, 1), sigma_prev.double().view(-1, 1, 1, 1)
    x, v, v_ref = x.double(), v.double(), v_ref.double()
    dt = sigma_prev - sigma
    if sde_type == "sde":
        std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, torch.tensor(sigma_max).double(), sigma))) * eta

        def mean(u):
            return x * (1 + std_dev_t**2 / (2 * sigma) * dt) + u * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    else:  # cps
        std_dev_t = sigma_prev * math.sin(eta * math.pi / 2)

        def mean(u):
            return (x - sigma * u) * (1 - sigma_prev) + (x + u * (1 - sigma)) * torch.sqrt(sigma_prev**2 - std_dev_t**2)
    return ((mean(v) - mean(v_ref)) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t.flatten() ** 2)


@pytest.mark.parametrize("kind,shift", [("flow", 1.0), ("flow", 3.0), ("cps", 3.0)])
def test_flow_grpo_units_match_flow_grpo_formula(models, kind, shift):
    policy, reference = models
    eta = 0.7
    r = sample(policy, PROMPTS, group_size=3, num_steps=5, guidance_scale=1.0, eta=eta, kind=kind, shift=shift,
               seed=0)
    sigma_max = float(r.sigmas[1])
    steps = r.train_steps()  # cps: not the last step, where s = 0 (an ODE step)
    assert steps == list(range(4 if kind == "cps" else 5))
    for step in steps:
        with torch.no_grad():
            v, v_ref = guided_velocity(policy, r, step), guided_velocity(reference, r, step)
        sigma, sigma_prev = r.sigmas[step].expand(r.batch_size), r.sigmas[step + 1].expand(r.batch_size)
        expected = flow_grpo_kl(r.latents[step], v, v_ref, sigma, sigma_prev, sigma_max, eta,
                                "sde" if kind == "flow" else "cps")
        ours = step_log_prob(policy, r, step, v_ref=v_ref, kl_units="flow_grpo").kl
        exact = step_log_prob(policy, r, step, v_ref=v_ref).kl
        assert (expected > 0).all()
        torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=0)
        dt = float(r.sigmas[step] - r.sigmas[step + 1])
        factor = dt if kind == "flow" else 1.0  # flow: Flow-GRPO's KL is |dt| times the exact one
        torch.testing.assert_close(ours, exact * factor, rtol=1e-6, atol=0)
        if kind == "flow":
            assert (ours < 0.5 * exact).all()


def test_flow_grpo_factor_varies_under_a_shifted_schedule(models):
    r = sample(models[0], PROMPTS, group_size=2, num_steps=10, guidance_scale=1.0, shift=3.0, seed=1)
    kl = torch.ones(r.num_steps)
    factors = kl_in_units(kl, "flow_grpo", "flow", r.sigmas[:-1], r.sigmas[1:])
    assert factors.sum().item() == pytest.approx(1.0)  # the |dt| sum to the whole flow time
    assert factors.max() > 2 * factors.min()


def test_dance_has_no_flow_grpo_units(models):
    r = sample(models[0], PROMPTS, group_size=2, num_steps=3, kind="dance", seed=2)
    with torch.no_grad():
        v_ref = guided_velocity(models[1], r, 1)
    assert step_log_prob(models[0], r, 1, v_ref=v_ref).kl.min() > 0
    with pytest.raises(ValueError, match="dance"):
        step_log_prob(models[0], r, 1, v_ref=v_ref, kl_units="flow_grpo")
    with pytest.raises(ValueError, match="kl_units"):
        step_log_prob(models[0], r, 1, v_ref=v_ref, kl_units="nats")
    cfg = Config()
    apply_dict(cfg, {"sampling": {"kind": "dance"}, "train": {"kl_units": "flow_grpo"}})
    with pytest.raises(ValueError, match="kl_units"):
        cfg.validate()
    apply_dict(cfg, {"train": {"kl_units": "exact"}})
    cfg.validate()


def test_configs_quoting_flow_grpo_beta_use_its_units():
    """Every shipped config and paper-table row with a KL term quotes Flow-GRPO's beta."""
    assert Config().train.kl_units == "exact"
    with_kl = 0
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = Config()
        apply_dict(cfg, load_yaml(path))
        if cfg.train.kl_beta > 0:
            with_kl += 1
            assert cfg.train.kl_units == "flow_grpo", path.name
    for name, options in ROWS.items():
        if "--train.kl_beta" in options:
            with_kl += 1
            assert options[options.index("--train.kl_units") + 1] == "flow_grpo", name
    assert with_kl >= 3
