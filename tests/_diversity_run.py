"""One (algorithm, seed) job of tests/test_algorithm_diversity.py, run as its own process so that two jobs
share the machine's cores: trains the algorithm alone and with PEC from the same pretrained model and seed,
evaluates both and the pretrained model on the same held-out seeds, and writes the metrics as JSON.

    python tests/_diversity_run.py OUT_DIR ALGORITHM SEED STEPS [extra pec.train options...]
"""
import json
import sys
from pathlib import Path

from pec.evaluate import evaluate
from pec.train import main as train

# The stated reduced size: 4 prompts x 8 samples a step, 6 denoising steps; evaluation: 16 images of each of
# the 10 digit prompts, ODE sampler, 6 steps, the held-out evaluation seed.
SIZE = ["--sampling.prompts_per_step", "4", "--sampling.group_size", "8", "--sampling.num_steps", "6",
        "--logging.tensorboard", "false", "--logging.progress", "false", "--logging.grid_samples", "1",
        "--logging.checkpoint_every", "1000", "--device", "cpu", "--threads", "1"]
EVAL = {"eval": {"images_per_prompt": 16, "num_steps": 6}, "threads": 1}


def run(out: Path, algorithm: str, seed: str, steps: str, extra: list[str]) -> dict:
    """Train `algorithm` alone and with PEC; return {"pretrained" | "alone" | "pec": metrics}."""
    runs = []
    for method in ("none", "pec"):
        folder = out / method
        train([*SIZE, "--algorithm", algorithm, "--method", method, "--seed", seed, "--train.steps", steps, *extra,
               "--run-dir", str(folder)])
        runs.append(str(folder))
    evaluate(["pretrained", *runs], out / "eval", EVAL)
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    return dict(zip(("pretrained", "alone", "pec"), metrics.values()))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    result = run(out, sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    (out / "result.json").write_text(json.dumps(result))
