"""PEC / PCGS reward shaping, the per-step weights, the analytic policy entropy and the PCGS guidance."""
import math

import pytest
import torch

from pec.entropy import group_entropy
from pec.grpo import group_advantages
from pec.regularizers import (entropy_guidance, latent_group_log_density, omega_weights, pcgs_reward, pec_reward,
                              policy_entropy)


@pytest.mark.parametrize("name", ["uniform", "late", "early"])
def test_omega_weights_have_mean_one(name):
    w = omega_weights(name, 5)
    assert w.shape == (5,) and w.mean().item() == pytest.approx(1.0)
    if name == "late":
        assert (w.diff() > 0).all()
    with pytest.raises(ValueError, match="omega"):
        omega_weights("sometimes", 5)


def test_pec_shaped_reward_is_reward_plus_lambda_omega_surprisal():
    r, s = torch.rand(6), torch.randn(6)
    omega = omega_weights("late", 3)
    shaped = pec_reward(r, s, 0.07, omega)
    for b in range(6):
        for t in range(3):
            assert shaped[b, t].item() == pytest.approx(r[b].item() + 0.07 * omega[t].item() * s[b].item(), rel=1e-6)
    # After per-group normalisation the bonus favours the more surprising sample of a tied pair.
    adv = group_advantages(pec_reward(torch.ones(2), torch.tensor([0.0, 1.0]), 0.1, torch.ones(1)),
                           torch.zeros(2, dtype=torch.long))
    assert adv[1, 0] > 0 > adv[0, 0]


def test_pcgs_shaped_reward_is_reward_minus_lambda_omega_kl():
    r, log_perc, log_theta = torch.rand(4), torch.randn(4), torch.randn(4, 2)
    omega = torch.tensor([0.5, 1.5])
    shaped = pcgs_reward(r, log_perc, log_theta, 0.03, omega)
    expected = r[:, None] - 0.03 * omega[None] * (log_perc[:, None] - log_theta)
    torch.testing.assert_close(shaped, expected)
    with pytest.raises(ValueError, match="log_p_theta"):
        pcgs_reward(r, log_perc, log_theta[:, :1], 0.03, omega)


def test_shaping_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="surprisal"):
        pec_reward(torch.rand(4), torch.rand(3), 0.1, torch.ones(2))


def test_policy_entropy_formula():
    s = torch.tensor([0.1, 0.5])
    h = policy_entropy(s, 64)
    expected = [32 * math.log(2 * math.pi * math.e * v * v) for v in (0.1, 0.5)]
    assert h.tolist() == pytest.approx(expected)


def test_entropy_guidance_is_the_gradient_of_group_entropy():
    torch.manual_seed(0)
    weight = torch.randn(16, 5, dtype=torch.float64)
    encode = lambda images: images.flatten(1).double() @ weight  # noqa: E731
    decode = lambda latents: (latents + 1) / 2  # noqa: E731
    guidance = entropy_guidance(decode, encode, group_size=4, estimator="gaussian", per_dim=True)
    x = torch.randn(8, 1, 4, 4)
    sigma = torch.full((8,), 0.6)
    v = torch.randn(8, 1, 4, 4)
    g = guidance(x, sigma, v)
    assert g.shape == x.shape and not g.requires_grad

    def total(latents):
        feats = encode(decode(latents - 0.6 * v)).reshape(2, 4, 5)
        return group_entropy(feats, estimator="gaussian", per_dim=True).entropy.sum()

    xd = x.double().requires_grad_(True)
    (ref,) = torch.autograd.grad(total(xd), xd)
    torch.testing.assert_close(g.double(), ref, rtol=1e-4, atol=1e-6)
    # A step along the guidance raises the groups' entropy.
    assert total(x.double() + 1e-3 * g.double()) > total(x.double())


def test_group_entropy_dispatch_and_k_check():
    f = torch.randn(3, 5, 4)
    knn = group_entropy(f, estimator="knn", k=2)
    gauss = group_entropy(f, estimator="gaussian")
    assert knn.entropy.shape == gauss.entropy.shape == (3,)
    assert knn.surprisal.shape == gauss.surprisal.shape == (3, 5)
    with pytest.raises(ValueError, match="k must be"):
        group_entropy(f, estimator="knn", k=5)


