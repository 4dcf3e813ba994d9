"""The paper-table experiment: its claims on synthetic evaluations (paired verdicts over seeds, frontier
comparisons, the table over the judged columns), and a tiny end-to-end run of the whole command."""
import json
import subprocess
import sys

import pytest

from pec.evaluate import PRETRAINED
from pec.experiments import paper_report as report
from pec.experiments.paper_table import main
from pec.experiments.rows import ALIASES, COMMON, MODES, ROWS, Mode, guided, milestone_steps
from pec.experiments.tiny_world import write_tiny_world

SEEDS = (0, 1, 2)
COLUMNS = (*report.QUALITY, *report.DIVERSITY, *(f"{f}/{report.REGULARISED_SPACE}" for f in ("dist", "precision", "recall")))


def _metrics(reward, diversity, seed=0):
    """One evaluation: every column, the rewards and the judged diversities as given (seed noise added)."""
    m = {c: 0.5 for c in COLUMNS}
    m.update({"digit": reward, "gold": reward - 0.01, "contrast": 0.6})
    for space in report.JUDGE_SPACES:
        m[f"dist/{space}"] = diversity + 0.01 * seed
    return m


def _points(diversity_of, steps=(20, 40, 60, 80, 100)):
    """seed -> row -> step -> metrics, the reward rising from 0.6 to 0.95 in every row and the diversity
    `diversity_of(row, fraction of the run)`."""
    rows = ["grpo", "grpo_kl", "pec_lambda0.5", "pcgs_policy"]
    points = {}
    for seed in SEEDS:
        runs = {row: {s: _metrics(0.6 + 0.35 * s / steps[-1], diversity_of(row, s / steps[-1]), seed) for s in steps}
                for row in rows}
        runs["entropy_bonus"] = runs["grpo"]
        points[seed] = runs
    return _metrics(0.6, 10.0), points


def test_claim_two_holds_when_pec_keeps_diversity_at_equal_reward():
    pretrained, points = _points(lambda row, f: 10.0 - (1.0 if row.startswith(("pec", "pcgs")) else 4.0) * f)
    verdicts, lines = report.claim_two(pretrained, points)
    assert verdicts == {"pec_lambda0.5": True, "pcgs_policy": True}
    assert "holds (+" in "\n".join(lines)


def test_claim_two_does_not_hold_when_pec_collapses_like_grpo():
    pretrained, points = _points(lambda row, f: 10.0 - 4.0 * f)
    verdicts, lines = report.claim_two(pretrained, points)
    assert verdicts == {"pec_lambda0.5": False, "pcgs_policy": False}
    assert "does not hold" in "\n".join(lines)  # identical curves: a tie is not "more diversity"


def test_claim_three_judged_per_seed_in_the_full_table_and_the_paper_rows():
    pretrained, points = _points(lambda row, f: 10.0 - (1.0 if row.startswith("pec") else 4.0) * f)
    tables = report.final_tables(pretrained, points, 100)
    verdicts, lines = report.claim_three(tables)
    assert verdicts == {"pec_lambda0.5": True}
    assert "full table holds" in lines[0] and "paper's rows (6) holds" in lines[0]


def test_one_seed_is_always_undecided():
    pretrained, points = _points(lambda row, f: 10.0 - (1.0 if row.startswith("pec") else 4.0) * f)
    verdicts, lines = report.claim_two(pretrained, {0: points[0]})
    assert not any(verdicts.values()) and "undecided" in "\n".join(lines)


def test_rows_and_modes():
    assert ROWS["grpo_kl"][-2:] == ["--train.kl_units", "flow_grpo"]
    assert [r for r in ROWS if guided(r)] == ["pcgs_guided_w0.05", "pcgs_guided_w0.1"]
    assert ALIASES == {"entropy_bonus": "grpo"} and "entropy_bonus" not in ROWS  # GRPO by construction
    assert MODES["full"].seeds == (0, 1, 2) and MODES["full"].steps == 250 and MODES["quick"].budget_min == 45
    assert milestone_steps(250) == [50, 100, 150, 200, 250]
    assert milestone_steps(2) == [1, 2] and milestone_steps(7) == [1, 2, 3, 4, 5, 6, 7]


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    return write_tiny_world(tmp_path_factory.mktemp("tiny_world"))


def test_end_to_end_tiny(tmp_path, tiny_world):
    """The whole command at 2 steps on a tiny random world: every output written, the guided row read twice,
    the alias row present, one seed's verdicts undecided."""
    out = tmp_path / "table"
    world = ["--model.path", str(tiny_world / "embedded"), "--assets", str(tiny_world), "--sampling.num_steps", "2"]
    # An interrupted GRPO run (1 of 2 steps, checkpointed): the command resumes it.
    subprocess.run([sys.executable, "-m", "pec.train", "--run-dir", str(out / "seed0" / "grpo"), "--seed", "0",
                    "--logging.progress", "false", "--train.steps", "2", "--train.stop_after", "1",
                    "--logging.milestone_every", "1", *COMMON, *ROWS["grpo"], *world], check=True)
    main(["--out", str(out), "--steps", "2", "--seeds", "0", "--rows", "pcgs_guided_w0.05",
          "--eval.images_per_prompt", "6", "--", *world])
    assert "resuming from" in (out / "seed0" / "grpo" / "train.log").read_text()
    for name in ("table.md", "table_seed0.md", "claims.md", "frontier.png", "grids.png", "timing.json"):
        assert (out / name).stat().st_size > 0, name
    table = (out / "table.md").read_text()
    for row in (PRETRAINED, "grpo", "pcgs_guided_w0.05", "pcgs_guided_w0.05+guidance", "entropy_bonus"):
        assert f"| {row} |" in table
    claims = (out / "claims.md").read_text()
    assert "1 seed, 2 steps" in claims and "undecided" in claims and "Wall time" in claims
    evals = json.loads((out / "seed0" / "pcgs_guided_w0.05" / "eval_guided" / "metrics.json").read_text())
    assert sorted(evals) == ["pcgs_guided_w0.05@1", "pcgs_guided_w0.05@2"]
    timing = json.loads((out / "timing.json").read_text())
    assert timing["wall_min"] > 0 and len(timing["seconds_per_job"]) == 6  # pretrained, 2 runs, 3 evaluations
    # A second invocation reuses every finished job.
    main(["--out", str(out), "--steps", "2", "--seeds", "0", "--rows", "pcgs_guided_w0.05",
          "--eval.images_per_prompt", "6"])
    assert json.loads((out / "timing.json").read_text())["seconds_per_job"] == {}


def test_bad_options(tmp_path):
    with pytest.raises(SystemExit, match="--steps must be >= 2"):
        main(["--out", str(tmp_path), "--steps", "1"])
    with pytest.raises(SystemExit, match="--seeds must be distinct"):
        main(["--out", str(tmp_path), "--seeds", "0", "0"])
    assert isinstance(MODES["quick"], Mode)
