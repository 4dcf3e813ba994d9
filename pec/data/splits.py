"""Held-out splits of the digits (issue 13): evaluation digits no model trains on, and a "gold" split.

Each class's digits are shuffled with a seeded generator and cut into three disjoint parts:
- `heldout` (20% of each class by default): no model trains on them; precision, recall and coverage
  are measured against them;
- `gold` (20% of each class by default): the only digits the gold classifier trains on; the reward
  classifier never sees them, so reward hacking shows as a gap between the proxy reward and the gold one;
- `train` (the rest): the reward classifier trains on these.
The flow model pretrains on `train` and `gold` together (`Splits.pretraining`), i.e. on everything
but `heldout`: the gold classifier only has to be independent of the reward classifier, not of the
generator's data. Part sizes are round(fraction * class size) per class, so every class is held out
in the same proportion (within one digit), and the same seed always gives the same split.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pec.data.digits import Digits

HELDOUT_FRACTION = 0.2
GOLD_FRACTION = 0.2


@dataclass(frozen=True)
class SplitIndices:
    """Indices into the full data set (ascending, int64) of the three disjoint parts."""

    train: torch.Tensor
    gold: torch.Tensor
    heldout: torch.Tensor


@dataclass(frozen=True)
class Splits:
    """The three disjoint parts of the digits, and the indices they were taken at."""

    train: Digits
    gold: Digits
    heldout: Digits
    indices: SplitIndices

    def pretraining(self) -> Digits:
        """The flow model's pretraining digits: everything but `heldout` (train and gold)."""
        return Digits(torch.cat([self.train.images, self.gold.images]),
                      torch.cat([self.train.labels, self.gold.labels]))


def split_indices(labels: torch.Tensor, seed: int, heldout_fraction: float = HELDOUT_FRACTION,
                  gold_fraction: float = GOLD_FRACTION) -> SplitIndices:
    """Per class, round(heldout_fraction * n) digits to `heldout`, round(gold_fraction * n) to `gold`
    and the rest to `train`, chosen by a permutation seeded with `seed`. Every part gets at least one
    digit of every class."""
    if labels.dim() != 1 or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels must be a 1-D integer tensor, got shape {tuple(labels.shape)} {labels.dtype}")
    for name, frac in (("heldout_fraction", heldout_fraction), ("gold_fraction", gold_fraction)):
        if not 0.0 < frac < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {frac}")
    if heldout_fraction + gold_fraction >= 1.0:
        raise ValueError(f"heldout_fraction + gold_fraction must be < 1, got {heldout_fraction} + {gold_fraction}")
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {"train": [], "gold": [], "heldout": []}
    for cls in torch.unique(labels).tolist():  # ascending: same labels and seed, same draws
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        n_heldout = round(heldout_fraction * members.numel())
        n_gold = round(gold_fraction * members.numel())
        if min(n_heldout, n_gold, members.numel() - n_heldout - n_gold) < 1:
            raise ValueError(f"labels: class {cls} has {members.numel()} digits, too few to give every part "
                             f"at least one at fractions {heldout_fraction} / {gold_fraction}")
        parts["heldout"].append(members[:n_heldout])
        parts["gold"].append(members[n_heldout:n_heldout + n_gold])
        parts["train"].append(members[n_heldout + n_gold:])
    return SplitIndices(**{k: torch.cat(v).sort().values for k, v in parts.items()})


def heldout_splits(digits: Digits, seed: int, heldout_fraction: float = HELDOUT_FRACTION,
                   gold_fraction: float = GOLD_FRACTION) -> Splits:
    """The digits cut into train / gold / heldout parts by `split_indices` (same seed, same split)."""
    idx = split_indices(digits.labels, seed, heldout_fraction, gold_fraction)

    def take(i: torch.Tensor) -> Digits:
        return Digits(digits.images[i], digits.labels[i])

    return Splits(train=take(idx.train), gold=take(idx.gold), heldout=take(idx.heldout), indices=idx)
