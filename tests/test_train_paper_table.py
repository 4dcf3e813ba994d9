"""The paper-table experiment: its claims on synthetic evaluations (paired verdicts over seeds, frontier
comparisons, the table over the judged columns), and a tiny end-to-end run of the whole command."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pec.evaluate import PRETRAINED
from pec.experiments import paper_report as report
from pec.experiments.paper_table import main
from pec.experiments.rows import (
    ALIASES,
    COMMON,
    DIVERSE_GRPO_CHOICE,
    MODES,
    ROWS,
    SWEEP,
    Mode,
    guided,
    milestone_steps,
)

SEEDS = (0, 1, 2)
COLUMNS = (*report.QUALITY, *report.DIVERSITY, *(f"{f}/{report.REGULARISED_SPACE}" for f in ("dist", "precision", "recall")))


def _metrics(reward, diversity, seed=0):
    """One evaluation: every column, the rewards and the judged diversities as given (seed noise added)."""
    m = {c: 0.5 for c in COLUMNS}
    m.update({"digit": reward, "gold": reward - 0.01, "contrast": 0.6})
    for space in report.JUDGE_SPACES:
        m[f"dist/{space}"] = diversity + 0.01 * seed
    return m


def _points(diversity_of, steps=(20, 40, 60, 80, 100), rows=("pec_lambda0.5", "pcgs_policy")):
    """seed -> row -> step -> metrics, the reward rising from 0.6 to 0.95 in every row and the diversity
    `diversity_of(row, fraction of the run)`; GRPO and GRPO + KL and `rows`."""
    rows = ["grpo", "grpo_kl", *rows]
    points = {}
    for seed in SEEDS:
        runs = {row: {s: _metrics(0.6 + 0.35 * s / steps[-1], diversity_of(row, s / steps[-1]), seed) for s in steps}
                for row in rows}
        runs["entropy_bonus"] = runs["grpo"]
        points[seed] = runs
    return _metrics(0.6, 10.0), points


def test_claim_two_holds_when_pec_keeps_diversity_at_equal_reward():
    pretrained, points = _points(lambda row, f: 10.0 - (1.0 if row.startswith(("pec", "pcgs")) else 4.0) * f)
    verdicts, lines = report.claim_two(pretrained, points, report.Ledger())
    assert verdicts == {"pec_lambda0.5": True, "pcgs_policy": True}
    assert "holds (+" in "\n".join(lines)


def test_claim_two_does_not_hold_when_pec_collapses_like_grpo():
    pretrained, points = _points(lambda row, f: 10.0 - 4.0 * f)
    verdicts, lines = report.claim_two(pretrained, points, report.Ledger())
    assert verdicts == {"pec_lambda0.5": False, "pcgs_policy": False}
    assert "does not hold" in "\n".join(lines)  # identical curves: a tie is not "more diversity"


def test_claim_three_judged_per_seed_in_the_full_table_and_the_paper_rows():
    pretrained, points = _points(lambda row, f: 10.0 - (1.0 if row.startswith("pec") else 4.0) * f)
    tables = report.final_tables(pretrained, points, 100)
    verdicts, lines = report.claim_three(tables, report.Ledger())
    assert verdicts == {"pec_lambda0.5": True}
    assert "full table holds" in lines[0] and "paper's rows (6) holds" in lines[0]


def test_one_seed_is_always_undecided():
    pretrained, points = _points(lambda row, f: 10.0 - (1.0 if row.startswith("pec") else 4.0) * f)
    verdicts, lines = report.claim_two(pretrained, {0: points[0]}, report.Ledger())
    assert not any(verdicts.values()) and "undecided" in "\n".join(lines)


def test_claims_four_and_five_and_the_fragile_list():
    """PEC against the field's methods (claim 4) and each algorithm with PEC against it alone (claim 5), read
    as claim 2; a PEC that keeps diversity holds, an algorithm pair that collapses alike does not."""
    rows = ("pec_lambda0.5", "gardo", "diverse_grpo", "nft", "nft_pec", "mixgrpo", "mixgrpo_pec")
    pretrained, points = _points(lambda row, f: 10.0 - (1.0 if row in ("pec_lambda0.5", "nft_pec") else 4.0) * f,
                                 rows=rows)
    ledger = report.Ledger()
    four, lines4 = report.claim_four(pretrained, points, ledger)
    five, lines5 = report.claim_five(pretrained, points, ledger)
    assert four == {"gardo": True, "diverse_grpo": True}
    assert five == {"nft": True, "mixgrpo": False}
    assert "| nft_pec | nft | holds (+" in "\n".join(lines5) and "top 3 levels" in lines5[0]
    # context rows: each method and each algorithm alone against GRPO (here they collapse alike: a tie)
    for lines, row in ((lines4, "gardo"), (lines4, "diverse_grpo"), (lines5, "nft"), (lines5, "mixgrpo")):
        assert f"| {row} | grpo | does not hold (" in "\n".join(lines)
    assert ledger.fragile_lines()[0].endswith(f"0 of {len(ledger.verdicts)}")


def test_a_fragile_hold_is_listed_and_not_counted_by_a_claim(monkeypatch):
    """A frontier verdict that holds with its lower bound within half an SE of 0 is shown as 'holds (..., fragile)',
    listed among the fragile verdicts, and the claim's headline does not count it as holding."""
    from pec.experiments.verdicts import verdict_from_differences

    fragile = verdict_from_differences({0: 0.221, 1: 1.0, 2: 1.779})  # mean 1, se 0.45: mean - 2 se = 0.1 < 0.225
    monkeypatch.setattr(report, "frontier_claim", lambda *args, **kwargs: fragile)
    pretrained, points = _points(lambda row, f: 10.0 - 4.0 * f, rows=("pec_lambda0.5", "gardo"))
    ledger = report.Ledger()
    four, lines = report.claim_four(pretrained, points, ledger)
    assert four == {"gardo": False}
    assert "| pec_lambda0.5 | gardo | holds (+1.000, 2se 0.900, fragile) |" in "\n".join(lines)
    closing = ledger.fragile_lines()
    n = len(ledger.verdicts)  # every verdict here is the fragile one
    assert closing[0].endswith(f"{n} of {n}") and "pec_lambda0.5 vs gardo" in closing[1] and len(closing) == n + 1


