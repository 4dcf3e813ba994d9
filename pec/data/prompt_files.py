"""Prompt sets for real models (`--data.prompts PATH`).

Accepted (UTF-8, with or without a byte-order mark):
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
import ctypes
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from pec.data.prompts import digit_prompt

SPLIT_SEED = 0
TEST_FRACTION = 0.1
SUFFIXES = (".txt", ".jsonl", ".csv")
_C_LONG_MAX = 2 ** (8 * ctypes.sizeof(ctypes.c_long) - 1) - 1


@dataclass
class PromptSplits:
    """Train and test prompts of a prompt source."""

    train: list[str]
    test: list[str]


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of one .txt / .jsonl / .csv file, in file order; ValueError naming --data.prompts.

    Files are UTF-8, with or without a byte-order mark (Excel and Notepad write one); an error in the file
    names it and the line.
    """
    file = Path(path).expanduser()
    if file.suffix not in SUFFIXES:
        raise ValueError(f"--data.prompts: {file} must be a {' / '.join(SUFFIXES)} file or a Flow-GRPO dataset "
                         f"folder (train.txt / test.txt or *_metadata.jsonl)")
    if not file.is_file():
        raise ValueError(f"--data.prompts: {file} is not a file")
    text = _read_text(file)
    if file.suffix == ".txt":
        prompts = [line.strip() for line in _lines(text)]
    elif file.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(_lines(text), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"--data.prompts: {file} line {number} is not valid JSON ({err.msg} at column "
                                 f"{err.colno})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"--data.prompts: {file} line {number} has no string 'prompt' field")
            prompts.append(record["prompt"].strip())
    else:
        prompts = _read_csv_prompts(file, text)
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"--data.prompts: {file} holds no prompts")
    return prompts


def _read_text(file: Path) -> str:
    """The file's text, decoded as UTF-8 without its byte-order mark; ValueError naming the file (and the line
    of an invalid byte)."""
    try:
        data = file.read_bytes()
    except OSError as err:
        raise ValueError(f"--data.prompts: cannot read {file}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = len(_lines(data[:err.start].decode("utf-8", errors="replace")))
        raise ValueError(f"--data.prompts: {file} line {line} is not valid UTF-8 ({err.reason} at byte "
                         f"{err.start}): save the file as UTF-8") from None


def _lines(text: str) -> list[str]:
    """Lines split at \\n, \\r\\n or \\r only, as editors number them (str.splitlines also splits at
    form feeds and U+2028, which may sit inside a JSON string)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _read_csv_prompts(file: Path, text: str) -> list[str]:
    """The 'prompt' column of a CSV file's text; ValueError naming the file and the line where a malformed
    record starts (strict quoting: a stray quote would otherwise swallow the rest of the file as one prompt)."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records, start = [], 1
    # csv's default field limit (131,072 characters) is below what a prompt may be: lift it to the text's
    # length (no field is longer; csv stores the limit in a C long), for this read only. The limit is
    # process-global; prompt files are read at start-up, in one thread, so restoring it cannot race a reader.
    limit = csv.field_size_limit()
    csv.field_size_limit(min(max(limit, len(text)), _C_LONG_MAX))
    try:
        for record in reader:
            records.append(record)
            start = reader.line_num + 1
    except csv.Error as err:
        raise ValueError(f"--data.prompts: {file} line {start} is not valid CSV ({err})") from None
    finally:
        csv.field_size_limit(limit)
    if not records or "prompt" not in records[0]:
        raise ValueError(f"--data.prompts: {file} has no 'prompt' column")
    column = records[0].index("prompt")
    return [record[column].strip() for record in records[1:] if len(record) > column]


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


def default_prompts(source: str | None = None) -> list[str]:
    """The training prompts: the train split of `source` (--data.prompts), or the embedded world's
    "a handwritten 0" ... "9"."""
    return load_prompt_splits(source).train if source else [digit_prompt(d) for d in range(10)]
