"""GRPO math: group-normalised advantages and the clipped surrogate, against float64 loops."""
import pytest
import torch

from pec.grpo import clipped_surrogate, group_advantages


def _reference_advantages(r, gid, global_std, eps):
    r = r.double()
    out = torch.empty_like(r)
    for g in gid.unique():
        m = gid == g
        std = r.std(0, unbiased=False) if global_std else r[m].std(0, unbiased=False)
        out[m] = (r[m] - r[m].mean(0)) / (std + eps)
    return out


@pytest.mark.parametrize("global_std", [False, True])
@pytest.mark.parametrize("shape", [(12,), (12, 5)])
def test_advantages_are_normalised_per_group(global_std, shape):
    r = torch.rand(shape)
    gid = torch.tensor([7, 7, 7, 2, 2, 2, 9, 9, 9, 9, 40, 40])[torch.randperm(12)]
    adv = group_advantages(r, gid, global_std=global_std)
    assert adv.shape == r.shape
    torch.testing.assert_close(adv.double(), _reference_advantages(r, gid, global_std, 1e-4), rtol=1e-5, atol=1e-5)
    for g in gid.unique():
        assert adv[gid == g].sum(0).abs().max() < 1e-4  # zero mean within every group and column
        if not global_std:
            torch.testing.assert_close(adv[gid == g].std(0, unbiased=False),
                                       torch.ones(shape[1:]), atol=1e-2, rtol=0)


def test_advantages_of_identical_rewards_are_zero_and_clip_applies():
    r = torch.tensor([1.0, 1.0, 0.0, 10.0, 0.0, 0.0, 0.0, 0.0])
    gid = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    adv = group_advantages(r, gid, clip=0.5)
    assert torch.equal(adv[:2], torch.zeros(2)) and torch.equal(adv[4:], torch.zeros(4))
    assert adv[2].item() == -0.5 and adv[3].item() == 0.5
    assert torch.isfinite(adv).all()


def test_advantages_reject_bad_input():
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(torch.rand(4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(torch.rand(4), torch.zeros(4))


def test_clipped_surrogate_matches_definition_and_its_gradient():
    logp_old = torch.randn(6, 3)
    logp = (logp_old + 0.3 * torch.randn(6, 3)).requires_grad_(True)
    adv = torch.randn(6, 3)
    eps = 0.1
    loss, stats = clipped_surrogate(logp, logp_old, adv, eps)
    ratio = torch.exp(logp.detach().double() - logp_old.double())
    ref = -torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv).mean()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    assert stats.clip_fraction.item() == pytest.approx(((ratio - 1).abs() > eps).double().mean().item())
    loss.backward()
    inside = ((ratio - 1).abs() <= eps) | ((ratio > 1 + eps) & (adv < 0)) | ((ratio < 1 - eps) & (adv > 0))
    expected = torch.where(inside, -adv.double() * ratio / adv.numel(), torch.zeros_like(ratio))
    torch.testing.assert_close(logp.grad.double(), expected, rtol=1e-5, atol=1e-7)


def test_surrogate_on_policy_ratio_is_one_and_gradient_is_policy_gradient():
    logp = torch.randn(5, requires_grad=True)
    adv = torch.randn(5)
    loss, stats = clipped_surrogate(logp, logp.detach(), adv, 1e-4)
    assert stats.ratio_mean.item() == 1.0 and stats.clip_fraction.item() == 0.0
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv / 5)


def test_clip_higher_clips_asymmetrically():
    ratio = torch.tensor([0.7, 0.85, 0.95, 1.05, 1.15, 1.3]).repeat(2)
    adv = torch.tensor([1.0] * 6 + [-1.0] * 6)
    low, high = 0.1, 0.2
    grads, losses = {}, {}
    for name, eps_high in (("symmetric", None), ("higher", high)):
        logp = ratio.log().requires_grad_(True)
        losses[name], stats = clipped_surrogate(logp, torch.zeros(12), adv, low, clip_range_high=eps_high)
        losses[name].backward()
        grads[name] = logp.grad
    r = ratio.double()
    ref = -torch.minimum(r * adv, r.clamp(1 - low, 1 + high) * adv).mean()
    torch.testing.assert_close(losses["higher"].double(), ref, rtol=1e-6, atol=1e-7)
    assert stats.clip_fraction.item() == pytest.approx(((r < 1 - low) | (r > 1 + high)).double().mean().item())
    live = (grads["higher"] != 0).tolist()
    # A > 0: the gradient survives up to 1 + eps_high (1.15 now trains) and below 1 - eps_low.
    assert live[:6] == [True, True, True, True, True, False]
    # A < 0: cut below 1 - eps_low exactly as before, and it survives above 1 + eps_high.
    assert live[6:] == [False, False, True, True, True, True]
    sym = (grads["symmetric"] != 0).tolist()
    assert sym[:6] == [True, True, True, True, False, False] and sym[6:] == [False, False, True, True, True, True]


def test_clip_range_high_equal_to_clip_range_is_the_symmetric_clip_bit_for_bit():
    logp_old = torch.randn(64)
    logp = logp_old + 0.05 * torch.randn(64)
    adv = torch.randn(64)
    valid = torch.rand(64) > 0.2
    out = []
    for kwargs in ({}, {"clip_range_high": 0.03}):
        leaf = logp.clone().requires_grad_(True)
        loss, stats = clipped_surrogate(leaf, logp_old, adv, 0.03, valid=valid, **kwargs)
        loss.backward()
        out.append([loss, leaf.grad, *vars(stats).values()])
    assert out[0][4].item() > 0  # some ratios are clipped, so the comparison means something
    assert all(torch.equal(a, b) for a, b in zip(*out))


def test_clip_range_high_must_be_positive():
    with pytest.raises(ValueError, match="clip_range_high"):
        clipped_surrogate(torch.zeros(3), torch.zeros(3), torch.ones(3), 0.1, clip_range_high=0.0)
