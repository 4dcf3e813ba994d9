"""`python -m pec.evaluate` on a real model: a tiny FLUX.1 folder, pretrained and after one trained step, scored
with tiny reward and perceptual-space checkpoints in the real on-disk layouts (no downloads)."""
import csv
import json
import re
import shlex
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("open_clip")

from _tiny_diffusers import (tiny_clip_folder, tiny_dino_folder, tiny_flux_folder, tiny_open_clip_folder,  # noqa: E402
                             tiny_sd3_folder)

import pec.evaluate  # noqa: E402
from pec.config import overrides_from_args  # noqa: E402
from pec.evaluate import PAPER_DIVERSITY, PAPER_QUALITY, build_parser, main, sampling_calls  # noqa: E402
from pec.train import main as train_main  # noqa: E402

PROMPTS = ["a photo of a cat", "a red car", "a blue dog", "a dog", "a cat", "a car", "a red cat", "a blue car",
           "a photo of a dog", "a red dog", "a blue cat", "a photo of a car", "a cat and a dog", "a red photo",
           "a blue photo", "a car and a cat", "a dog and a car", "a photo", "a red blue car", "a blue red dog"]
MODEL = ["--model.name", "flux", "--model.resolution", "32", "--model.dtype", "float32",
         "--model.max_sequence_length", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real_eval")
    prompts = tmp / "prompts.txt"  # 20 prompts: the 90/10 split holds out 2
    prompts.write_text("\n".join(PROMPTS))
    world = {"flux": tiny_flux_folder(tmp), "clip": tiny_open_clip_folder(tmp), "dino": tiny_dino_folder(tmp),
             "pickscore": tiny_clip_folder(tmp), "prompts": prompts, "run": tmp / "runs" / "pec-flux"}
    train_main([*MODEL, "--model.path", str(world["flux"]), "--reward", "jpeg:1.0,clipscore:0.5",
                "--paths.clip", str(world["clip"]), "--paths.dino", str(world["dino"]), "--perceptual.spaces", "dino",
                "--perceptual.space", "dino", "--perceptual.k", "1", "--method", "pec", "--data.prompts", str(prompts),
                "--sampling.prompts_per_step", "2", "--sampling.group_size", "2", "--sampling.num_steps", "2",
                "--train.steps", "1", "--train.micro_batch", "4", "--logging.progress", "false",
                "--logging.tensorboard", "false", "--logging.grid_samples", "2", "--run-dir", str(world["run"])])
    return world


def _minmax_overall(raw, quality, diversity):
    """The paper's Overall (notes/paper.md 6.2), computed here from the raw numbers."""
    norm = {row: {} for row in raw}
    for c in [*quality, *diversity]:
        lo, hi = min(r[c] for r in raw.values()), max(r[c] for r in raw.values())
        for row in raw:
            norm[row][c] = (raw[row][c] - lo) / (hi - lo) if hi > lo else 0.0
    return {row: (sum(n[c] for c in quality) / len(quality) + sum(n[c] for c in diversity) / len(diversity)) / 2
            for row, n in norm.items()}


def test_real_model_table_has_the_configured_columns_and_the_minmax_overall(world, tmp_path, capsys):
    out = tmp_path / "eval"
    main([str(world["run"]), "pretrained", "--out", str(out), "--eval.images_per_prompt", "3", "--eval.batch", "2",
          "--eval.num_steps", "2", "--eval.rewards", "pickscore", "jpeg", "--paths.pickscore", str(world["pickscore"])])
    assert "Overall" in capsys.readouterr().out
    columns = json.loads((out / "columns.json").read_text())
    # The run's --reward terms, then --eval.rewards (jpeg once); the run's space dino, then every space whose
    # --paths.* weights are set (clip from the run's config.yaml, pickscore from the command line).
    assert columns["quality"] == ["jpeg", "clipscore", "pickscore"]
    assert columns["diversity"] == ["dist/dino", "dist/clip", "vendi/dino", "vendi/clip", "vendi/pickscore"]
    paper = columns["paper"]
    assert paper["quality"]["present"] == {"PickScore": "pickscore", "CLIP": "clipscore"}
    assert set(paper["quality"]["missing"]) == set(PAPER_QUALITY) - {"PickScore", "CLIP"}
    assert "--eval.rewards aesthetic" in paper["quality"]["missing"]["Aesthetic"]
    assert set(paper["diversity"]["present"]) == set(PAPER_DIVERSITY) - {"VS_IR"}
    assert set(paper["diversity"]["missing"]) == {"VS_IR"}
    assert paper["extra"] == {"jpeg": "not a paper column"}
    table_md = (out / "table.md").read_text()
    for name in [*paper["quality"]["missing"], "VS_IR"]:
        assert f" {name}: " in table_md  # every missing paper column is listed, with its reason

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"pec-flux", "pretrained"}
    for row in metrics.values():
        for space in ("dino", "clip", "pickscore"):
            assert 1.0 <= row[f"vendi/{space}"] <= 3.0 + 1e-6 and row[f"dist/{space}"] > 0
    # One trained step moved the LoRA weights, so the trained row is sampled from another model.
    assert any(metrics["pec-flux"][c] != metrics["pretrained"][c] for c in columns["diversity"])
    with open(out / "table.csv") as fh:
        rows = {r["run"]: r for r in csv.DictReader(fh)}
    overall = _minmax_overall(metrics, columns["quality"], columns["diversity"])
    for name, row in rows.items():
        assert float(row["overall"]) == pytest.approx(overall[name])
        assert float(row["overall"]) == pytest.approx((float(row["quality_avg"]) + float(row["diversity_avg"])) / 2)
    for name in ("table.png", "samples_pec-flux.png", "samples_pretrained.png"):
        assert (out / name).exists()

    # The pretrained row alone: the same held-out prompts and noise give the same numbers.
    alone = tmp_path / "alone"
    main(["pretrained", *MODEL, "--model.path", str(world["flux"]), "--out", str(alone), "--data.prompts",
          str(world["prompts"]), "--eval.images_per_prompt", "3", "--eval.batch", "2", "--eval.num_steps", "2",
          "--sampling.num_steps", "2", "--eval.rewards", "jpeg", "--eval.spaces", "dino",
          "--paths.dino", str(world["dino"])])
    solo = json.loads((alone / "metrics.json").read_text())["pretrained"]
    assert solo == pytest.approx({k: metrics["pretrained"][k] for k in ("jpeg", "dist/dino", "vendi/dino")})
    assert json.loads((alone / "columns.json").read_text())["paper"]["quality"]["present"] == {}


