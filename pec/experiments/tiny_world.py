"""A tiny, randomly initialised copy of the embedded world, for tests and smoke runs.

`write_tiny_world(folder)` writes a tiny flow model (folder/embedded) and random reward and
perceptual networks (folder/*.safetensors) in the shipped layout; point a run at them with
`--model.path folder/embedded --assets folder`. The numbers it produces mean nothing; the code paths
are exactly those of the real world.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pec.models.embedded import EmbeddedConfig, EmbeddedFlowModel
from pec.perceptual.networks import NETWORKS, save_network

TINY_MODEL = EmbeddedConfig(num_layers=1, attention_head_dim=8, num_attention_heads=2, text_dim=16)
TINY_NETWORKS = {"classifier": {"width": 4, "feature_dim": 8}, "simclr": {"width": 4, "feature_dim": 8},
                 "autoencoder": {"width": 4, "latent_dim": 6}, "gold": {"hidden": 8},
                 "simclr_eval": {"width": 4, "feature_dim": 8}}


def write_tiny_world(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny model and networks into `folder`; return `folder`."""
    folder = Path(folder)
    torch.manual_seed(seed)
    EmbeddedFlowModel(TINY_MODEL).save(folder / "embedded")
    for name, kwargs in TINY_NETWORKS.items():
        save_network(NETWORKS[name](**kwargs), folder / f"{name}.safetensors")
    return folder