def test_pcgs_policy_reading_is_pec_plus_zero_mean_noise():
    """With log p_theta = the behaviour log-prob of the sampled transition, log p_theta = -1/2 mean(eps^2)
    - log s - 1/2 log 2 pi: it does not depend on theta, and after group normalisation PCGS's reward
    form gives PEC's advantages for the reward R - 1/2 lam omega mean(eps^2)."""
    from pec.models.embedded import EmbeddedConfig, EmbeddedFlowModel
    from pec.sampling import sample, step_log_prob

    tiny = EmbeddedConfig(num_layers=1, attention_head_dim=8, num_attention_heads=2, text_dim=16)
    policies = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        policies.append(EmbeddedFlowModel(tiny).eval())
    prompts, k = ["a handwritten 3", "number 0", "the digit seven"], 4
    rollouts = [sample(m, prompts, group_size=k, num_steps=3, guidance_scale=1.0, seed=7) for m in policies]
    r = rollouts[0]
    # Two different policies, the same noise: different samples, the same log-probs (independent of theta).
    assert (rollouts[0].latents[-1] - rollouts[1].latents[-1]).abs().max() > 1e-2
    torch.testing.assert_close(rollouts[0].log_probs, rollouts[1].log_probs, rtol=1e-5, atol=1e-5)

    # The sampler's noise, drawn as `sample` draws it (initial latents, then every step's eps at once).
    gen = torch.Generator().manual_seed(7)
    torch.randn(r.latents[0].shape, generator=gen)
    eps = torch.randn((r.num_steps, *r.latents[0].shape), generator=gen)
    half_eps_sq = []
    for step in r.train_steps():
        out = step_log_prob(policies[0], r, step)
        term = 0.5 * eps[step].square().flatten(1).mean(dim=1)
        torch.testing.assert_close(r.log_probs[step], -term - out.std.log() - 0.5 * math.log(2 * math.pi),
                                   rtol=0, atol=1e-5)
        half_eps_sq.append(term)
    half_eps_sq = torch.stack(half_eps_sq, dim=1)  # (B, T)
    assert (half_eps_sq.mean() - 0.5).abs() < 0.1, "1/2 mean(eps^2) has expectation 1/2: zero-mean noise around it"

    b = r.batch_size
    rewards, surprisal = torch.rand(b), torch.rand(b)
    omega, lam = omega_weights("late", r.num_steps), 0.3
    old = r.log_probs.T
    for global_std in (False, True):
        pcgs_adv = group_advantages(pcgs_reward(rewards, -surprisal, old, lam, omega), r.group_ids,
                                    global_std=global_std)
        pec_noise = pec_reward(rewards, surprisal, lam, omega) - lam * omega[None] * half_eps_sq
        torch.testing.assert_close(pcgs_adv, group_advantages(pec_noise, r.group_ids, global_std=global_std),
                                   rtol=1e-4, atol=1e-4)
        pec_adv = group_advantages(pec_reward(rewards, surprisal, lam, omega), r.group_ids, global_std=global_std)
        assert (pcgs_adv - pec_adv).abs().max() > 1e-3, "the noise term is there"


def test_latent_group_log_density_is_the_groups_gaussian_fit():
    torch.manual_seed(0)
    latents = torch.randn(6, 1, 2, 2)
    dens = latent_group_log_density(latents, 3, per_dim=True)
    assert dens.shape == (6,)
    flat = latents.reshape(2, 3, 4).double()
    mean, var = flat.mean(dim=1, keepdim=True), flat.var(dim=1, unbiased=False, keepdim=True)
    expected = (-0.5 * ((flat - mean) ** 2 / var + torch.log(2 * math.pi * var))).mean(dim=-1).reshape(-1)
    torch.testing.assert_close(dens.double(), expected, rtol=1e-5, atol=1e-5)
    # It depends on the samples (so on theta through them): an outlier lowers its own density.
    moved = latents.clone()
    moved[0] += 3.0
    assert latent_group_log_density(moved, 3)[0] < dens[0]
    torch.testing.assert_close(latent_group_log_density(moved, 3)[3:], dens[3:])
    with pytest.raises(ValueError, match="group_size"):
        latent_group_log_density(latents, 4)
    with pytest.raises(ValueError, match="group_size"):
        latent_group_log_density(latents, 1)


def test_trainer_reward_form_reads_the_configured_generation_density():
    """The PCGS method's reward shaping: 'policy' passes the behaviour log-probs, 'latent_group' the latent fit."""
    from pec.config import Config, apply_dict
    from pec.methods import build_method
    from pec.methods.base import ShapingInputs

    torch.manual_seed(0)
    b, t, k = 8, 2, 4
    rewards, surprisal, old = torch.rand(b), torch.rand(b), torch.randn(b, t)
    latents = torch.randn(b, 1, 8, 8)
    omega = omega_weights("uniform", t)
    shaped = {}
    for density in ("policy", "latent_group"):
        cfg = Config()
        apply_dict(cfg, {"method": "pcgs", "sampling": {"group_size": k},
                         "pcgs": {"form": "reward", "generation_density": density, "lambda": 0.3}})
        inputs = ShapingInputs(rewards, surprisal, old, latents, torch.ones(b, dtype=torch.bool), t)
        shaped[density] = build_method(cfg).shape(inputs, ctx=None)
    torch.testing.assert_close(shaped["policy"], pcgs_reward(rewards, -surprisal, old, 0.3, omega))
    log_gen = latent_group_log_density(latents, k)[:, None].expand(b, t)
    torch.testing.assert_close(shaped["latent_group"], pcgs_reward(rewards, -surprisal, log_gen, 0.3, omega))
