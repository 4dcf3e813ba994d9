"""Bad input: prompt files (`--data.prompts`) as editors and spreadsheets save them, and broken ones.

A byte-order mark is read away; a huge CSV field is a prompt, not a traceback; an undecodable byte, a
broken JSON line or a malformed CSV record is one ValueError line naming the file and its line.
"""
import csv
import json

import pytest

from pec.data.prompt_files import read_prompts
from pec.train import main

BOM = "\ufeff"
PROMPTS = ["a red cube", "a blue ball", "two cats"]


@pytest.mark.parametrize("suffix, text", [
    (".txt", "\n".join(PROMPTS) + "\n"),
    (".jsonl", "\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n"),
    (".csv", "prompt,id\n" + "\n".join(f"{p},{i}" for i, p in enumerate(PROMPTS)) + "\n"),
])
def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path, suffix, text):
    path = tmp_path / f"excel{suffix}"
    path.write_text(BOM + text.replace("\n", "\r\n"), encoding="utf-8")  # as Excel and Notepad save
    assert read_prompts(path) == PROMPTS


def test_a_csv_field_longer_than_csvs_default_limit_is_a_prompt(tmp_path):
    long_prompt = "a very detailed scene, " * 8_696  # 200,008 characters, over csv's 131,072
    path = tmp_path / "long.csv"
    path.write_text(f'id,prompt\n1,"{long_prompt}"\n2,short\n', encoding="utf-8")
    limit = csv.field_size_limit()
    assert read_prompts(path) == [long_prompt.strip(), "short"]
    assert csv.field_size_limit() == limit  # lifted for the read only


def _one_line_error(path) -> str:
    with pytest.raises(ValueError) as info:
        read_prompts(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith("--data.prompts: ") and str(path) in message, message
    return message


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
def test_invalid_utf8_names_the_file_and_line(tmp_path, suffix):
    lines = {".txt": [b"a cat", b"a dog", b"caf\xe9 au lait"],  # Latin-1, not UTF-8, on line 3
             ".jsonl": [b'{"prompt": "a cat"}', b'{"prompt": "a dog"}', b'{"prompt": "caf\xe9"}'],
             ".csv": [b"prompt", b"a dog", b"caf\xe9 au lait"]}[suffix]
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    assert "line 3 is not valid UTF-8" in _one_line_error(path)


def test_broken_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a cat"}\n{"prompt": "a dog",}\n{"prompt": "a cow"}\n')
    assert "line 2 is not valid JSON" in _one_line_error(path)


@pytest.mark.parametrize("text, line", [
    ('id,prompt\n1,a cat\n2,"a dog\n3,a cow\n', 3),   # an unclosed quote would swallow the rest of the file
    ('id,prompt\n1,a cat\n\n2,"a" dog\n', 4),          # text after a closing quote
])
def test_malformed_csv_names_the_file_and_line(tmp_path, text, line):
    path = tmp_path / "quotes.csv"
    path.write_text(text)
    assert f"line {line} is not valid CSV" in _one_line_error(path)


def test_pec_train_refuses_a_broken_prompt_file_before_any_work(tmp_path, capsys):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a cat"}\n{"prompt": \n')
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(["--data.prompts", str(path), "--run-dir", str(run), "--train.steps", "1", "--logging.progress",
              "false", "--logging.tensorboard", "false"])
    code = info.value.code
    message = code if isinstance(code, str) else capsys.readouterr().err
    assert code not in (0, None)
    assert f"{path} line 2 is not valid JSON" in message and "\n" not in message.strip(), message
    assert not run.exists()