def test_rows_and_modes():
    assert ROWS["grpo_kl"][-2:] == ["--train.kl_units", "flow_grpo"]
    assert [r for r in ROWS if guided(r)] == ["pcgs_guided_w0.05", "pcgs_guided_w0.1"]
    assert ALIASES == {"entropy_bonus": "grpo"} and "entropy_bonus" not in ROWS  # GRPO by construction
    assert MODES["full"].seeds == (0, 1, 2) and MODES["full"].steps == 250 and MODES["full"].rows == tuple(ROWS)
    assert MODES["quick"].budget_min == 45 and MODES["full"].budget_min == 150
    assert set(MODES["quick"].rows) <= set(ROWS) and "grpo" in MODES["quick"].rows
    assert milestone_steps(250) == [50, 100, 150, 200, 250]
    assert milestone_steps(2) == [1, 2] and milestone_steps(7) == [1, 2, 3, 4, 5, 6, 7]


E2E_ROWS = ("pcgs_guided_w0.05", "gardo", "diverse_grpo", "nft_pec", "mixgrpo")


def test_end_to_end_tiny(tmp_path, world):
    """The whole command at 2 steps on a tiny random world: every output written, the guided row read twice,
    the alias row present, one seed's verdicts undecided; each finished run kept as a result file, which a
    later invocation, in another output folder as on another machine, reuses instead of training."""
    out, results = tmp_path / "table", tmp_path / "results"
    options = ["--model.path", str(world / "embedded"), "--assets", str(world), "--sampling.num_steps", "3",
               "--mixgrpo.window_size", "1"]  # MixGRPO needs 3 steps and a window inside them
    # An interrupted GRPO run (1 of 2 steps, checkpointed): the command resumes it.
    subprocess.run([sys.executable, "-m", "pec.train", "--run-dir", str(out / "seed0" / "grpo"), "--seed", "0",
                    "--logging.progress", "false", "--train.steps", "2", "--train.stop_after", "1",
                    "--logging.milestone_every", "1", *COMMON, *ROWS["grpo"], *options], check=True)
    args = ["--steps", "2", "--seeds", "0", "--rows", *E2E_ROWS, "--eval.images_per_prompt", "6",
            "--results", str(results)]
    main(["--out", str(out), *args, "--", *options])
    assert "resuming from" in (out / "seed0" / "grpo" / "train.log").read_text()
    for name in ("table.md", "table_seed0.md", "claims.md", "frontier.png", "grids.png", "timing.json"):
        assert (out / name).stat().st_size > 0, name
    table = (out / "table.md").read_text()
    for row in (PRETRAINED, "grpo", *E2E_ROWS, "pcgs_guided_w0.05+guidance", "entropy_bonus"):
        assert f"| {row} |" in table
    claims = (out / "claims.md").read_text()
    assert "1 seed, 2 steps" in claims and "undecided" in claims and "From scratch" in claims
    assert "| nft_pec | nft |" not in claims and "5. Under DiffusionNFT" in claims  # nft alone not run
    kept = json.loads((results / "seed0" / "pcgs_guided_w0.05.json").read_text())
    assert sorted(kept["evaluations"]) == ["eval", "eval_guided"] and sorted(kept["evaluations"]["eval"]) == ["1", "2"]
    assert kept["recipe"]["options"] == [*COMMON, *ROWS["pcgs_guided_w0.05"], *options]
    assert len(kept["training"]["reward_mean"]) == 2 and kept["seconds"]["train"] > 0
    assert (results / "seed0" / "grpo.png").exists() and (results / f"{PRETRAINED}.json").exists()
    timing = json.loads((out / "timing.json").read_text())
    assert timing["wall_min"] > 0 and timing["train_min"] > 0 and timing["from_scratch_min"] > 0
    # Another output folder with the kept results (another machine): nothing trains or evaluates again.
    other = tmp_path / "other"
    main(["--out", str(other), *args, "--", *options])
    assert not (other / "seed0").exists() and (other / "claims.md").read_text().splitlines()[:-1] == \
        claims.splitlines()[:-1]
    # A kept result made with other options is refused, naming the file.
    with pytest.raises(SystemExit, match="json was made with other options"):
        main(["--out", str(other), *args, "--", *options, "--train.lr", "1e-3"])


def test_bad_options(tmp_path):
    with pytest.raises(SystemExit, match="--steps must be >= 2"):
        main(["--out", str(tmp_path), "--steps", "1"])
    with pytest.raises(SystemExit, match="--seeds must be distinct"):
        main(["--out", str(tmp_path), "--seeds", "0", "0"])
    assert isinstance(MODES["quick"], Mode)


def test_diverse_grpo_row_is_the_sweeps_choice():
    """The diverse_grpo row of the table trains the setting the committed sweep chose (docs/paper_table/sweep)."""
    sweep = (Path(__file__).parents[1] / "docs" / "paper_table" / "sweep" / "sweep.md").read_text()
    chosen = sweep.split("Chosen: ", 1)[1].split(" ", 1)[0]
    assert chosen == DIVERSE_GRPO_CHOICE and ROWS["diverse_grpo"] == SWEEP[chosen]
