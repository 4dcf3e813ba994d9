"""`python -m pec.evaluate` on a tiny trained run and the pretrained model."""
import csv
import json

import pytest

from pec.config import Config, apply_dict
from pec.evaluate import evaluate, main
from pec.experiments.tiny_world import write_tiny_world
from pec.trainer import Trainer

from _tiny_runs import tiny_config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    world = write_tiny_world(tmp_path_factory.mktemp("tiny_world"))
    run = tmp_path_factory.mktemp("runs") / "pec-run"
    Trainer(tiny_config(world, run, method="pec", train={"steps": 2}, logging={"milestone_every": 1})).run()
    return run


def test_evaluate_writes_the_table(tiny_run, tmp_path, capsys):
    out = tmp_path / "eval"
    main([str(tiny_run), "pretrained", "--out", str(out), "--eval.images_per_prompt", "6", "--eval.batch", "30"])
    assert "Overall" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"pec-run", "pretrained"}
    expected = {"digit", "contrast", "precision", "recall", "coverage", "dist/simclr", "vendi/classifier"}
    assert expected <= set(metrics["pec-run"])
    for row in metrics.values():
        assert 1.0 <= row["vendi/simclr"] <= 6.0 and 0.0 <= row["precision"] <= 1.0
    with open(out / "table.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["run"] for r in rows] == ["pec-run", "pretrained"]
    for r in rows:
        assert 0.0 <= float(r["overall"]) <= 1.0
        assert float(r["overall"]) == pytest.approx((float(r["quality_avg"]) + float(r["diversity_avg"])) / 2)
    for name in ("table.md", "table.png", "samples_pec-run.png", "samples_pretrained.png"):
        assert (out / name).exists()


def test_evaluate_rejects_bad_input(tiny_run, tmp_path):
    with pytest.raises(SystemExit, match="not a run folder"):
        main([str(tmp_path / "missing"), "--out", str(tmp_path / "e")])
    with pytest.raises(SystemExit, match="cannot read config file"):
        main([str(tiny_run), "--config", str(tmp_path / "missing.yaml")])
    no_checkpoint = tmp_path / "fresh"
    no_checkpoint.mkdir()
    (no_checkpoint / "config.yaml").write_text((tiny_run / "config.yaml").read_text())
    with pytest.raises(SystemExit, match="no valid checkpoint"):
        main([str(no_checkpoint), "--out", str(tmp_path / "e"), "--eval.images_per_prompt", "6"])
    with pytest.raises(SystemExit, match="images_per_prompt must be > 5"):
        main([str(tiny_run), "--out", str(tmp_path / "e"), "--eval.images_per_prompt", "4"])


def test_evaluate_a_run_at_its_milestones(tiny_run, tmp_path):
    out = tmp_path / "eval"
    metrics, _ = evaluate([f"{tiny_run}@1", f"{tiny_run}@2", str(tiny_run)], out,
                          {"eval": {"images_per_prompt": 6, "batch": 30}})
    assert set(metrics) == {"pec-run@1", "pec-run@2", "pec-run"}
    assert metrics["pec-run@2"] == metrics["pec-run"]  # the newest checkpoint is step 2's
    assert metrics["pec-run@1"] != metrics["pec-run@2"]
    with pytest.raises(ValueError, match=r"no checkpoint of step 7; it holds steps \[1, 2\]"):
        evaluate([f"{tiny_run}@7"], tmp_path / "e2", {"eval": {"images_per_prompt": 6}})


def test_guided_run_evaluated_with_its_guidance_is_more_diverse(tmp_path):
    """`--eval.guidance true` on a PCGS guided run of the shipped world: on the same held-out seeds, the
    within-prompt diversity rises in the guided space and in the evaluation-only space no run trains
    against, and the reward falls a little (the guidance sweep's trade-off, now through pec.evaluate)."""
    run = tmp_path / "guided"
    cfg = Config()
    apply_dict(cfg, {"device": "cpu", "run_dir": str(run), "method": "pcgs", "pcgs": {"form": "guided"},
                     "train": {"steps": 1}, "logging": {"tensorboard": False, "progress": False}})
    Trainer(cfg).run()
    options = {"eval": {"images_per_prompt": 8, "batch": 80}}
    policy, _ = evaluate([str(run)], tmp_path / "policy", options)
    guided, _ = evaluate([str(run)], tmp_path / "guided_eval", {"eval": {**options["eval"], "guidance": True}})
    alone, with_guidance = policy["guided"], guided["guided"]
    assert with_guidance["dist/simclr"] > 1.05 * alone["dist/simclr"]
    assert with_guidance["dist/simclr_eval"] > 1.03 * alone["dist/simclr_eval"]
    assert with_guidance["digit"] < alone["digit"]
    with pytest.raises(ValueError, match="eval.guidance needs a PCGS guided run"):
        evaluate(["pretrained"], tmp_path / "bad", {"eval": {"images_per_prompt": 6, "guidance": True}})
