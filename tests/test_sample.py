"""`python -m pec.sample` on the embedded default, and `python -m pec.export` of embedded runs in the package's own
formats: a tiny LoRA run (the default tuning), its LoRA and merged exports, a LoRA run trained with 2 processes
(torchrun, as tests/test_distributed.py makes them) and one of its milestones. Real models' exports:
tests/test_export.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from pec.checkpoint import checkpoint_at
from pec.config import to_dict
from pec.evaluate import main as evaluate_main
from pec.export import LORA_WEIGHTS, main as export_main
from pec.models.embedded import EmbeddedFlowModel
from pec.sample import main as sample_main
from pec.trainer import Trainer

from _dist_worker import dist_config
from _tiny_runs import tiny_config

PROMPTS = ["a handwritten 7", "a handwritten 1"]
QUIET = ["--logging.progress", "false"]


@pytest.fixture(scope="module")
def tiny_run(world, tmp_path_factory):
    """One LoRA step at a high learning rate, so that the adapters change the samples."""
    run = tmp_path_factory.mktemp("runs") / "lora-run"
    Trainer(tiny_config(world, run, train={"lr": 0.05})).run()
    return run


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)).astype(int) for p in sorted(folder.glob("p*-k*.png"))}


def _difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> int:
    """The largest pixel difference between two `pec.sample` folders' samples (same files required)."""
    assert list(a) == list(b) and a
    return max(int(np.abs(a[k] - b[k]).max()) for k in a)


def _sample(source, out: Path, *extra: str) -> dict:
    sample_main([str(source), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--n", "3", "--eval.batch", "2",
                 "--out", str(out), *QUIET, *extra])
    return json.loads((out / "samples.json").read_text())


def test_sample_writes_images_grid_seeds_and_scores(tiny_run, tmp_path, capsys):
    record = _sample(tiny_run, tmp_path / "out", "--reward", "digit:1.0,contrast:0.5", "--seed", "3")
    assert "wrote 6 samples of 2 prompt(s)" in capsys.readouterr().out
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["grid.png", *[f"p00{p}-k00{k}.png" for p in range(2) for k in range(3)], "samples.json"]
    assert np.asarray(Image.open(tmp_path / "out" / "p000-k000.png")).shape == (8, 8)  # the model's own size
    assert record["prompts"] == PROMPTS and record["eta"] == 0.0 and record["seed"] == 3
    images = record["images"]
    # 3 images a prompt in calls of at most 2 (--eval.batch): seed 3 gives rows 0, 1, seed 4 row 0.
    assert [(i["prompt"], i["sample"], i["seed"], i["index"]) for i in images] == [
        (p, k, 3 + k // 2, k % 2) for p in PROMPTS for k in range(3)]
    for image in images:
        assert image["reward"] == pytest.approx(image["reward/digit"] + 0.5 * image["reward/contrast"], abs=1e-6)
    assert record["reward_mean"] == pytest.approx(sum(i["reward"] for i in images) / 6)
    # The same command gives the same images; another seed others.
    again = _sample(tiny_run, tmp_path / "again", "--seed", "3")
    assert _difference(_pixels(tmp_path / "again"), _pixels(tmp_path / "out")) == 0
    assert "reward" not in again["images"][0]
    _sample(tiny_run, tmp_path / "other", "--seed", "4")
    assert _difference(_pixels(tmp_path / "other"), _pixels(tmp_path / "out")) > 0


def test_embedded_exports_sample_what_the_run_samples(tiny_run, tmp_path):
    """The LoRA export (diffusers' SD3 LoRA names: the embedded transformer is an SD3Transformer2DModel) on the
    base the manifest names, and the merged one in EmbeddedFlowModel's own folder format, sample the run's images
    (the LoRA exactly, the merged within one 8-bit step); the base model samples others. Their model cards hold
    the evaluation table that `pec.evaluate` wrote beside the run, with the run's row named."""
    evaluate_main([str(tiny_run), "--out", str(tiny_run.parent / "evals"), "--eval.images_per_prompt", "6",
                   "--eval.batch", "30"])
    export_main([str(tiny_run), "--out", str(tmp_path / "lora")])
    export_main([str(tiny_run), "--out", str(tmp_path / "merged"), "--merge"])
    manifest = json.loads((tmp_path / "lora" / "export.json").read_text())
    assert manifest["kind"] == "lora" and manifest["pipeline"] is None and manifest["step"] == 1
    assert all(k.startswith("transformer.") and ".lora_" in k for k in load_file(tmp_path / "lora" / LORA_WEIGHTS))
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "merged").iterdir()}
    merged = EmbeddedFlowModel.from_pretrained(tmp_path / "merged")  # what --model.path DIR loads
    assert not any("lora" in name for name, _ in merged.named_parameters())
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "no diffusers pipeline" in card and "pec.sample" in card and "pec.lambda" in card
    assert "## Evaluation" in card and "this export's row is `lora-run`" in card and "| lora-run |" in card
    _sample(tiny_run, tmp_path / "run")
    _sample(tmp_path / "lora", tmp_path / "from-lora")
    _sample(tmp_path / "merged", tmp_path / "from-merged")
    ours = _pixels(tmp_path / "run")
    assert _difference(_pixels(tmp_path / "from-lora"), ours) == 0
    assert _difference(_pixels(tmp_path / "from-merged"), ours) <= 1
    # The adapters did change the model: the merged weights are not the base's.
    base = EmbeddedFlowModel.from_pretrained(manifest["model"]["path"]).state_dict()
    assert max((t - base[k]).abs().max() for k, t in merged.state_dict().items()) > 1e-2


