"""PEC / PCGS reward shaping, the per-step weights, the analytic policy entropy and the PCGS guidance."""
import math

import pytest
import torch

from pec.entropy import group_entropy
from pec.grpo import group_advantages
from pec.regularizers import entropy_guidance, omega_weights, pcgs_reward, pec_reward, policy_entropy


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
