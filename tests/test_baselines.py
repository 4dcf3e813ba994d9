"""The paper's other baselines (issue 12): Clip-Cov and KL-Cov (native and perceptual), Clip-Higher and the
entropy-regularisation readings. Selection and losses against float64 references; each method trains one
tiny step through the trainer; degenerate settings train bit for bit like GRPO; bad settings name the option."""
import math

import pytest
import torch

from pec.config import Config, apply_dict
from pec.covariance import clip_cov_mask, entry_covariance, select_entries, selection_count, top_fraction
from pec.grpo import clipped_surrogate, group_advantages
from pec.trainer import Trainer

from _tiny_runs import tiny_config


def _reference_cov(y, adv, valid):
    """float64 loop: per column, centred over the valid rows; invalid rows -inf."""
    y, adv = y.double(), adv.double()
    out = torch.full_like(adv, -torch.inf)
    for t in range(adv.shape[1]):
        yc = y[valid, t] - y[valid, t].mean()
        ac = adv[valid, t] - adv[valid, t].mean()
        out[valid, t] = yc * ac
    return out


def _batch(b=10, t=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -1.3 + 0.1 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, t, generator=g)
    return logp, adv


def test_entry_covariance_matches_loop_native_and_perceptual():
    logp, adv = _batch()
    valid = torch.ones(10, dtype=torch.bool)
    valid[[2, 7]] = False
    logp[2] = torch.nan  # a masked sample's NaN must not leak into the others' means
    cov = entry_covariance(logp, adv, valid)
    torch.testing.assert_close(cov.double(), _reference_cov(logp, adv, valid), rtol=1e-5, atol=1e-7)
    density = torch.randn(10)  # perceptual: one log-density per sample, broadcast over the steps
    torch.testing.assert_close(entry_covariance(density, adv, valid).double(),
                               _reference_cov(density[:, None].expand(-1, 4), adv, valid), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fraction, n, expected", [(0.0, 320, 0), (2e-4, 320, 1), (0.02, 320, 6), (0.2, 320, 64),
                                                   (0.29, 100, 29), (1.0, 7, 7), (0.5, 0, 0)])
def test_selection_count(fraction, n, expected):
    assert selection_count(fraction, torch.tensor(n)).item() == expected


def test_top_fraction_is_exactly_the_largest_valid_entries():
    logp, adv = _batch(b=12, t=5)
    valid = torch.ones(12, dtype=torch.bool)
    valid[0] = False
    cov = entry_covariance(logp, adv, valid)
    mask = top_fraction(cov, 0.1)
    k = int(0.1 * 55)
    ref = _reference_cov(logp, adv, valid).reshape(-1)
    expected = torch.zeros(60, dtype=torch.bool)
    expected[ref.argsort(descending=True)[:k]] = True
    assert torch.equal(mask.reshape(-1), expected) and not mask[0].any()


