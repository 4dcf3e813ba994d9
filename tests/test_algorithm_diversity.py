"""What the regulariser exists for, under every RL algorithm beside Flow-GRPO (whose collapse and PEC's
answer to it the paper table decides, docs/paper_table/claims.md): on the embedded world, at the reduced size of
tests/_diversity_run.py (4 prompts x 8 samples, 6 denoising steps, 30 training steps), for seeds 0 and 1,
measured on sampled images with the same held-out seeds (16 images of each digit prompt):
- the gold reward (the evaluation-only classifier) rises over the 30 steps;
- the algorithm alone lowers the within-group diversity in the evaluation-only space simclr_eval by at
  least 5% (asserted first, so that the comparison cannot pass vacuously);
- PEC at its shipped lambda keeps more, in both seeds.
Each (algorithm, seed) is a process of its own, two at a time."""
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pec.algorithms import ALGORITHMS

HERE = Path(__file__).resolve().parent
STEPS = 30
SEEDS = (0, 1)
# Each algorithm's settings for the reduced size (beyond its defaults): two updates per rollout batch for the
# clipped policy gradients, so that 30 steps move them far enough to show the collapse.
OPTIONS: dict[str, list[str]] = {
    "mixgrpo": ["--train.minibatches", "2"],
    "flow_grpo_fast": ["--train.minibatches", "2"],
    "grpo_guard": ["--train.minibatches", "2"],
    "nft": [],  # one update a step, as the authors': their implicit policies move it further per update
}
ALGORITHMS_JUDGED = [name for name in ALGORITHMS.names() if name != "flow_grpo"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("diversity")
    jobs = [(algorithm, seed) for algorithm in ALGORITHMS_JUDGED for seed in SEEDS]
    missing = [a for a in ALGORITHMS_JUDGED if a not in OPTIONS]
    assert not missing, f"give every algorithm its reduced-size settings in OPTIONS: {missing}"

    def job(algorithm, seed):
        out = root / f"{algorithm}-{seed}"
        subprocess.run([sys.executable, str(HERE / "_diversity_run.py"), str(out), algorithm, str(seed), str(STEPS),
                        *OPTIONS[algorithm]], check=True, capture_output=True, text=True)
        return (algorithm, seed), json.loads((out / "result.json").read_text())

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(lambda j: job(*j), jobs))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS_JUDGED)
def test_the_algorithm_collapses_diversity_and_pec_keeps_more(results, algorithm):
    for seed in SEEDS:
        r = results[(algorithm, seed)]
        start, alone, pec = r["pretrained"], r["none"], r["pec"]
        assert alone["gold"] > start["gold"], (seed, start["gold"], alone["gold"])
        assert alone["dist/simclr_eval"] <= 0.95 * start["dist/simclr_eval"], (
            seed, start["dist/simclr_eval"], alone["dist/simclr_eval"])
        assert pec["dist/simclr_eval"] > alone["dist/simclr_eval"], (
            seed, alone["dist/simclr_eval"], pec["dist/simclr_eval"])
