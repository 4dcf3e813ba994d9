"""`--data.prompts`: .txt / .jsonl / .csv files split 90/10 with a fixed seed, Flow-GRPO dataset folders
with their own split, and errors that name the option."""
import json

import pytest

from pec.checks import check_run
from pec.config import parse_config
from pec.data.prompt_files import load_prompt_splits, read_prompts

PROMPTS = [f"a photo of thing {i}" for i in range(20)]


def test_file_formats_read_the_same_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:3]) + "\n\n")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": p, "tag": 1}) for p in PROMPTS[:3]) + "\n")
    (tmp_path / "p.csv").write_text("id,prompt\n" + "\n".join(f'{i},"{p}"' for i, p in enumerate(PROMPTS[:3])))
    for name in ("p.txt", "p.jsonl", "p.csv"):
        assert read_prompts(tmp_path / name) == PROMPTS[:3]


def test_single_file_splits_90_10_with_a_fixed_seed(tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    splits = load_prompt_splits(tmp_path / "p.txt")
    assert len(splits.train) == 18 and len(splits.test) == 2
    assert sorted(splits.train + splits.test) == sorted(PROMPTS) and not set(splits.train) & set(splits.test)
    assert load_prompt_splits(tmp_path / "p.txt") == splits  # the same split every time
    assert splits.train != PROMPTS[:18]  # shuffled before splitting


@pytest.mark.parametrize("layout", ["txt", "metadata"])
def test_flow_grpo_folders_keep_their_split(tmp_path, layout):
    if layout == "txt":
        (tmp_path / "train.txt").write_text("\n".join(PROMPTS[:5]))
        (tmp_path / "test.txt").write_text("\n".join(PROMPTS[5:7]))
    else:
        for split, rows in (("train", PROMPTS[:5]), ("test", PROMPTS[5:7])):
            (tmp_path / f"{split}_metadata.jsonl").write_text(
                "\n".join(json.dumps({"prompt": p, "tag": "single_object"}) for p in rows))
    splits = load_prompt_splits(tmp_path)
    assert splits.train == PROMPTS[:5] and splits.test == PROMPTS[5:7]


def test_bad_sources_name_the_option(tmp_path):
    (tmp_path / "bad.csv").write_text("id,text\n1,a cat\n")
    (tmp_path / "bad.jsonl").write_text('{"caption": "a cat"}\n')
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "p.yaml").write_text("- a cat\n")
    for name, match in [("bad.csv", "no 'prompt' column"), ("bad.jsonl", "line 1 has no string 'prompt'"),
                        ("empty.txt", "holds no prompts"), ("p.yaml", "must be a .txt / .jsonl / .csv"),
                        ("missing.txt", "is not a file"), (".", "neither train.txt nor train_metadata")]:
        with pytest.raises(ValueError, match="--data.prompts.*" + match):
            load_prompt_splits(tmp_path / name)
    with pytest.raises(ValueError, match="--data.prompts"):
        check_run(parse_config(["--data.prompts", str(tmp_path / "missing.txt")]))


def test_lines_break_only_at_newlines(tmp_path):
    """A JSON string may hold U+2028 or a form feed raw; str.splitlines would cut the record there."""
    prompt = "a poster\u2028with two lines\x0cand a page break"
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": prompt}, ensure_ascii=False) + "\r\n"
                                      + json.dumps({"prompt": "a cat"}) + "\r\n", encoding="utf-8")
    assert read_prompts(tmp_path / "p.jsonl") == [prompt, "a cat"]
