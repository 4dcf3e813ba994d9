"""Shared helpers for tests that train tiny runs (imported by test_train.py and test_evaluate.py, so
test modules never import each other). Not a test module: pytest collects only test_*.py."""
from pec.config import Config, apply_dict


def tiny_config(world, run_dir, **overrides) -> Config:
    """A training config on the tiny random world of `pec.experiments.tiny_world.write_tiny_world`:
    2 prompts x 3 samples, 2 denoising steps, one training step, CPU, no TensorBoard or progress bar.
    `overrides` are nested config sections (e.g. train={"steps": 3})."""
    cfg = Config()
    apply_dict(cfg, {"device": "cpu", "run_dir": str(run_dir), "assets": str(world),
                     "model": {"path": str(world / "embedded")},
                     "sampling": {"prompts_per_step": 2, "group_size": 3, "num_steps": 2},
                     "train": {"steps": 1, "micro_batch": 4},
                     "perceptual": {"k": 1},
                     "logging": {"tensorboard": False, "grid_samples": 2, "progress": False}})
    apply_dict(cfg, overrides)
    return cfg
