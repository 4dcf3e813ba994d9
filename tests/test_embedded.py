"""The embedded world: digits data, prompts, prompt encoder, the tiny SD3 model and its shipped assets."""
import json

import pytest
import torch

from pec.assets import ASSETS_DIR
from pec.data import DIGIT_WORDS, digit_prompt, load_digits, prompt_digit, random_prompt, to_unit
from pec.models.base import FlowModel, PromptBatch
from pec.models.embedded import EMBEDDED_DIR, EmbeddedConfig, EmbeddedFlowModel
from pec.models.prompt_encoder import PromptEncoder

from _tiny_runs import TINY


def test_digits_shapes_ranges_and_split():
    digits = load_digits()
    assert digits.images.shape == (1797, 1, 8, 8) and digits.images.dtype == torch.float32
    assert digits.images.min() == -1.0 and digits.images.max() == 1.0
    assert sorted(digits.labels.unique().tolist()) == list(range(10))
    train, val = digits.split(0.15, seed=0)
    assert len(train) + len(val) == 1797 and len(val) == round(0.15 * 1797)
    assert to_unit(digits.images).min() == 0.0 and to_unit(digits.images).max() == 1.0
    with pytest.raises(ValueError, match="val_fraction"):
        digits.split(1.5)


def test_prompts_name_their_digit():
    import random
    rng = random.Random(0)
    for d in range(10):
        assert prompt_digit(digit_prompt(d)) == d
        assert prompt_digit(f"the digit {DIGIT_WORDS[d]}") == d
        assert prompt_digit(random_prompt(d, rng)) == d
    for bad in ("", "a handwritten digit", "3 and 4"):
        with pytest.raises(ValueError, match="exactly one digit"):
            prompt_digit(bad)
    with pytest.raises(ValueError, match="digit"):
        digit_prompt(10)


def test_prompt_encoder_round_trip_and_errors():
    enc = PromptEncoder(dim=16, max_tokens=4)
    prompts = ["a handwritten 7", "", "the digit seven", "number 0"]
    ids = enc.tokenize(prompts)
    assert ids.shape == (4, 4) and ids.dtype == torch.int64
    assert enc.detokenize(ids) == prompts
    batch = enc(prompts)
    assert batch.embeds.shape == (4, 4, 16) and batch.pooled.shape == (4, 16)
    assert not torch.allclose(batch.pooled[0], batch.pooled[1]), "the null prompt must differ from a real one"
    with pytest.raises(ValueError, match=r"unknown words \['cat'\]"):
        enc(["a handwritten cat"])
    with pytest.raises(ValueError, match="at most 4"):
        enc(["a handwritten digit seven seven"])
    with pytest.raises(ValueError, match="single str"):
        enc("a handwritten 7")


def test_model_velocity_decode_and_flow_model_contract():
    model = EmbeddedFlowModel(TINY)
    assert isinstance(model, FlowModel) and model.sample_shape == (1, 8, 8)
    prompts = model.encode_prompts(["a handwritten 3", "", "number 9"])
    assert isinstance(prompts, PromptBatch) and len(prompts) == 3
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    v = model.velocity(x, torch.tensor([1.0, 0.5, 0.0]), prompts)
    assert v.shape == x.shape and torch.isfinite(v).all()
    v.sum().backward()
    assert x.grad is not None and model.transformer.proj_out.weight.grad is not None
    images = model.decode(torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1, 1).expand(3, 1, 8, 8).requires_grad_())
    assert images[:, 0, 0, 0].tolist() == [0.0, 0.5, 1.0] and images.requires_grad
    with pytest.raises(ValueError, match="latents"):
        model.velocity(torch.randn(3, 1, 4, 4), torch.rand(3), prompts)
    with pytest.raises(ValueError, match="sigma"):
        model.velocity(torch.randn(3, 1, 8, 8), torch.rand(2), prompts)
    with pytest.raises(ValueError, match="prompts"):
        model.velocity(torch.randn(2, 1, 8, 8), torch.rand(2), prompts)


def test_save_and_load_round_trip(tmp_path):
    model = EmbeddedFlowModel(TINY).eval()
    model.save(tmp_path)
    loaded = EmbeddedFlowModel.from_pretrained(tmp_path)
    assert loaded.config == TINY
    x, sigma, prompts = torch.randn(2, 1, 8, 8), torch.rand(2), ["a handwritten 1", ""]
    with torch.no_grad():
        assert torch.equal(model.velocity(x, sigma, model.encode_prompts(prompts)),
                           loaded.velocity(x, sigma, loaded.encode_prompts(prompts)))
    with pytest.raises(FileNotFoundError, match="pec.pretrain"):
        EmbeddedFlowModel.from_pretrained(tmp_path / "missing")


def test_shipped_assets_present_small_and_consistent():
    names = ["embedded/model.safetensors", "embedded/config.json", "classifier.safetensors",
             "simclr.safetensors", "autoencoder.safetensors", "pretrain_config.json", "pretrain_log.txt",
             "pretrain_metrics.json"]
    for name in names:
        assert (ASSETS_DIR / name).is_file(), name
    weights = sum(p.stat().st_size for p in ASSETS_DIR.rglob("*.safetensors"))
    assert weights <= 20 * 2**20, f"shipped weights take {weights / 2**20:.1f} MB"
    assert EmbeddedConfig(**json.loads((EMBEDDED_DIR / "config.json").read_text())) == EmbeddedConfig()
    model = EmbeddedFlowModel.from_pretrained()  # strict load: every tensor present with its shape
    assert not model.training
    metrics = json.loads((ASSETS_DIR / "pretrain_metrics.json").read_text())
    log = (ASSETS_DIR / "pretrain_log.txt").read_text()
    assert metrics["sde_recognised"] >= 0.9 and "eval sde sampler" in log and "recognised" in log


def test_shipped_model_is_recognisable():
    """The shipped model meets the >= 90% recognisability bar with the default SDE sampler."""
    from pec.pretrain import evaluate_model
    metrics = evaluate_model(EmbeddedFlowModel.from_pretrained(), samples_per_digit=10, seed=123,
                             spaces=["simclr"])
    assert metrics["recognised"] >= 0.9, metrics
    assert metrics["diversity_simclr"] > 0.5 * metrics["real_diversity_simclr"], metrics


def test_pretrain_cli_redoes_one_component(tmp_path):
    from pec.pretrain import main
    threads = torch.get_num_threads()
    try:
        metrics = main(["--quick", "--only", "classifier", "--out", str(tmp_path), "--threads", "1"])
    finally:
        torch.set_num_threads(threads)  # main sets the process-wide thread count
    assert (tmp_path / "classifier.safetensors").is_file() and not (tmp_path / "embedded").exists()
    assert 0.0 <= metrics["classifier_val_accuracy"] <= 1.0
    assert "classifier validation accuracy" in (tmp_path / "pretrain_log.txt").read_text()
