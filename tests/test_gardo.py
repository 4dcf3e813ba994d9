"""GARDO (`--method gardo`, pec.methods.gardo): its novelty weights and advantages against a float64 re-derivation
on hand-made groups (a masked sample, a tie at the mean, equal rewards, coinciding features), its gate against
the stated intent (the main reward ranks better than the auxiliary ones), and its reference reset through the
trainer (a reset step's KL is exactly 0, the count in the metrics row, a resumed run equal to the uninterrupted one)."""
import math

import pytest
import torch

from pec.methods.gardo import gardo_advantages, gardo_gate, novelty
from pec.trainer import Trainer

from _tiny_runs import tiny_config


def _reference(rewards, features, n, valid, clip=5.0):
    """float64 loops over plain lists: (weights, advantages) of GARDO's formula."""
    b = len(rewards)
    weights, advantages = [1.0] * b, [0.0] * b
    for start in range(0, b, n):
        members = [i for i in range(start, start + n) if valid[i]]
        unit = {i: [x / math.sqrt(sum(y * y for y in features[i])) for x in features[i]] for i in members}
        d = {}
        for i in members:
            others = [1 - sum(a * c for a, c in zip(unit[i], unit[j])) for j in members if j != i]
            d[i] = min(others) if others else 0.0
        mean_r = sum(rewards[i] for i in members) / len(members)
        mean_d = sum(d.values()) / len(members)
        for i in members:
            w = 1.0 if rewards[i] < mean_r else (d[i] / mean_d if mean_d > 0 else 1.0)
            weights[i] = w
            advantages[i] = max(-clip, min(clip, (rewards[i] - mean_r) * w))
    return weights, advantages


def _groups():
    """Three groups of 4: ordinary; a masked sample (NaN reward and features) and a tie at the mean; all rewards
    equal. A fourth group's features coincide (mean novelty 0)."""
    g = torch.Generator().manual_seed(3)
    features = torch.randn(16, 5, generator=g, dtype=torch.float64)
    rewards = torch.tensor([0.2, 0.9, 0.5, 0.7,
                            0.1, float("nan"), 0.3, 0.5,  # sample 5 masked; 0.3 is the mean of 0.1, 0.3, 0.5
                            0.4, 0.4, 0.4, 0.4,
                            0.0, 1.0, 0.6, 0.2], dtype=torch.float64)
    features[5] = torch.nan
    features[12:] = features[12]
    valid = torch.ones(16, dtype=torch.bool)
    valid[5] = False
    return rewards, features, valid


def test_weights_and_advantages_match_a_float64_rederivation():
    rewards, features, valid = _groups()
    out = gardo_advantages(rewards, features, 4, valid)
    ref_w, ref_a = _reference(rewards.tolist(), features.tolist(), 4, valid.tolist())
    torch.testing.assert_close(out.weights[:, 0], torch.tensor(ref_w, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.advantages[:, 0], torch.tensor(ref_a, dtype=torch.float32), rtol=1e-6, atol=1e-7)
    assert out.advantages[5, 0] == 0 and out.weights[5, 0] == 1  # masked: advantage 0, left out of the means
    assert out.advantages[6, 0] == 0 and out.novel[6, 0]  # the tie: at the mean, novelty-weighted, advantage 0
    assert torch.equal(out.advantages[8:12, 0], torch.zeros(4))  # equal rewards: no signal
    assert torch.equal(out.weights[12:, 0], torch.ones(4, dtype=torch.float64))  # coinciding features: w = 1
    # Above the mean the weight is the novelty ratio; below it, 1; no std division (reward units).
    assert out.weights[1, 0] != 1 and out.weights[0, 0] == 1
    assert out.advantages[1, 0] == pytest.approx((0.9 - 0.575) * out.weights[1, 0].item(), rel=1e-6)


def test_novelty_is_the_nearest_cosine_distance_within_the_group():
    f = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [-1.0, -1.0], [0.5, 0.5]]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    torch.testing.assert_close(novelty(f, valid), torch.tensor([[0.0, 0.0, 1.0], [2.0, 2.0, 0.0]],
                                                               dtype=torch.float64))


