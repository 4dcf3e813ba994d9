"""What GARDO and DiverseGRPO exist for, as a user would check it: on the embedded world, at a reduced size
(4 prompts x 8 samples, 4 denoising steps, 20 training steps of Flow-GRPO, lr 2e-3 and two updates per rollout
batch so that 20 steps show the collapse), for seeds 0 and 1, measured on sampled images with the same held-out
seeds (16 images of each digit prompt) in the evaluation-only space simclr_eval:
- GRPO alone (`--method none`) lowers the within-group diversity by at least 3% (asserted first, so that the
  comparison cannot pass vacuously);
- each method, at its defaults in the regulariser's space (simclr), keeps more (over the two seeds: GARDO's
  novelty weights move little per step, about +1% here), at a training reward no more than 0.01 below GRPO's,
  so that the diversity is not bought by not learning.
Each seed is a process of its own, two at a time (25 s each on this project's CPU machine)."""
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SEEDS = (0, 1)
METHODS = ("gardo", "diverse_grpo")
OPTIONS = ["--methods", ",".join(("none", *METHODS)), "--num-steps", "4", "--train.minibatches", "2",
           "--train.lr", "2e-3"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("method_diversity")

    def job(seed):
        out = root / f"seed{seed}"
        subprocess.run([sys.executable, str(HERE / "_diversity_run.py"), str(out), "flow_grpo", str(seed), "20",
                        *OPTIONS], check=True, capture_output=True, text=True)
        return json.loads((out / "result.json").read_text())

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(job, SEEDS))


def test_grpo_collapses_diversity_and_each_method_keeps_more(results):
    space = "dist/simclr_eval"
    for seed, r in zip(SEEDS, results):
        assert r["none"][space] <= 0.97 * r["pretrained"][space], (seed, r["pretrained"][space], r["none"][space])
    alone = sum(r["none"][space] for r in results)
    for method in METHODS:
        kept = sum(r[method][space] for r in results)
        assert kept > alone, (method, [(r["none"][space], r[method][space]) for r in results])
        for r in results:
            assert r[method]["digit"] >= r["none"]["digit"] - 0.01, (method, r["none"]["digit"], r[method]["digit"])
