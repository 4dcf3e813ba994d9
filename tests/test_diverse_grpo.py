"""DiverseGRPO (`--method diverse_grpo`, pec.methods.diverse_grpo) and its batched spectral clustering
(pec.methods.spectral): partitions against scikit-learn's SpectralClustering (float64) on groups with a known
cluster structure, the bonus sqrt(N / n_c) re-derived from those partitions, no per-group work or host read,
and the early-step regulariser on exactly the trained steps below --diverse_grpo.reg_steps."""
import math
from types import SimpleNamespace

import pytest
import torch
from sklearn.cluster import SpectralClustering
from sklearn.metrics import adjusted_rand_score
from torch.utils._python_dispatch import TorchDispatchMode

from pec.methods.diverse_grpo import cluster_bonus
from pec.methods.reference_kl import ReferenceKLTerms
from pec.methods.spectral import gaussian_affinity, spectral_clusters
from pec.trainer import Trainer

from _tiny_runs import tiny_config

N, D = 24, 16


def _clustered_groups(ks, seed=0, spread=0.2):
    """(G, N, D) groups whose samples lie around k_g well separated centres, and the true labels (G, N)."""
    g = torch.Generator().manual_seed(seed)
    feats, labels = [], []
    for k in ks:
        centres = 4 * torch.randn(k, D, generator=g, dtype=torch.float64)
        lab = torch.randint(k, (N,), generator=g)
        lab[:k] = torch.arange(k)  # every cluster non-empty
        feats.append(centres[lab] + spread * torch.randn(N, D, generator=g, dtype=torch.float64))
        labels.append(lab)
    return torch.stack(feats), torch.stack(labels)


KS = (1, 2, 3, 4, 5, 2)


def test_partitions_match_sklearn_spectral_clustering():
    feats, truth = _clustered_groups(KS)
    valid = torch.ones(len(KS), N, dtype=torch.bool)
    valid[1, 5] = False  # a masked sample (NaN features) takes no part
    feats[1, 5] = torch.nan
    affinity, _ = gaussian_affinity(feats, valid)
    auto = spectral_clusters(affinity, valid, max_clusters=6)
    assert auto.num_clusters.tolist() == list(KS)  # the eigengap finds each group's k
    assert auto.labels[1, 5] == -1 and auto.sizes[1, 5] == 0
    for g, k in enumerate(KS):
        keep = valid[g]
        ours = auto.labels[g][keep].tolist()
        assert adjusted_rand_score(truth[g][keep].tolist(), ours) == 1.0
        if k == 1:
            continue
        w = affinity[g][keep][:, keep].numpy()
        reference = SpectralClustering(k, affinity="precomputed", random_state=0).fit(w).labels_
        assert adjusted_rand_score(reference, ours) == 1.0, g
        fixed = spectral_clusters(affinity[g:g + 1], valid[g:g + 1], clusters=k)
        assert adjusted_rand_score(reference, fixed.labels[0][keep].tolist()) == 1.0


def test_the_bonus_is_sqrt_group_over_cluster_size():
    feats, truth = _clustered_groups(KS)
    valid = torch.ones(len(KS), N, dtype=torch.bool)
    valid[2, :3] = False
    out = cluster_bonus(feats, valid, max_clusters=6)
    for g in range(len(KS)):
        members = valid[g].nonzero().flatten().tolist()
        sizes = {c: sum(1 for j in members if truth[g, j] == c) for c in set(truth[g].tolist())}
        for i in range(N):
            expected = math.sqrt(len(members) / sizes[truth[g, i].item()]) if i in members else 0.0
            assert out.bonus[g, i].item() == pytest.approx(expected, rel=1e-12), (g, i)
    assert torch.equal(out.bonus[0], torch.ones(N, dtype=torch.float64))  # one cluster: no spread to reward


def test_a_collapsed_group_is_one_cluster():
    """The default eigengap keeps a group without structure whole (every bonus 1, which normalisation removes)."""
    feats = torch.ones(2, 6, 3)
    feats[1] += 1e-3 * torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    out = cluster_bonus(feats)
    assert out.clusters.num_clusters.tolist() == [1, 1] and torch.equal(out.bonus, torch.ones(2, 6, dtype=torch.float64))


class _Ops(TorchDispatchMode):
    """The aten ops dispatched, and the host reads of a tensor value among them."""

    def __init__(self):
        super().__init__()
        self.ops, self.reads = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_all_groups_are_clustered_at_once_without_host_reads():
    """The same ops for 2 groups as for 32 (no Python loop over groups) and no `.item()`-style read: on a GPU the
    one synchronisation is torch's convergence check of the whole batch's eigh."""
    counts = []
    for groups in (2, 32):
        feats, _ = _clustered_groups([3] * groups, seed=2)
        valid = torch.ones(groups, N, dtype=torch.bool)
        valid[0, 0] = False
        with _Ops() as mode:
            cluster_bonus(feats.float(), valid)
        counts.append(mode.ops)
        assert mode.reads == 0
    assert counts[0] == counts[1]


def test_the_regulariser_weights_the_kl_of_exactly_its_columns():
    valid = torch.tensor([True, False, True])
    gathered = []
    terms = ReferenceKLTerms(0.5, valid.float(), [0, 2], lambda t: gathered.append(t) or t, "reg")
    assert [terms.wants_reference(c) for c in range(4)] == [True, False, True, False]
    kl = torch.tensor([0.2, 7.0, 0.4])
    loss = torch.zeros(())
    step = SimpleNamespace(kl=kl)
    idx = torch.arange(3)
    assert terms.piece_loss(1, loss, step, idx) is None
    assert terms.piece_loss(0, loss, step, idx).item() == pytest.approx(0.5 * (0.2 + 0.4) / 3)
    terms.piece_loss(2, loss, step, idx)
    assert terms.counts()["reg"].item() == pytest.approx((0.2 + 0.4) * 2 / 4)  # the masked sample's 7 left out
    gated = ReferenceKLTerms(0.5, valid.float(), [0], lambda t: t, "gated", over_weighted=True)  # GARDO's mean
    assert gated.piece_loss(0, loss, step, idx).item() == pytest.approx(0.5 * (0.2 + 0.4) / 2)


def test_a_run_regularises_the_early_steps_and_logs_its_clusters(world, tmp_path):
    cfg = tiny_config(world, tmp_path, method="diverse_grpo", diverse_grpo={"reg_steps": 1, "reg_coef": 1.0},
                      sampling={"group_size": 4, "num_steps": 3}, train={"steps": 1, "micro_batch": 8,
                                                                         "minibatches": 2})
    trainer = Trainer(cfg)
    with_kl = []
    original = ReferenceKLTerms.piece_loss

    def spy(self, col, loss, step, idx):
        with_kl.append((col, step.kl is not None))
        return original(self, col, loss, step, idx)

    ReferenceKLTerms.piece_loss = spy
    try:
        row = trainer.train_step(1)
    finally:
        ReferenceKLTerms.piece_loss = original
    # Trained steps 0, 1, 2 (columns 0-2), two minibatches: the reference is evaluated for step 0's pieces only.
    assert sorted(set(with_kl)) == [(0, True), (1, False), (2, False)]
    assert row["diverse_grpo/reg_kl"] > 0  # the second minibatch's policy has left the reference
    assert 1 <= row["diverse_grpo/clusters_mean"] <= 3 and row["diverse_grpo/bonus_mean"] >= 1
    assert row["shaped_reward_mean"] == pytest.approx(row["reward_mean"] + 3 * row["diverse_grpo/bonus_mean"], rel=1e-5)