def test_sd3_pretrained_with_cfg_on_the_first_digit_prompts(world, tmp_path):
    out = tmp_path / "sd3"
    main(["pretrained", "--model.name", "sd3", "--model.path", str(tiny_sd3_folder(tmp_path)), "--model.resolution",
          "16", "--model.dtype", "float32", "--model.max_sequence_length", "8", "--device", "cpu",
          "--sampling.guidance_scale", "2", "--sampling.num_steps", "2", "--eval.images_per_prompt", "2",
          "--eval.max_prompts", "2", "--eval.rewards", "jpeg", "--paths.clip", str(world["clip"]), "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())["pretrained"]
    assert set(metrics) == {"jpeg", "dist/clip", "vendi/clip"} and 1.0 <= metrics["vendi/clip"] <= 2.0 + 1e-6
    assert "Prompts: 2 from the embedded world's digit prompts" in (out / "table.md").read_text()


@pytest.mark.parametrize("extra,message", [
    (["--eval.rewards", "jpeg", "--eval.spaces", "dino"], "--paths.dino is empty"),
    (["--eval.rewards", "jpeg"], "no perceptual space for the diversity columns"),
    (["--eval.rewards", "pickscor"], "--eval.rewards: unknown reward 'pickscor'"),
    (["--reward", "digit"], "'digit' scores the embedded world's 8x8 digits"),
    ([], "no reward to score: give --eval.rewards"),
    (["--eval.rewards", "jpeg", "--eval.spaces", "simclr"], "--eval.spaces: 'simclr' is not a perceptual space"),
])
def test_bad_real_options_fail_before_any_model_loads(world, tmp_path, monkeypatch, extra, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model or scorer was loaded before the options were checked")

    monkeypatch.setattr(pec.evaluate, "load_policy", no_loading)
    monkeypatch.setattr(pec.evaluate, "RealEvaluator", no_loading)
    with pytest.raises(SystemExit, match=message):
        main(["pretrained", *MODEL, "--model.path", str(world["flux"]), "--out", str(tmp_path / "e"), *extra])
    assert not list((tmp_path / "e").glob("*"))


def test_sampling_calls_cover_every_image_once_on_fixed_seeds():
    for prompts, per_prompt, batch in [(10, 6, 30), (3, 3, 2), (2, 5, 2), (5, 4, 4)]:
        calls = sampling_calls(prompts, per_prompt, batch)
        counts = [0] * prompts
        for start, stop, group, _ in calls:
            assert 1 <= (stop - start) * group <= max(batch, group) and group <= batch
            for p in range(start, stop):
                counts[p] += group
        assert counts == [per_prompt] * prompts
        assert len({seed for *_, seed in calls}) == len(calls)
    # Groups that fit keep the embedded world's calls: as many prompts as fit, seed offset = first prompt.
    assert sampling_calls(10, 6, 30) == [(0, 5, 6, 0), (5, 10, 6, 5)]


def test_readme_evaluate_command_parses():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    command = re.search(r"python -m pec\.evaluate (runs/flux[^`]*?)\n```", readme).group(1)
    args = build_parser().parse_args(shlex.split(command.replace("\\\n", " ")))
    overrides = overrides_from_args(args)
    assert args.runs[-1] == "pretrained" and len(args.runs) == 5
    assert overrides["eval"]["rewards"] == ["pickscore", "clipscore", "hpsv2", "aesthetic_v25"]
