"""Several processes on CPU (gloo), issue 10: 2 processes against 1 at the same seed and global batch,
`spread` entropies, a 2-process run resumed by 1 process, a killed rank, impossible layouts.

Each multi-process test launches real processes (torchrun, or two plain ones for the killed rank).
"""
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pec.config import to_dict
from pec.distributed import DistContext, minibatch_plan, sample_noise
from pec.logging_utils import read_metrics
from pec.train import main

from _dist_worker import dist_config, run_and_capture

TESTS = Path(__file__).parent
REL = 1e-5  # the stated tolerance for anything downstream of an all-reduce (summation order)


@pytest.fixture(scope="module")
def single(world, tmp_path_factory):
    """The one-process reference: 3 steps, contiguous (placement changes nothing with one process)."""
    return run_and_capture(world, tmp_path_factory.mktemp("single"), "contiguous", 3)


def _torchrun(nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _two_process_capture(world, out, placement, steps=2, tuning="lora", method="pec", nproc=2, prompts=2):
    _torchrun(nproc, str(TESTS / "_dist_worker.py"), str(world), str(out), placement, str(steps), tuning, method,
              str(prompts))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


def _close(a, b, rel=REL):
    scale = max(abs(a), abs(b), 1e-12)
    return abs(a - b) <= rel * scale


def _assert_rows_close(rows_a, rows_b, exact_keys=()):
    for ra, rb in zip(rows_a, rows_b):
        keys = [k for k in ra if not k.startswith("time/")]
        assert keys == [k for k in rb if not k.startswith("time/")]
        for k in keys:
            a, b = ra[k], rb[k]
            if k in exact_keys:
                assert a == b, (ra["step"], k, a, b)
            elif k in ("loss", "surrogate"):  # sums of +-A terms that cancel to ~0: compare on the scale of A
                assert abs(a - b) <= REL * ra["advantage_abs"], (ra["step"], k, a, b)
            elif isinstance(a, float) and not (math.isnan(a) and math.isnan(b)):
                assert _close(a, b), (ra["step"], k, a, b)
            else:
                assert a == b or (math.isnan(a) and math.isnan(b)), (ra["step"], k, a, b)


# Rollout-level values: bit-identical; loss-level values pass through all-reduces (summation order).
ROLLOUT_KEYS = ("reward_mean", "reward_group_std", "shaped_reward_mean", "mask/invalid_samples",
                "mask/masked_samples", "mask/masked_groups")


@pytest.mark.parametrize("placement, method", [("contiguous", "pec"), ("spread", "guided"), ("spread", "mixgrpo")])
def test_two_processes_match_one(world, single, tmp_path, placement, method):
    # Under spread, the PCGS guided form's entropy gradient flows through a differentiable gather, and
    # MixGRPO's groups share their initial noise across ranks.
    if method != "pec":
        single = run_and_capture(world, tmp_path / "single", placement, 2, "lora", method)
    ranks = _two_process_capture(world, tmp_path / "two", placement, method=method)
    for rank in ranks:  # every rank holds the same global view
        # Step 1 is bit-identical; step 2 follows weights that went through an all-reduce.
        assert torch.equal(rank["shaped"][0], single["shaped"][0]), placement
        assert torch.equal(rank["advantages"][0], single["advantages"][0]), placement
        torch.testing.assert_close(rank["advantages"][1], single["advantages"][1], rtol=1e-4, atol=1e-5)
        for grads_a, grads_b in zip(rank["grads"], single["grads"][:2]):
            for a, b in zip(grads_a, grads_b):
                assert (a - b).norm() <= REL * b.norm(), (placement, (a - b).norm() / b.norm())
    perceptual = tuple(k for k in single["rows"][0] if k.startswith(("perc_", "diversity/")))
    _assert_rows_close(ranks[0]["rows"][:1], single["rows"][:1], exact_keys=ROLLOUT_KEYS + perceptual)
    _assert_rows_close(ranks[0]["rows"], single["rows"][:2])
    _assert_rows_close(ranks[1]["rows"], ranks[0]["rows"])


def test_four_processes_sample_what_one_does(world, tmp_path):
    """4 prompts x 4 samples, micro-batches of 2: every rank's 4 samples split into the one-process
    run's micro-batches, so the first step is bit-identical."""
    single = run_and_capture(world, tmp_path / "single", "contiguous", 1, prompts=4)
    ranks = _two_process_capture(world, tmp_path / "four", "contiguous", steps=1, nproc=4, prompts=4)
    for rank in ranks:
        assert torch.equal(rank["shaped"][0], single["shaped"][0])
        assert torch.equal(rank["advantages"][0], single["advantages"][0])
    perceptual = tuple(k for k in single["rows"][0] if k.startswith(("perc_", "diversity/")))
    _assert_rows_close(ranks[0]["rows"], single["rows"], exact_keys=ROLLOUT_KEYS + perceptual)


def test_fsdp2_full_fine_tuning_on_two_processes_matches_one(world, tmp_path):
    single = run_and_capture(world, tmp_path / "single", "contiguous", 2, "full")
    ranks = _two_process_capture(world, tmp_path / "two", "contiguous", tuning="full")
    for rank in ranks:
        # Step 1 is bit-identical; step 2 follows weights that went through an all-reduce.
        assert torch.equal(rank["advantages"][0], single["advantages"][0])
        torch.testing.assert_close(rank["advantages"][1], single["advantages"][1], rtol=1e-4, atol=1e-5)
        for grads_a, grads_b in zip(rank["grads"], single["grads"]):
            for a, b in zip(grads_a, grads_b):
                assert (a - b).norm() <= REL * b.norm().clamp_min(1e-12), (a - b).norm() / b.norm()
    _assert_rows_close(ranks[0]["rows"], single["rows"])
    checkpoint = torch.load(tmp_path / "two" / "run" / "checkpoints" / "step-00000002.pt", weights_only=False)
    assert {k: tuple(v.shape) for k, v in checkpoint["model"].items()} == {
        k: tuple(v.shape) for k, v in torch.load(tmp_path / "single" / "run" / "checkpoints" / "step-00000002.pt",
                                                  weights_only=False)["model"].items()}


def test_a_two_process_run_resumes_with_one(world, single, tmp_path):
    run = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(to_dict(dist_config(world, run, "contiguous", 3, train={"stop_after": 2}))))
    _torchrun(2, "-m", "pec.train", "--config", str(config))
    assert yaml.safe_load((run / "config.yaml").read_text())["dist"]["processes"] == 2
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    main(["--run-dir", str(run), "--resume", "--train.stop_after", "none"])
    assert yaml.safe_load((run / "config.yaml").read_text())["dist"]["processes"] == 1
    _assert_rows_close(read_metrics(run / "metrics.jsonl"), single["rows"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_killed_rank_is_an_error_not_a_hang(world, tmp_path):
    run = tmp_path / "run"
    # micro_batch 4: each rank scores its 4 samples in one call, so the reward's call 3 is step 3.
    cfg = dist_config(world, run, "contiguous", 5, train={"micro_batch": 4}, reward="slow_at_call3")
    cfg.dist.timeout = 30
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    marker = tmp_path / "rank1_in_step_3"
    script = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import _bad_rewards; "
              f"from pec.train import main; main(['--config', {str(config)!r}])")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r),
                                              **({"PEC_TEST_MARKER": str(marker)} if r == 1 else {})})
             for r in range(2)]
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        assert time.monotonic() < deadline, "rank 1 never reached step 3"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    started = time.monotonic()
    _, err = procs[0].communicate(timeout=120)
    procs[1].wait()
    assert procs[0].returncode == 1, err[-2000:]  # a failure during the run (README, "Exit codes")
    assert "rank 0: a collective failed" in err and "--resume" in err and "Traceback" not in err, err[-2000:]
    assert time.monotonic() - started < 60
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]


