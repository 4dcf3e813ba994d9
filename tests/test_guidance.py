"""The PCGS guided form (DESIGN.md 2.5): the shift's sign and scale, what one SDE step does with it,
diversity measured on images sampled by the shipped embedded model, and the exact on-policy ratio."""
import pytest
import torch

from pec.config import Config, apply_dict
from pec.data import digit_prompt
from pec.experiments.guidance_sweep import measure, report
from pec.models.embedded import EmbeddedFlowModel
from pec.perceptual import ENCODERS
from pec.regularizers import entropy_guidance
from pec.rewards import REWARDS
from pec.sampling import guidance_shift, guided_velocity, sample, step_log_prob
from pec_kernels.sde import guided_sde_step

SPACES = ("simclr", "classifier", "autoencoder")


@pytest.fixture(scope="module")
def world():
    """The shipped pretrained model, encoders and training reward, with the default config; one torch
    thread, as the trainer runs the embedded model (`Config.threads`: its tiny products are fastest
    on one, and several threads crawl on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    encoders = {name: ENCODERS.build(name) for name in SPACES}
    yield EmbeddedFlowModel.from_pretrained(), encoders, REWARDS.build("digit"), Config()
    torch.set_num_threads(threads)


def test_shift_points_against_the_direction_with_a_fraction_of_the_velocity_norm():
    torch.manual_seed(0)
    d, v = torch.randn(5, 1, 8, 8), 3 * torch.randn(5, 1, 8, 8)
    d[2] = 0
    shift = guidance_shift(d, v, 0.1)
    norms = shift.flatten(1).norm(dim=1)
    expected = 0.1 * v.flatten(1).norm(dim=1)
    expected[2] = 0
    torch.testing.assert_close(norms, expected)
    cosine = torch.nn.functional.cosine_similarity(shift.flatten(1), d.flatten(1), dim=1)
    torch.testing.assert_close(cosine[[0, 1, 3, 4]], -torch.ones(4))
    assert torch.equal(shift[2], torch.zeros_like(shift[2]))
    # Scale-free: rescaling the direction changes nothing; a per-sample weight scales per sample.
    torch.testing.assert_close(guidance_shift(1e4 * d, v, 0.1), shift)
    per_sample = guidance_shift(d, v, torch.tensor([0.1, 0.2, 0.1, 0.0, 0.1]))
    torch.testing.assert_close(per_sample[1], 2 * shift[1])
    assert torch.equal(per_sample[3], torch.zeros_like(d[3]))
    with pytest.raises(ValueError, match="direction"):
        guidance_shift(d[:, :, :4], v, 0.1)


@pytest.mark.parametrize("kind", ["flow", "dance", "cps"])
def test_the_shifted_step_moves_the_latents_along_the_direction(kind):
    """What the sampler does with the shift (dt < 0): the step's mean moves along +direction."""
    torch.manual_seed(1)
    x, v, d = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    common = dict(sigma=0.6, sigma_next=0.5, noise=torch.zeros_like(x), kind=kind)
    plain = guided_sde_step(x, v, v, 1.0, **common)
    shifted = guided_sde_step(x, v, v, 1.0, guidance=guidance_shift(d, v, 0.1), guidance_weight=1.0, **common)
    moved = (shifted.prev_sample - plain.prev_sample).flatten(1)  # zero noise: x' is the mean
    cosine = torch.nn.functional.cosine_similarity(moved, d.flatten(1), dim=1)
    torch.testing.assert_close(cosine, torch.ones(3), rtol=0, atol=1e-5)


