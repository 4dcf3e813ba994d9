"""Held-out splits of the digits (pec.data.splits): disjoint, reproducible, 20% of each class."""
import pytest
import torch

from pec.data.digits import load_digits
from pec.data.splits import heldout_splits, split_indices


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_parts_are_disjoint_and_cover_every_digit(digits):
    idx = split_indices(digits.labels, seed=0)
    every = torch.cat([idx.train, idx.gold, idx.heldout])
    assert torch.equal(every.sort().values, torch.arange(len(digits)))  # disjoint and complete


@pytest.mark.parametrize("heldout_fraction, gold_fraction", [(0.2, 0.2), (0.25, 0.1)])
def test_each_class_is_held_out_in_the_same_proportion(digits, heldout_fraction, gold_fraction):
    idx = split_indices(digits.labels, seed=3, heldout_fraction=heldout_fraction, gold_fraction=gold_fraction)
    for cls in range(10):
        n = int((digits.labels == cls).sum())
        assert int((digits.labels[idx.heldout] == cls).sum()) == round(heldout_fraction * n)
        assert int((digits.labels[idx.gold] == cls).sum()) == round(gold_fraction * n)
        expected_train = n - round(heldout_fraction * n) - round(gold_fraction * n)
        assert int((digits.labels[idx.train] == cls).sum()) == expected_train


def test_the_same_seed_gives_the_same_split_and_another_seed_another(digits):
    a, b, c = (split_indices(digits.labels, seed=s) for s in (5, 5, 6))
    for part in ("train", "gold", "heldout"):
        assert torch.equal(getattr(a, part), getattr(b, part))
        assert not torch.equal(getattr(a, part), getattr(c, part))


def test_splits_hold_the_indexed_digits_and_pretraining_excludes_only_heldout(digits):
    s = heldout_splits(digits, seed=1)
    assert torch.equal(s.heldout.images, digits.images[s.indices.heldout])
    assert torch.equal(s.gold.labels, digits.labels[s.indices.gold])
    pre = s.pretraining()
    assert len(pre) == len(digits) - len(s.heldout) == len(s.train) + len(s.gold)
    kept = torch.cat([s.indices.train, s.indices.gold])
    assert torch.equal(pre.images, digits.images[kept]) and torch.equal(pre.labels, digits.labels[kept])
    assert not set(kept.tolist()) & set(s.indices.heldout.tolist())


def test_bad_arguments_raise_naming_them():
    labels = torch.tensor([0] * 10 + [1] * 2)
    with pytest.raises(ValueError, match="labels: class 1 has 2 digits"):
        split_indices(labels, seed=0)
    with pytest.raises(ValueError, match="heldout_fraction must be in"):
        split_indices(labels, seed=0, heldout_fraction=0.0)
    with pytest.raises(ValueError, match="heldout_fraction \\+ gold_fraction must be < 1"):
        split_indices(labels, seed=0, heldout_fraction=0.5, gold_fraction=0.5)
    with pytest.raises(ValueError, match="labels must be a 1-D integer tensor"):
        split_indices(labels.float(), seed=0)
