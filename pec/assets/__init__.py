"""Weights, configs and logs that ship with the package (produced by `python -m pec.pretrain`).

Layout: embedded/ (the flow model: config.json, model.safetensors), one safetensors file per
small network (classifier, simclr, autoencoder; each carries its constructor config in its
metadata), pretrain_config.json and pretrain_log.txt (the run that produced them, with its metrics).
"""
from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent


def asset_path(name: str, directory: str | Path | None = None) -> Path:
    """Path of the shipped asset `name` (in `directory` if given); FileNotFoundError if it is missing."""
    path = Path(directory or ASSETS_DIR) / name
    if not path.exists():
        raise FileNotFoundError(f"asset {name!r} is missing from {path.parent}; "
                                "run `python -m pec.pretrain` to produce it")
    return path
