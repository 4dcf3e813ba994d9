"""A tiny training run that records what the multi-process tests compare: the step's global shaped
rewards and advantages, the reduced gradient of every update, and the metric rows.

Run in-process (`run_and_capture`) for the one-process reference, or under torchrun:
    torchrun --standalone --nproc_per_node 2 tests/_dist_worker.py WORLD OUT PLACEMENT STEPS [lora|full]
        [pec|guided|mixgrpo] [PROMPTS]
Not a test module (pytest collects only test_*.py).
"""
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).parent))

import pec.trainer as train_module  # noqa: E402
from _tiny_runs import tiny_config  # noqa: E402
from pec.trainer import Trainer  # noqa: E402

# 2 prompts x 4 samples, micro-batches of 2: with 1, 2 or 4 processes every rank's batch splits into
# the same micro-batches as the one-process run's.
SIZES = {"sampling": {"prompts_per_step": 2, "group_size": 4}, "train": {"micro_batch": 2}}


METHODS = {"pec": {"method": "pec"}, "guided": {"method": "pcgs", "pcgs": {"form": "guided"}},
           # MixGRPO with PEC: the window [0, 1) at step 1, [1, 2) at step 2, one initial noise per group
           "mixgrpo": {"method": "pec", "algorithm": "mixgrpo",
                       "mixgrpo": {"window_size": 1, "shift_interval": 1, "limit": 2}}}


def dist_config(world: Path, run_dir: Path, placement: str, steps: int, method: str = "pec", prompts: int = 2,
                **sections):
    """The tiny config the multi-process tests share (`method`: a key of METHODS; `prompts` per step)."""
    sections = {**METHODS[method], **sections}
    return tiny_config(world, run_dir, sampling={**SIZES["sampling"], "prompts_per_step": prompts},
                       train={**SIZES["train"], "steps": steps, **sections.pop("train", {})},
                       dist={"placement": placement, "timeout": 60}, **sections)


def run_and_capture(world: Path, out: Path, placement: str, steps: int, tuning: str = "lora",
                    method: str = "pec", prompts: int = 2) -> dict:
    """Train and return {"rows", "shaped", "advantages", "grads"} (this rank's view; gradients whole,
    gathered from FSDP2 shards under full fine-tuning)."""
    captured = {"shaped": [], "advantages": [], "grads": []}
    original = train_module.group_advantages

    def capture(shaped, *args, **kwargs):
        adv = original(shaped, *args, **kwargs)
        captured["shaped"].append(shaped.clone())
        captured["advantages"].append(adv.clone())
        return adv

    train_module.group_advantages = capture
    try:
        trainer = Trainer(dist_config(world, out / "run", placement, steps, method, int(prompts),
                                      train={"lora": tuning == "lora"}))
        step_fn = trainer.optimizer.step

        def step(*args, **kwargs):
            captured["grads"].append([p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone()
                                      for group in trainer.optimizer.param_groups for p in group["params"]])
            return step_fn(*args, **kwargs)

        trainer.optimizer.step = step
        captured["rows"] = trainer.run()
        captured["rank"] = trainer.dist.rank
        trainer.dist.close()
    finally:
        train_module.group_advantages = original
    return captured


if __name__ == "__main__":
    world, out, placement, steps = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    result = run_and_capture(world, out, placement, steps, *sys.argv[5:])
    torch.save(result, out / f"rank{result['rank']}.pt")
