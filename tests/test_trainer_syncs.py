"""The trainer's host synchronisations (issue 11, item 4): a training step reads device values on the
host only where `pec.syncs` documents it (the validity mask, the finiteness decision of each update,
the logged scalars), each inside `documented_sync`."""
import pytest
import torch

from pec.experiments.tiny_world import write_tiny_world
from pec.syncs import documented_sync
from pec.train import Trainer

from _tiny_runs import tiny_config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_tiny_world(tmp_path_factory.mktemp("tiny_world"))


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["grpo", "pec"])
def test_an_embedded_step_syncs_only_where_documented(world, tmp_path, method):
    trainer = Trainer(tiny_config(world, tmp_path, method=method, device="cuda", train={"steps": 3}))
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
