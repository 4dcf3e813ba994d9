"""Shared helpers for tests that train tiny runs or build a tiny random model (so test modules never import
each other). Not a test module: pytest collects only test_*.py."""
from pec.config import Config, apply_dict
from pec.models.embedded import EmbeddedConfig

#: The smallest embedded model the tests build from config (random weights, one layer).
TINY = EmbeddedConfig(num_layers=1, attention_head_dim=8, num_attention_heads=2, text_dim=16)


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