def _torchrun(*args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_exports_of_a_two_process_run_and_of_a_milestone(world, tmp_path):
    """A LoRA run on 2 processes, 2 steps, a milestone every step and one kept checkpoint: step 1 survives only
    as a milestone. RUN@1 and RUN export the LoRA of their checkpoint, tensor for tensor, and sample what the run
    samples at that step."""
    run = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(to_dict(dist_config(
        world, run, "contiguous", 2, train={"lr": 0.05}, logging={"milestone_every": 1, "keep_checkpoints": 1}))))
    _torchrun("-m", "pec.train", "--config", str(config))
    assert yaml.safe_load((run / "config.yaml").read_text())["dist"]["processes"] == 2
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002.pt"]
    for step in (1, 2):
        source = f"{run}@1" if step == 1 else str(run)
        out = tmp_path / f"export-{step}"
        export_main([source, "--out", str(out)])
        manifest = json.loads((out / "export.json").read_text())
        assert manifest["step"] == step
        assert Path(manifest["checkpoint"]).parent.name == ("milestones" if step == 1 else "checkpoints")
        trained = checkpoint_at(run, step)["model"]
        exported = load_file(out / LORA_WEIGHTS)
        # peft's names in the policy (adapter "default") are diffusers' names in the file.
        assert {k.replace(".default.", "."): v for k, v in trained.items()}.keys() == exported.keys()
        for name, tensor in trained.items():
            assert torch.equal(tensor, exported[name.replace(".default.", ".")]), name
        _sample(source, tmp_path / f"run-{step}")
        _sample(out, tmp_path / f"from-export-{step}")
        assert _difference(_pixels(tmp_path / f"run-{step}"), _pixels(tmp_path / f"from-export-{step}")) == 0
    assert _difference(_pixels(tmp_path / "run-1"), _pixels(tmp_path / "run-2")) > 0


def test_full_fine_tuning_export_is_the_packages_model_folder(world, tmp_path, capsys):
    """An embedded full-fine-tuning run exports, with or without --merge, EmbeddedFlowModel's folder of the trained
    transformer; `pec.sample` on it samples the run's images (the same weights, bit for bit), with its bar."""
    run = tmp_path / "full"
    Trainer(tiny_config(world, run, train={"lora": False, "lr": 0.01})).run()
    export_main([str(run), "--out", str(tmp_path / "export")])
    manifest = json.loads((tmp_path / "export" / "export.json").read_text())
    assert (manifest["kind"], manifest["training"], manifest["merged"], manifest["lora_files"]) == (
        "model", "full", False, {})
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "export").iterdir()}
    assert "full fine-tuning" in (tmp_path / "export" / "README.md").read_text()
    trained = EmbeddedFlowModel.from_pretrained(tmp_path / "export").state_dict()
    base = EmbeddedFlowModel.from_pretrained(manifest["model"]["path"]).state_dict()
    assert max((t - base[k]).abs().max() for k, t in trained.items()) > 1e-3
    _sample(run, tmp_path / "run")
    capsys.readouterr()
    sample_main([str(tmp_path / "export"), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--n", "3",
                 "--eval.batch", "2", "--out", str(tmp_path / "from-export")])
    assert "pec.sample: 100%" in capsys.readouterr().err  # the progress bar, on unless --logging.progress false
    assert _difference(_pixels(tmp_path / "from-export"), _pixels(tmp_path / "run")) == 0


def test_eval_guidance_samples_a_guided_run_with_its_guidance(world, tmp_path):
    """`--eval.guidance true` (the evaluator's option) turns a PCGS guided run's guidance on: other images than the
    policy alone, recorded in samples.json, and the same from the run's export as from the run."""
    run = tmp_path / "guided"
    Trainer(tiny_config(world, run, method="pcgs", pcgs={"form": "guided"})).run()
    export_main([str(run), "--out", str(tmp_path / "export")])
    # Calls of 3 images a prompt: the guidance compares them with each other (a lone image: nothing to compare).
    alone = _sample(run, tmp_path / "alone", "--eval.batch", "3")
    guided = _sample(run, tmp_path / "guided-run", "--eval.guidance", "true", "--eval.batch", "3")
    _sample(tmp_path / "export", tmp_path / "guided-export", "--eval.guidance", "true", "--eval.batch", "3")
    assert (alone["guidance"], guided["guidance"]) == (False, True)
    assert _difference(_pixels(tmp_path / "alone"), _pixels(tmp_path / "guided-run")) > 0
    assert _difference(_pixels(tmp_path / "guided-export"), _pixels(tmp_path / "guided-run")) == 0
