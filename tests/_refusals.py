"""A refusal of `python -m pec.train` as the bad-input tests check it."""
from pathlib import Path

import pytest

from pec.train import main as train_main


def refused_by_train(argv: list[str], tmp_path: Path, capsys) -> str:
    """Run pec.train's main(argv) on the CPU into tmp_path/run; assert it refuses (exit 2) in one line, no
    traceback, before the run folder exists; return that line."""
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        train_main([*argv, "--device", "cpu", "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not run_dir.exists()
    return err.strip()