# ---------------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("kwargs, message", [
    ({"prompts_per_step": 3, "group_size": 4, "placement": "contiguous"}, "prompts_per_step \\(3\\) must divide"),
    ({"prompts_per_step": 2, "group_size": 3, "placement": "spread"}, "group_size \\(3\\) must divide"),
])
def test_impossible_layouts_are_rejected_with_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistContext(rank=0, world_size=2).check_layout(**kwargs, method="pec", pcgs_form="reward",
                                                       generation_density="policy")


@pytest.mark.parametrize("placement", ["contiguous", "spread"])
@pytest.mark.parametrize("minibatches", [1, 3, 8])
def test_minibatch_plans_cover_the_batch_once_with_equal_work_per_rank(placement, minibatches):
    for w in (1, 2, 4):
        index = [DistContext(rank=r, world_size=w).placement(4, 4, placement).global_index for r in range(w)]
        plans = [minibatch_plan(idx, 2, minibatches, torch.Generator().manual_seed(7)) for idx in index]
        covered = []
        for m in range(minibatches):
            assert len({len(plan[m][0]) for plan in plans}) == 1  # DDP / FSDP2: as many passes on every rank
            for idx, plan in zip(index, plans):
                local, global_rows = plan[m]
                assert torch.equal(idx[torch.cat(local)] if local else idx[:0], global_rows)
                covered += global_rows.tolist()
        assert sorted(covered) == list(range(16))
        if minibatches == 1:
            assert [sorted(torch.cat([p[0][1] for p in plans]).tolist())] == [list(range(16))]


def test_sample_noise_depends_on_the_global_index_only():
    whole = sample_noise(torch.arange(6), (1, 2, 2), 3, seed=5, device="cpu")
    part = sample_noise(torch.tensor([4, 1]), (1, 2, 2), 3, seed=5, device="cpu")
    assert torch.equal(part[:, 0], whole[:, 4]) and torch.equal(part[:, 1], whole[:, 1])
    assert not torch.equal(whole[:, 0], whole[:, 1])
