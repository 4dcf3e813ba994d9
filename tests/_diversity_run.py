"""One (algorithm, seed) job of tests/test_algorithm_diversity.py and tests/test_method_diversity.py, run as its own
process so that two jobs share the machine's cores: trains the algorithm alone and with each regulariser from the
same pretrained model and seed, evaluates them and the pretrained model on the same held-out seeds, and writes
the metrics as JSON.

    python tests/_diversity_run.py OUT_DIR ALGORITHM SEED STEPS [--methods none,pec] [--num-steps 6] [options...]

(the other options go to every `pec.train` run).
"""
import json
import sys
from pathlib import Path

from pec.evaluate import evaluate
from pec.train import main as train

# The stated reduced size: 4 prompts x 8 samples a step, --num-steps denoising steps (6 by default); evaluation:
# 16 images of each of the 10 digit prompts, ODE sampler, as many steps, the held-out evaluation seed.
SIZE = ["--sampling.prompts_per_step", "4", "--sampling.group_size", "8",
        "--logging.tensorboard", "false", "--logging.progress", "false", "--logging.grid_samples", "1",
        "--logging.checkpoint_every", "1000", "--device", "cpu", "--threads", "1"]


def run(out: Path, algorithm: str, seed: str, steps: str, extra: list[str], methods: list[str], num_steps: str
        ) -> dict:
    """Train `algorithm` with each of `methods`; return {"pretrained" | method: metrics}."""
    runs = []
    for method in methods:
        folder = out / method
        train([*SIZE, "--sampling.num_steps", num_steps, "--algorithm", algorithm, "--method", method, "--seed", seed,
               "--train.steps", steps, *extra, "--run-dir", str(folder)])
        runs.append(str(folder))
    evaluate(["pretrained", *runs], out / "eval",
             {"eval": {"images_per_prompt": 16, "num_steps": int(num_steps)}, "threads": 1})
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    return dict(zip(("pretrained", *methods), metrics.values()))


def _option(args: list[str], flag: str, default: str) -> str:
    """Remove `flag VALUE` from `args` and return VALUE (or `default`)."""
    if flag not in args:
        return default
    i = args.index(flag)
    value = args[i + 1]
    del args[i:i + 2]
    return value


if __name__ == "__main__":
    out, rest = Path(sys.argv[1]), sys.argv[5:]
    methods = _option(rest, "--methods", "none,pec").split(",")
    num_steps = _option(rest, "--num-steps", "6")
    result = run(out, sys.argv[2], sys.argv[3], sys.argv[4], rest, methods, num_steps)
    (out / "result.json").write_text(json.dumps(result))
