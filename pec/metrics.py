"""Diversity and fidelity metrics, and the paper's min-max normalised table (notes/paper.md 6.2).

- `mean_pairwise_distance`: within-set spread in a feature space (the paper's "DINO" / "CLIP" columns).
- `vendi_score`: exp of the Shannon entropy of the eigenvalues of K / n, K the cosine-similarity kernel.
- `precision_recall_coverage`: k-NN manifold precision / recall (Kynkaenniemi et al. 2019) and
  coverage (Naeem et al. 2020) of generated features against real ones.
- `minmax_table`: each column min-max normalised across rows; quality average, diversity average and
  Overall = their mean.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from pec_kernels import check_tensor


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean Euclidean distance over all unordered pairs of rows of `features` (n, D), n >= 2."""
    check_tensor("features", features, ndims=(2,))
    return float(group_pairwise_distance(features[None])[0])


def group_pairwise_distance(groups: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(G,) float64 mean Euclidean distance over the pairs of distinct rows of each group (G, n, D).

    With a (G, n) bool `valid` mask only pairs of valid rows count (invalid rows may hold NaN), and a
    group with fewer than 2 valid rows gets 0. No host synchronisation.
    """
    check_tensor("groups", groups, ndims=(3,))
    n = groups.shape[1]
    if n < 2:
        raise ValueError(f"groups need at least 2 rows each, got {n}")
    if valid is None:
        valid = torch.ones(groups.shape[:2], dtype=torch.bool, device=groups.device)
    if valid.shape != groups.shape[:2]:
        raise ValueError(f"valid must have shape (G, n) = {tuple(groups.shape[:2])}, got {tuple(valid.shape)}")
    x = torch.where(valid[..., None], groups.double(), torch.zeros((), dtype=torch.float64, device=groups.device))
    pairs = valid[:, :, None] & valid[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=groups.device)
    d = torch.where(pairs, torch.cdist(x, x), torch.zeros((), dtype=torch.float64, device=groups.device))
    return d.sum(dim=(1, 2)) / pairs.sum(dim=(1, 2)).clamp_min(1)


def vendi_score(features: torch.Tensor) -> float:
    """Vendi score of rows of `features` (n, D) with the cosine-similarity kernel: between 1 and n."""
    check_tensor("features", features, ndims=(2,))
    x = torch.nn.functional.normalize(features.double(), dim=1)
    eig = torch.linalg.eigvalsh(x @ x.T / x.shape[0]).clamp_min(0.0)
    eig = eig[eig > 0]
    return float(torch.exp(-(eig * eig.log()).sum()))


@dataclass
class ManifoldScores:
    """precision: share of generated samples inside the real manifold (fidelity); recall: share of real
    samples inside the generated manifold; coverage: share of real samples whose k-NN ball holds a
    generated sample (diversity that ignores outliers)."""

    precision: float
    recall: float
    coverage: float


def _knn_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(x, x)
    return d.topk(k + 1, dim=1, largest=False).values[:, -1]  # the k-th neighbour other than itself


def precision_recall_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> ManifoldScores:
    """k-NN manifold precision, recall and coverage of `fake` (m, D) against `real` (n, D)."""
    check_tensor("real", real, ndims=(2,))
    check_tensor("fake", fake, ndims=(2,))
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake must have one feature dimension, got {real.shape[1]} and {fake.shape[1]}")
    if not 1 <= k < min(real.shape[0], fake.shape[0]):
        raise ValueError(f"k must be in [1, min(n_real, n_fake) - 1], got {k}")
    real, fake = real.double(), fake.double()
    r_real, r_fake = _knn_radius(real, k), _knn_radius(fake, k)
    d = torch.cdist(fake, real)  # (m, n)
    inside_real = d <= r_real[None, :]
    inside_fake = d <= r_fake[:, None]
    return ManifoldScores(precision=float(inside_real.any(1).double().mean()),
                          recall=float(inside_fake.any(0).double().mean()),
                          coverage=float((d.min(0).values <= r_real).double().mean()))


@dataclass
class NormalisedTable:
    """The min-max table: raw values, normalised values, and the three averages, row by row."""

    rows: list[str]
    quality: list[str]
    diversity: list[str]
    raw: dict[str, dict[str, float]]
    normalised: dict[str, dict[str, float]]
    quality_avg: dict[str, float]
    diversity_avg: dict[str, float]
    overall: dict[str, float]


def minmax_table(values: Mapping[str, Mapping[str, float]], quality: Sequence[str],
                 diversity: Sequence[str]) -> NormalisedTable:
    """Normalise every column to [0, 1] across rows and average (notes/paper.md 6.2).

    z = (m - min) / (max - min) per column; a column with no spread (max == min) gives 0 to every
    row, so it does not separate them. Quality avg = mean z over `quality`, diversity avg = mean z
    over `diversity`, Overall = their mean. Higher is better for every column.
    """
    if not values:
        raise ValueError("values must hold at least one row")
    if not quality or not diversity:
        raise ValueError("quality and diversity must each name at least one column")
    rows = list(values)
    columns = list(quality) + list(diversity)
    for row in rows:
        missing = [c for c in columns if c not in values[row] or not math.isfinite(values[row][c])]
        if missing:
            raise ValueError(f"row {row!r} lacks finite values for columns {missing}")
    norm: dict[str, dict[str, float]] = {row: {} for row in rows}
    for c in columns:
        col = [values[row][c] for row in rows]
        lo, hi = min(col), max(col)
        for row in rows:
            norm[row][c] = (values[row][c] - lo) / (hi - lo) if hi > lo else 0.0
    q = {row: sum(norm[row][c] for c in quality) / len(quality) for row in rows}
    d = {row: sum(norm[row][c] for c in diversity) / len(diversity) for row in rows}
    return NormalisedTable(rows=rows, quality=list(quality), diversity=list(diversity),
                           raw={row: dict(values[row]) for row in rows}, normalised=norm, quality_avg=q,
                           diversity_avg=d, overall={row: (q[row] + d[row]) / 2 for row in rows})


def table_markdown(table: NormalisedTable) -> str:
    """The table as markdown: raw values per column, then Q-norm, D-norm and Overall."""
    header = ["run", *table.quality, "Q-norm", *table.diversity, "D-norm", "Overall"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.rows:
        cells = [row, *(_fmt(table.raw[row][c]) for c in table.quality), f"{table.quality_avg[row]:.3f}",
                 *(_fmt(table.raw[row][c]) for c in table.diversity), f"{table.diversity_avg[row]:.3f}",
                 f"{table.overall[row]:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_rows(table: NormalisedTable) -> list[dict[str, float | str]]:
    """One flat dict per row (for CSV): raw columns, normalised columns (`<col>_norm`) and the averages."""
    out: list[dict[str, float | str]] = []
    for row in table.rows:
        rec: dict[str, float | str] = {"run": row}
        rec.update(table.raw[row])
        rec.update({f"{c}_norm": v for c, v in table.normalised[row].items()})
        rec.update(quality_avg=table.quality_avg[row], diversity_avg=table.diversity_avg[row],
                   overall=table.overall[row])
        out.append(rec)
    return out


def _fmt(x: float) -> str:
    return f"{x:.4g}"