def test_scale_global_divides_by_the_batch_std_and_clip_applies():
    rewards, features, valid = _groups()
    plain = gardo_advantages(rewards, features, 4, valid, clip=None)
    scaled = gardo_advantages(rewards, features, 4, valid, clip=None, scale="global")
    r = rewards[valid]
    std = ((r - r.mean()).square().mean()).sqrt().item()
    torch.testing.assert_close(scaled.advantages, plain.advantages / (std + 1e-4), rtol=1e-6, atol=1e-7)
    big = gardo_advantages(rewards * 100, features, 4, valid, clip=5.0)
    assert big.advantages.abs().max() == 5.0


def test_the_gate_keeps_the_samples_whose_main_reward_ranks_better_than_the_auxiliary_ones():
    # 8 samples; sample 0 is best by the main reward and worst by both auxiliary rewards (the hacking case);
    # sample 7 is the opposite (the public code's sign would select it).
    main = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.1])
    aux = torch.tensor([[0.0, 0.1], [0.5, 0.5], [0.6, 0.6], [0.4, 0.4], [0.5, 0.5], [0.6, 0.6], [0.7, 0.7], [1.0, 0.9]])
    valid = torch.ones(8, dtype=torch.bool)
    gate = gardo_gate(main, aux, valid, fraction=0.1)
    assert gate.tolist() == [True] + [False] * 7
    # The whole set of positive rank gaps, by a float64 loop: u = mean aux rank - main rank (rank 1 = best).
    def rank(values):
        order = sorted(range(8), key=lambda i: -values[i])
        return {i: order.index(i) + 1 for i in range(8)}
    rm, ra = rank(main.tolist()), [rank(aux[:, a].tolist()) for a in range(2)]
    u = [(ra[0][i] + ra[1][i]) / 2 - rm[i] for i in range(8)]
    positive = [i for i in range(8) if u[i] > 0]
    assert gardo_gate(main, aux, valid, fraction=1.0).nonzero().flatten().tolist() == positive
    assert 7 not in positive  # the sample the public code's u = rank_main - aux rank would gate first
    valid[0] = False  # a masked sample is never gated, and the next by u takes its place
    masked = gardo_gate(main, aux, valid, fraction=0.1)
    assert not masked[0] and masked.sum() == 1


GATED = {"method": "gardo", "gardo": {"kl_coef": 0.5, "aux_rewards": ["contrast", "smoothness"], "gate_fraction": 1.0,
                                      "reset_every": 2},
         "sampling": {"group_size": 4}, "train": {"steps": 4, "micro_batch": 8}}


def test_the_reference_resets_every_n_steps_and_a_resumed_run_matches(world, tmp_path):
    rows = Trainer(tiny_config(world, tmp_path / "full", **GATED)).run()
    resets = [r["gardo/reference_resets"] for r in rows]
    assert resets == [0.0, 1.0, 1.0, 2.0]  # reset_every 2: before steps 2 and 4
    # A reset makes the reference the policy that samples the step: its (on-policy) update's KL is exactly 0;
    # between resets the policy has moved away from it.
    assert rows[1]["gardo/kl_gated"] == 0.0 and rows[3]["gardo/kl_gated"] == 0.0
    assert rows[2]["gardo/kl_gated"] > 0.0
    assert all(0 < r["gardo/gated_fraction"] <= 1 and r["gardo/weight_max"] >= r["gardo/weight_min"] > 0 for r in rows)
    first = Trainer(tiny_config(world, tmp_path / "resumed", **{**GATED, "train": {**GATED["train"], "stop_after": 3}}))
    first.run()
    resumed = Trainer(tiny_config(world, tmp_path / "resumed", resume=True, **GATED)).run()
    keep = [k for k in rows[3] if not k.startswith("time/")]
    assert [resumed[3][k] for k in keep] == [rows[3][k] for k in keep]


def test_a_kl_above_the_threshold_resets_at_the_next_step(world, tmp_path):
    options = {**GATED, "gardo": {**GATED["gardo"], "reset_every": 100, "reset_kl": 1e-30},
               "train": {"steps": 3, "micro_batch": 8, "minibatches": 2}}
    rows = Trainer(tiny_config(world, tmp_path / "run", **options)).run()
    assert [r["gardo/reference_resets"] for r in rows] == [0.0, 1.0, 2.0]
