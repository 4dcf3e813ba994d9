"""Prompt sets for real models (`--data.prompts PATH`).

Accepted:
- a .txt file, one prompt a line (blank lines skipped);
- a .jsonl file whose records have a `prompt` field;
- a .csv file with a `prompt` column;
- a Flow-GRPO dataset folder as it ships: `train.txt` / `test.txt` (pickscore, ocr) or
  `train_metadata.jsonl` / `test_metadata.jsonl` (geneval).
A single file is split 90/10 into train and test with a fixed seed (`SPLIT_SEED`); a folder keeps its
own split.
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

SPLIT_SEED = 0
TEST_FRACTION = 0.1
SUFFIXES = (".txt", ".jsonl", ".csv")


@dataclass
class PromptSplits:
    """Train and test prompts of a prompt source."""

    train: list[str]
    test: list[str]


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of one .txt / .jsonl / .csv file, in file order; ValueError naming --data.prompts."""
    file = Path(path).expanduser()
    if file.suffix not in SUFFIXES:
        raise ValueError(f"--data.prompts: {file} must be a {' / '.join(SUFFIXES)} file or a Flow-GRPO dataset "
                         f"folder (train.txt / test.txt or *_metadata.jsonl)")
    if not file.is_file():
        raise ValueError(f"--data.prompts: {file} is not a file")
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".txt":
        prompts = [line.strip() for line in text.splitlines()]
    elif file.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"--data.prompts: {file} line {number} has no string 'prompt' field")
            prompts.append(record["prompt"].strip())
    else:
        rows = list(csv.DictReader(text.splitlines()))
        if not rows or "prompt" not in rows[0]:
            raise ValueError(f"--data.prompts: {file} has no 'prompt' column")
        prompts = [(row["prompt"] or "").strip() for row in rows]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"--data.prompts: {file} holds no prompts")
    return prompts


def load_prompt_splits(path: str | Path) -> PromptSplits:
    """Train / test prompts of a file (split 90/10, seed `SPLIT_SEED`) or a Flow-GRPO dataset folder."""
    source = Path(path).expanduser()
    if source.is_dir():
        for train, test in (("train.txt", "test.txt"), ("train_metadata.jsonl", "test_metadata.jsonl")):
            if (source / train).is_file():
                return PromptSplits(read_prompts(source / train),
                                    read_prompts(source / test) if (source / test).is_file() else [])
        raise ValueError(f"--data.prompts: the folder {source} has neither train.txt nor train_metadata.jsonl "
                         f"(the Flow-GRPO dataset layouts)")
    prompts = read_prompts(source)
    order = list(range(len(prompts)))
    random.Random(SPLIT_SEED).shuffle(order)
    n_test = round(len(prompts) * TEST_FRACTION) if len(prompts) > 1 else 0
    return PromptSplits([prompts[i] for i in order[n_test:]], [prompts[i] for i in order[:n_test]])