def test_diversity_rises_monotonically_with_the_weight(world):
    """On images sampled by the pretrained model from the same seeds: within-group distance rises
    with gamma in the regularised space (simclr) and in the two others, the default raises it by
    >= 5% in simclr, and the opposite sign (the old bug) lowers it."""
    model, encoders, reward_fn, cfg = world
    default = cfg.pcgs.guidance_weight
    weights = sorted({-0.05, 0.0, 0.02, default, 0.1})
    prompts = [digit_prompt(d) for d in range(0, 10, 2)]
    results = measure(model, encoders, reward_fn, cfg, prompts, weights, seeds=(0, 1))
    print(report(results))
    for space in SPACES:
        dist = [results[w][f"dist/{space}"] for w in weights]
        assert all(a < b for a, b in zip(dist, dist[1:])), (space, dist)
    gain = results[default]["dist/simclr"] / results[0.0]["dist/simclr"] - 1
    assert gain >= 0.05, f"default gamma {default} raised simclr diversity by {gain:.1%} only"
    assert results[0.1]["reward"] < results[0.0]["reward"], "pushing groups apart costs some reward"


def test_guidance_window_guides_only_its_steps(world):
    model, encoders, _, cfg = world
    calls = []
    guide = entropy_guidance(model.decode, encoders["simclr"], 4, estimator="knn", k=2)

    def counting(x, sigma, v):
        calls.append(float(sigma[0]))
        return guide(x, sigma, v)

    r = sample(model, [digit_prompt(1), digit_prompt(7)], group_size=4, num_steps=4, guidance_scale=1.0,
               seed=3, guidance_fn=counting, guidance_weight=[0.05, 0.05, 0.0, 0.0])
    assert calls == r.sigmas[:2].tolist()
    assert r.guidance[:2].flatten(1).norm(dim=1).min() > 0
    assert torch.equal(r.guidance[2:], torch.zeros_like(r.guidance[2:]))
    assert r.guidance_weight.tolist() == pytest.approx([0.05, 0.05, 0.0, 0.0])
    # The stored shift is exactly 5% of the guided-free velocity's norm, per sample.
    with torch.no_grad():
        v_total = guided_velocity(model, r, 0)
    ratio = r.guidance[0].flatten(1).norm(dim=1) / (v_total - r.guidance[0]).flatten(1).norm(dim=1)
    torch.testing.assert_close(ratio, torch.full_like(ratio, 0.05))


def test_on_policy_ratio_is_exactly_one_with_guidance(world):
    """The shift is part of the behaviour policy: re-evaluating with the stored shift, in the trainer's
    micro-batch shapes, gives the rollout's log-probs bit for bit."""
    model, encoders, _, cfg = world
    micro = 8
    guide = entropy_guidance(model.decode, encoders["simclr"], 8, estimator="knn", k=2)
    r = sample(model, [digit_prompt(d) for d in (2, 5)], group_size=8, num_steps=4, guidance_scale=1.0,
               eta=0.7, seed=5, guidance_fn=guide, guidance_weight=cfg.pcgs.guidance_weight, batch_size=micro)
    assert r.guidance.abs().sum() > 0
    order = torch.randperm(r.batch_size, generator=torch.Generator().manual_seed(0))
    for step in r.train_steps():
        for idx in order.split(micro):
            out = step_log_prob(model, r, step, idx)
            assert torch.equal(torch.exp(out.log_prob.detach() - r.log_probs[step, idx]), torch.ones(micro))
    # ...and the check can fail: re-evaluated without the shift, the ratio moves.
    unguided = type(r)(**{**r.__dict__, "guidance": None})
    assert (step_log_prob(model, unguided, 1).log_prob - r.log_probs[1]).abs().max() > 1e-3


def test_config_checks_the_guidance_window_and_generation_density():
    for bad in ([3], [4, 2], [0, 11]):
        cfg = Config()
        apply_dict(cfg, {"pcgs": {"guidance_window": bad}})
        with pytest.raises(ValueError, match="guidance_window"):
            cfg.validate()
    cfg = Config()
    apply_dict(cfg, {"pcgs": {"guidance_window": [0, 5]}})
    cfg.validate()
    apply_dict(cfg, {"pcgs": {"generation_density": "pixels"}})
    with pytest.raises(ValueError, match="generation_density"):
        cfg.validate()