def test_clip_cov_draws_a_seeded_fraction_of_the_band():
    logp, adv = _batch(b=32, t=10)
    cov = entry_covariance(logp, adv)
    band = top_fraction(cov, 0.2)
    masks = [clip_cov_mask(cov, 0.2, 0.1, torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    for m in masks:
        assert int(m.sum()) == 6 and not (m & ~band).any()  # 10% of the 64-entry band, all inside it
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    draws = torch.stack([clip_cov_mask(cov, 0.2, 0.1, torch.Generator().manual_seed(s)) for s in range(200)])
    assert (draws.sum(0)[band] > 0).all()  # every band entry gets drawn sometimes: random, not the top of the band


def _losses(logp, old, adv, selection, clip=10.0):
    """Sum over columns of the clipped surrogate (micro-batch = the whole column), as the trainer adds it."""
    total = 0.0
    rows = torch.arange(logp.shape[0])
    for col in range(logp.shape[1]):
        lp, penalty = logp[:, col], None
        if selection is not None:
            lp, penalty = selection.apply(rows, col, lp, old[:, col])
        loss, _ = clipped_surrogate(lp, old[:, col], adv[:, col], clip)
        total = total + (loss if penalty is None else loss + penalty)
    return total


def _grad(logp, old, adv, selection):
    leaf = logp.clone().requires_grad_(True)
    _losses(leaf, old, adv, selection).backward()
    return leaf.grad


@pytest.mark.parametrize("variant", ["native", "perceptual"])
def test_clip_cov_detaches_exactly_the_selected_entries(variant):
    old, adv = _batch(b=20, t=5)
    logp = old + 0.01 * torch.randn(20, 5)  # off-policy, inside the (wide) PPO clip
    density = old if variant == "native" else torch.randn(20)
    sel = select_entries("clip_cov", density, adv, None, band=0.3, fraction=0.25, kl_coef=1.0,
                         generator=torch.Generator().manual_seed(0))
    assert int(sel.count) == int(0.25 * 30) and sel.counts()["cov/clipped"].item() == sel.count.item()
    plain, clipped = _grad(logp, old, adv, None), _grad(logp, old, adv, sel)
    assert (plain[sel.mask] != 0).all()
    assert torch.equal(clipped, torch.where(sel.mask, torch.zeros_like(plain), plain))


@pytest.mark.parametrize("variant", ["native", "perceptual"])
def test_kl_cov_penalises_exactly_the_top_fraction(variant):
    old, adv = _batch(b=20, t=5, seed=1)
    logp = old + 0.01 * torch.randn(20, 5)
    density = old if variant == "native" else torch.randn(20)
    beta = 0.7
    sel = select_entries("kl_cov", density, adv, None, band=0.2, fraction=0.1, kl_coef=beta,
                         generator=torch.Generator().manual_seed(0))
    y = density if density.dim() == 2 else density[:, None].expand(-1, 5)
    expected = torch.zeros(100, dtype=torch.bool)
    expected[_reference_cov(y, adv, torch.ones(20, dtype=torch.bool)).reshape(-1).argsort(descending=True)[:10]] = True
    assert torch.equal(sel.mask.reshape(-1), expected)
    penalty_value = _losses(logp, old, adv, sel) - _losses(logp, old, adv, None)
    torch.testing.assert_close(penalty_value, beta * ((logp - old).abs() * sel.mask).sum() / 20)
    extra = _grad(logp, old, adv, sel) - _grad(logp, old, adv, None)
    torch.testing.assert_close(extra, beta * (logp - old).sign() * sel.mask / 20, rtol=1e-5, atol=1e-6)


def test_zero_fractions_select_nothing_and_change_nothing():
    old, adv = _batch()
    logp = old + 0.01 * torch.randn(10, 4)
    plain = _grad(logp, old, adv, None)
    for method in ("clip_cov", "kl_cov"):
        sel = select_entries(method, old, adv, None, band=0.2, fraction=0.0, kl_coef=1.0,
                             generator=torch.Generator().manual_seed(0))
        assert int(sel.count) == 0 and torch.equal(_grad(logp, old, adv, sel), plain)


def test_select_entries_rejects_bad_settings():
    logp, adv = _batch()
    gen = torch.Generator()
    for kwargs, name in (({"band": 1.5}, "band"), ({"fraction": -0.1}, "fraction"), ({"kl_coef": -1.0}, "kl_coef")):
        settings = {"band": 0.2, "fraction": 0.1, "kl_coef": 1.0, **kwargs}
        with pytest.raises(ValueError, match=name):
            select_entries("clip_cov", logp, adv, None, generator=gen, **settings)
    with pytest.raises(ValueError, match="method"):
        select_entries("cov", logp, adv, None, band=0.2, fraction=0.1, kl_coef=1.0, generator=gen)


@pytest.mark.parametrize("overrides, option", [
    ({"cov": {"band": 1.2}}, "cov.band"), ({"cov": {"detach_fraction": -0.1}}, "cov.detach_fraction"),
    ({"cov": {"kl_fraction": 2.0}}, "cov.kl_fraction"), ({"cov": {"kl_coef": -1.0}}, "cov.kl_coef"),
    ({"cov": {"variant": "vae"}}, "cov.variant"),
    ({"train": {"clip_range": 0.2, "clip_range_high": 0.1}}, "train.clip_range_high"),
    ({"entropy_bonus": {"sample_coef": -1.0}}, "entropy_bonus.sample_coef"),
    # Settings that would silently train GRPO: clipping and KL-Cov's penalty act only off-policy.
    ({"train": {"clip_range_high": 2e-3}}, "train.minibatches"), ({"method": "kl_cov"}, "train.minibatches"),
])
def test_bad_settings_name_the_option(overrides, option):
    cfg = Config()
    apply_dict(cfg, overrides)
    with pytest.raises(ValueError, match=option.replace(".", r"\.")):
        cfg.validate()


# ----------------------------------------------------------------------------------------------
# Through the trainer. Clipping and the KL-Cov penalty act only off-policy: their runs take two
# minibatches (the second is off-policy) at a high lr and a tight clip. Clip-Cov acts on-policy (its
# entries, drawn before any ratio moves, could all land among the second minibatch's clipped ones).

OFF_POLICY = {"minibatches": 2, "micro_batch": 3, "lr": 0.05, "clip_range": 1e-6}


def _run(world, run_dir, method, train=None, **sections):
    """One training step (`train_step`, without `run`'s sample grids and plots, which take most of the time)."""
    trainer = Trainer(tiny_config(world, run_dir, method=method, train=train or {}, **sections))
    row = trainer.train_step(1)
    return row, trainer.policy.trainable_state()


@pytest.fixture(scope="module")
def grpo(world, tmp_path_factory):
    """GRPO's one tiny step, on-policy ("on") and with an off-policy second minibatch ("off")."""
    return {"on": _run(world, tmp_path_factory.mktemp("grpo_on"), "grpo"),
            "off": _run(world, tmp_path_factory.mktemp("grpo_off"), "grpo", OFF_POLICY)}


def _same_training(a, b):
    (row_a, state_a), (row_b, state_b) = a, b
    keep = [k for k in row_a if not k.startswith(("time/", "cov/", "_"))]
    return all(torch.equal(state_a[k], state_b[k]) for k in state_a) and \
        [row_a[k] for k in keep] == [row_b[k] for k in keep]


@pytest.mark.parametrize("method, train, sections", [
    ("clip_cov", {}, {"cov": {"detach_fraction": 0.0}}),
    ("kl_cov", {}, {"cov": {"kl_fraction": 0.0}}),
    ("grpo", {"clip_range_high": OFF_POLICY["clip_range"]}, {}),
])
def test_degenerate_settings_train_bit_for_bit_like_grpo(world, tmp_path, grpo, method, train, sections):
    assert _same_training(_run(world, tmp_path, method, {**OFF_POLICY, **train}, **sections), grpo["off"])


@pytest.mark.parametrize("name, method, policy, train, sections, counter", [
    ("clip_higher", "grpo", "off", {"clip_range_high": 1.0}, {}, None),
    ("clip_cov", "clip_cov", "on", {}, {}, "cov/clipped"),
    ("clip_cov_perceptual", "clip_cov", "on", {}, {"cov": {"variant": "perceptual"}}, "cov/clipped"),
    ("kl_cov", "kl_cov", "off", {}, {"cov": {"kl_fraction": 0.5}}, "cov/penalised"),
    ("kl_cov_perceptual", "kl_cov", "off", {}, {"cov": {"variant": "perceptual", "kl_fraction": 0.5}},
     "cov/penalised"),
    ("entropy_sample", "entropy_sample", "on", {}, {}, None),
])
def test_each_baseline_trains_a_step_and_differs_from_grpo(world, tmp_path, grpo, name, method, policy, train,
                                                           sections, counter):
    settings = {**(OFF_POLICY if policy == "off" else {}), **train}
    row, state = _run(world, tmp_path, method, settings, **sections)
    reference = grpo[policy]
    assert row["first_update_ratio_dev"] == 0.0 and row["skipped_updates"] == 0
    assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), row
    if counter is not None:  # of the 12 entries, the default Clip-Cov selects 1; KL-Cov's top half 6
        other = {"cov/clipped": "cov/penalised", "cov/penalised": "cov/clipped"}[counter]
        assert row[counter] == (1.0 if method == "clip_cov" else 6.0) and row[other] == 0.0
    if name == "clip_higher":
        assert row["clip_fraction"] < reference[0]["clip_fraction"]  # ratios above 1 + eps_low no longer clip
    assert not _same_training((row, state), reference)


def test_perceptual_entropy_bonus_is_a_constant_that_normalisation_removes(world, tmp_path):
    coef = 0.5
    row, _ = _run(world, tmp_path, "perc_entropy_bonus", entropy_bonus={"coef": coef})
    # The bonus is the batch's perceptual entropy (the mean kNN surprisal in perceptual.space), the same
    # for every sample...
    assert row["shaped_reward_mean"] - row["reward_mean"] == pytest.approx(coef * row["perc_knn/simclr"], rel=1e-5)
    # ...so the advantages are GRPO's (the tiny world's rewards differ by ~1e-7, below float32's resolution
    # next to the bonus, so this is checked on a realistic spread).
    rewards = torch.rand(12)
    group_ids = torch.arange(12) // 4
    for global_std in (False, True):
        torch.testing.assert_close(group_advantages(rewards + coef * 3.7, group_ids, global_std=global_std),
                                   group_advantages(rewards, group_ids, global_std=global_std), rtol=0, atol=1e-5)
