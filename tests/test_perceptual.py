"""Perceptual encoders: registry, shapes, frozen weights, differentiability, and that they see digits."""
import copy

import pytest
import torch

from pec.data import load_digits, to_unit
from pec.perceptual import ENCODERS

NAMES = ["classifier", "simclr", "autoencoder", "simclr_eval"]


def test_registry_names_and_unknown_name():
    assert set(NAMES) <= set(ENCODERS.names())
    with pytest.raises(ValueError, match=r"unknown perceptual encoder 'dinov3'.*autoencoder.*classifier.*simclr"):
        ENCODERS.build("dinov3")
    assert {"dino", "clip", "pickscore"} <= set(ENCODERS.names())


@pytest.mark.parametrize("name", NAMES)
def test_shape_frozen_and_bad_input(name):
    encoder = ENCODERS.build(name, device="cpu")
    features = encoder(torch.rand(6, 1, 8, 8))
    assert features.shape == (6, encoder.dim) and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.train().training
    with pytest.raises(ValueError, match="images"):
        encoder(torch.rand(6, 8, 8))


@pytest.mark.parametrize("name", NAMES)
def test_differentiable_in_images(name):
    """The encoder's gradient in the images is finite and non-zero, and its network's directional derivative
    matches central finite differences in float64 (in fp32, h = 1e-2 leaves an O(h^2) error of a few per cent
    on the sharper networks)."""
    torch.manual_seed(0)
    encoder = ENCODERS.build(name)
    x = to_unit(load_digits().images[:4]).clone().requires_grad_()
    weights = torch.randn(4, encoder.dim)
    (encoder(x) * weights).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    network = copy.deepcopy(encoder.network).double()
    x64 = x.detach().double().requires_grad_()
    (network.features(x64) * weights.double()).sum().backward()
    direction, h = torch.randn_like(x64), 1e-5
    with torch.no_grad():
        numeric = ((network.features(x64 + h * direction) - network.features(x64 - h * direction))
                   * weights.double()).sum() / (2 * h)
    analytic = (x64.grad * direction).sum()
    assert torch.allclose(analytic, numeric, rtol=1e-6, atol=1e-8), (analytic, numeric)
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-3, atol=1e-4)  # the fp32 encoder agrees


@pytest.mark.parametrize("name", NAMES)
def test_same_digits_are_closer_than_different_digits(name):
    digits = load_digits()
    with torch.no_grad():
        features = ENCODERS.build(name)(to_unit(digits.images[:600]))
    dist = torch.cdist(features, features)
    same = digits.labels[:600, None] == digits.labels[None, :600]
    assert dist[same].mean() < 0.8 * dist[~same].mean()
