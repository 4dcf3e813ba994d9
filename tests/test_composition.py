"""The algorithm x regulariser table: every pair `pec.train` accepts runs a step, every pair it refuses is
refused through the real entry point (exit 2, one line, before any model loads), and the README shows the
table as `python -m pec.algorithms` prints it."""
from pathlib import Path

import pytest

from pec.algorithms import ALGORITHMS, composition_markdown, composition_table
from pec.methods import VARIANTS
from pec.train import main
from pec.trainer import Trainer

from _tiny_runs import tiny_config

README = Path(__file__).resolve().parents[1] / "README.md"
TABLE = composition_table()
# What an algorithm needs beyond the tiny run's defaults to take a step (its windows must fit 2 sampling steps).
ALGORITHM_OPTIONS: dict[str, dict] = {
    "mixgrpo": {"mixgrpo": {"window_size": 1, "limit": 2}},
    "flow_grpo_fast": {"flow_grpo_fast": {"window_size": 1}},
}
CELLS = [(a, v) for a in ALGORITHMS.names() for v in VARIANTS]


def _argv(options: dict, prefix: str = "") -> list[str]:
    """Command-line flags of nested config options."""
    out: list[str] = []
    for key, value in options.items():
        if isinstance(value, dict):
            out += _argv(value, f"{prefix}{key}.")
        else:
            out += [f"--{prefix}{key}", str(value)]
    return out


def _merge(*dicts: dict) -> dict:
    out: dict = {}
    for d in dicts:
        for key, value in d.items():
            out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.mark.parametrize("algorithm, variant", [c for c in CELLS if TABLE[c[0]][c[1]] is None])
def test_a_supported_pair_trains_a_step(world, tmp_path, algorithm, variant):
    options = _merge(ALGORITHM_OPTIONS.get(algorithm, {}), VARIANTS[variant], {"algorithm": algorithm})
    cfg = tiny_config(world, tmp_path / "run", **options)
    rows = Trainer(cfg).run()
    assert len(rows) == 1 and rows[0]["skipped_updates"] == 0
    if "ratio" in ALGORITHMS.get(algorithm).provides:  # the first update is on-policy: its ratio is exactly 1
        assert rows[0]["first_update_ratio_dev"] == 0.0


@pytest.mark.parametrize("algorithm, variant", [c for c in CELLS if TABLE[c[0]][c[1]] is not None])
def test_a_refused_pair_is_one_line_and_exit_2(tmp_path, capsys, algorithm, variant):
    options = _merge(ALGORITHM_OPTIONS.get(algorithm, {}), VARIANTS[variant], {"algorithm": algorithm})
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main([*_argv(options), "--run-dir", str(run), "--device", "cpu"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and TABLE[algorithm][variant] in err
    assert not run.exists()


def test_the_readme_shows_the_table():
    assert composition_markdown() in README.read_text()
