"""The paper table's kept results: one small JSON file per finished run (and one for the pretrained model),
what the report reads and what a later invocation, on this machine or another, skips.

A run's file `<results>/seed<s>/<row>.json` holds:
- `recipe`: what made it (seed, steps, the training options, images per prompt at evaluation). A later
  invocation reuses the file only when its recipe is the same, and refuses a different one (delete the
  file to retrain), so a result never stands for options it was not trained with;
- `evaluations`: reading -> step -> pec.evaluate's metrics at each milestone (`eval`, and `eval_guided`
  for a PCGS guided row);
- `training`: the per-step training reward and, for the algorithms that log one, policy entropy (claim 1
  reads GRPO's);
- `seconds` and `machine`: how long training and evaluation took, and where (the budgets' evidence);
- `version`: the package version.
A run's evaluation samples at its last milestone are kept beside it as `<row>.png` (the report's grids).
The files are a few kB each: commit them (the README's table is regenerated from `docs/paper_table/results`).
The code's version is recorded but not checked: after a change that moves the trainer's numbers, start
from an empty results folder.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import pec
from pec.atomic import atomic_write_text
from pec.evaluate import PRETRAINED
from pec.logging_utils import read_metrics

FORMAT = 1
TRAINING_KEYS = ("reward_mean", "policy_entropy")


def run_file(results: Path, seed: int, row: str) -> Path:
    """The result file of one run."""
    return results / f"seed{seed}" / f"{row}.json"


def pretrained_file(results: Path) -> Path:
    """The pretrained model's result file."""
    return results / f"{PRETRAINED}.json"


def machine() -> dict[str, Any]:
    """Where a result was made: processor, cores, Python and torch versions."""
    return {"processor": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__}


def recipe(seed: int | None, steps: int | None, options: Sequence[str], images: int) -> dict[str, Any]:
    """What makes a result: the seed and steps (None for the pretrained model), options, images per prompt."""
    return {"seed": seed, "steps": steps, "options": list(options), "images_per_prompt": images}


def check_recipe(path: Path, expected: Mapping[str, Any]) -> bool:
    """Whether `path` holds a finished result of `expected` (False when there is none); raise a ValueError
    naming the file when it was made with another recipe."""
    if not path.exists():
        return False
    try:
        found = json.loads(path.read_text())["recipe"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a paper-table result ({err}); delete it to redo that run") from err
    if found != dict(expected):
        changed = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
        raise ValueError(f"{path} was made with other {', '.join(changed)} ({found} vs now {dict(expected)}); "
                         f"delete it to redo that run, or pass the --results folder it belongs to")
    return True


def _evaluation(folder: Path) -> dict[str, dict[str, float]]:
    """step -> metrics of one milestone evaluation (rows named `<run>@<step>` by `pec.evaluate`), keys as strings
    (JSON)."""
    raw = json.loads((folder / "metrics.json").read_text())
    return {name.rpartition("@")[2]: metrics for name, metrics in raw.items()}


def _keep(path: Path, made_by: Mapping[str, Any], samples: Path, **content: Any) -> None:
    """Write a result file: the header every result has (format, recipe, version, machine), then `content`;
    `samples` (an image, when it exists) is copied beside it as `<name>.png`. The JSON is written last, so a
    result file that exists is complete."""
    data = {"format": FORMAT, "recipe": dict(made_by), "version": pec.__version__, "machine": machine(), **content}
    path.parent.mkdir(parents=True, exist_ok=True)
    if samples.exists():
        shutil.copyfile(samples, path.with_suffix(".png"))
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def write_run(path: Path, made_by: Mapping[str, Any], run: Path, readings: Sequence[str], last: int,
              seconds: Mapping[str, float]) -> None:
    """Keep a finished run's result: its milestone evaluations (`readings`: folders of `run`), training curve,
    timing, and its samples at step `last` as `<row>.png` beside the file."""
    rows = read_metrics(run / "metrics.jsonl")
    _keep(path, made_by, run / readings[0] / f"samples_{run.name}@{last}.png", seconds=dict(seconds),
          evaluations={r: _evaluation(run / r) for r in readings},
          training={k: [row[k] for row in rows] for k in TRAINING_KEYS if rows and k in rows[0]})


def write_pretrained(path: Path, made_by: Mapping[str, Any], folder: Path, seconds: float) -> None:
    """Keep the pretrained model's evaluation (and its samples) from `pec.evaluate`'s `folder`."""
    _keep(path, made_by, folder / f"samples_{PRETRAINED}.png", seconds={"evaluate": seconds},
          metrics=json.loads((folder / "metrics.json").read_text())[PRETRAINED])


def read(path: Path) -> dict[str, Any]:
    """A result file's content, with a ValueError naming the file when it is missing."""
    if not path.exists():
        raise ValueError(f"{path} is missing: the run has not finished (rerun the command to finish it)")
    return json.loads(path.read_text())


def evaluations(data: Mapping[str, Any], reading: str) -> dict[int, dict[str, float]]:
    """step -> metrics of one reading of a run's result."""
    return {int(step): metrics for step, metrics in data["evaluations"][reading].items()}
