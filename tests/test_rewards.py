"""Rewards: registry, shapes, ranges, meaning, and bad input."""
import pytest
import torch

from pec.data import digit_prompt, load_digits, to_unit
from pec.rewards import REWARDS


def test_registry_names_and_unknown_name():
    assert {"digit", "contrast", "smoothness"} <= set(REWARDS.names())
    with pytest.raises(ValueError, match=r"unknown reward 'clip'.*contrast.*digit.*smoothness"):
        REWARDS.build("clip")
    assert {"pickscore", "clipscore", "hpsv2", "aesthetic", "jpeg", "jpeg_incompressibility", "http"} <= set(
        REWARDS.names())


@pytest.mark.parametrize("name", ["digit", "contrast", "smoothness"])
def test_shape_dtype_range_and_no_grad(name):
    reward = REWARDS.build(name, device="cpu")
    images = torch.rand(5, 1, 8, 8, requires_grad=True)
    r = reward(images, [digit_prompt(d) for d in range(5)])
    assert r.shape == (5,) and r.dtype == torch.float32 and not r.requires_grad
    assert torch.isfinite(r).all() and (r >= 0).all() and (r <= 1).all()
    with pytest.raises(ValueError, match="prompts"):
        reward(images, ["a handwritten 1"])
    with pytest.raises(ValueError, match="images"):
        reward(torch.rand(5, 2, 8, 8), [digit_prompt(1)] * 5)
    if name == "digit":  # the classifier reads 8x8 digits; the rule rewards take any size
        with pytest.raises(ValueError, match="images"):
            reward(torch.rand(5, 3, 8, 8), [digit_prompt(1)] * 5)
    else:
        r = reward(torch.rand(2, 3, 40, 24), [digit_prompt(1)] * 2)
        assert r.shape == (2,) and ((r >= 0) & (r <= 1)).all()


def test_digit_reward_reads_the_prompted_digit():
    digits = load_digits()
    images, labels = to_unit(digits.images[:200]), digits.labels[:200]
    reward = REWARDS.build("digit")
    right = reward(images, [digit_prompt(int(d)) for d in labels])
    wrong = reward(images, [digit_prompt(int(d + 1) % 10) for d in labels])
    assert right.mean() > 0.9 and wrong.mean() < 0.1
    with pytest.raises(ValueError, match="exactly one digit"):
        reward(images[:1], ["a handwritten digit"])


def test_rule_rewards_extremes():
    prompts = [digit_prompt(0)] * 3
    flat = torch.stack([torch.zeros(1, 8, 8), torch.full((1, 8, 8), 0.5), torch.ones(1, 8, 8)])
    assert REWARDS.build("contrast")(flat, prompts).tolist() == [1.0, 0.0, 1.0]
    assert REWARDS.build("smoothness")(flat, prompts).tolist() == [1.0, 1.0, 1.0]
    checker = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2).float().view(1, 1, 8, 8)
    assert REWARDS.build("smoothness")(checker, prompts[:1]).item() == 0.0
