"""The trainer's host synchronisations (issue 11, item 4): a training step reads device values on the
host only where `pec.syncs` documents it (the decision of each update, the logged scalars), each inside
`documented_sync`; the validity mask of a step with masked samples is never read."""
import contextlib
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pec.algorithms.base
import pec.trainer
from pec.syncs import documented_sync
from pec.trainer import Trainer

from _tiny_runs import tiny_config


@pytest.mark.gpu
@pytest.mark.parametrize("method,algorithm", [("grpo", "flow_grpo"), ("pec", "flow_grpo"), ("pec", "grpo_guard"),
                                              ("gardo", "flow_grpo"), ("diverse_grpo", "flow_grpo")])
def test_an_embedded_step_syncs_only_where_documented(world, tmp_path, method, algorithm):
    trainer = Trainer(tiny_config(world, tmp_path, method=method, algorithm=algorithm, device="cuda",
                                  train={"steps": 3}))
    trainer.train_step(1)  # warm-up: lazy CUDA/cuBLAS initialisation and Triton compilation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        row = trainer.train_step(2)  # rollout, scoring, perceptual entropy, advantages and the update
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert row["skipped_updates"] == 0 and row["first_update_ratio_dev"] == 0.0


@pytest.mark.gpu
def test_documented_sync_lifts_the_error_mode_and_restores_it():
    x = torch.ones(3, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        with documented_sync():
            assert x.sum().item() == 3.0
        assert torch.cuda.get_sync_debug_mode() == 2
        with pytest.raises(RuntimeError):
            x.sum().item()
    finally:
        torch.cuda.set_sync_debug_mode(0)


#: Where a step handles its validity mask; a host read made from these (outside `documented_sync`) is a
#: sync on a GPU. The sampler's schedule and SDE window, and the optimizer's step counters, are host data.
_MASK_CODE = ("pec/trainer.py", "pec/algorithms/", "pec/methods/", "pec/scoring.py", "pec/entropy.py", "pec/metrics.py", "pec/regularizers.py", "pec/grpo.py",
              "pec/covariance.py", "pec/run_safety.py", "pec_kernels/")


class _HostReadsOutsideDocumentedSyncs(TorchDispatchMode):
    """Records the reads of a tensor value on the host (`.item()`, `bool(t)`, `int(t)`: they dispatch
    aten._local_scalar_dense, a host synchronisation on a GPU) that code handling the validity mask makes
    outside `documented_sync`, and counts the documented syncs. On CPU `.tolist()`/`.cpu()` do not
    dispatch, so this sees the scalar reads only; the GPU test above sees every kind."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []
        self.documented, self.inside = 0, 0

    @contextlib.contextmanager
    def documented_sync(self):
        self.documented += 1
        self.inside += 1
        try:
            yield
        finally:
            self.inside -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self.inside:
            stack = traceback.extract_stack()
            ours = [i for i, frame in enumerate(stack) if "/pec/" in frame.filename or "/pec_kernels/" in frame.filename]
            if ours:
                frame, deeper = stack[ours[-1]], stack[ours[-1] + 1:]
                in_optimizer = any("torch/optim/" in f.filename for f in deeper)
                if not in_optimizer and any(part in frame.filename for part in _MASK_CODE):
                    self.reads.append(f"{frame.filename}:{frame.lineno} {frame.line}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method,extra", [("pec", {}), ("pcgs", {"pcgs": {"generation_density": "latent_group"}}),
                                          ("pec", {"perceptual": {"k": 1, "bank_steps": 2, "batch_metric": True}}),
                                          ("pec", {"algorithm": "nft"}), ("pec", {"algorithm": "grpo_guard"}),
                                          ("gardo", {"gardo": {"kl_coef": 0.1, "aux_rewards": ["contrast"],
                                                               "reset_every": 1}}),
                                          ("diverse_grpo", {"diverse_grpo": {"reg_steps": 1}})],
                         ids=["pec", "pcgs_latent_group", "pec_batch_and_bank", "nft_pec", "pec_grpo_guard",
                              "gardo_gated_reset", "diverse_grpo"])
def test_a_step_with_masked_samples_reads_nothing_outside_the_documented_syncs(world, tmp_path, monkeypatch,
                                                                               method, extra):
    """Step 3 of the "nan_at_call3" reward masks sample 0 and a whole group: the masked estimators, metrics
    and updates must take the mask on the device. Each update's decision and the logged scalars are the
    only documented syncs (2 updates of the step + 1)."""
    import _bad_rewards  # noqa: F401  (registers the reward)

    cfg = tiny_config(world, tmp_path, method=method, reward="nan_at_call3",
                      train={"steps": 3, "micro_batch": 6, "minibatches": 2}, **extra)
    trainer = Trainer(cfg)
    trainer.train_step(1)
    trainer.train_step(2)
    mode = _HostReadsOutsideDocumentedSyncs()
    monkeypatch.setattr(pec.trainer, "documented_sync", mode.documented_sync)
    monkeypatch.setattr(pec.algorithms.base, "documented_sync", mode.documented_sync)
    with mode:
        row = trainer.train_step(3)
    assert row["mask/masked_samples"] == 4 and row["mask/masked_groups"] == 1
    assert mode.reads == []
    assert mode.documented == cfg.train.minibatches + 1
