"""Bad input: train.timestep_fraction and settings that leave no step to train, through `pec.train`'s main.

Each is refused before any work with one line naming the option, and no traceback.
"""
import pytest

from pec.train import main


def _refusal(argv, capsys, tmp_path) -> str:
    """Run `pec.train` on `argv`; return its one-line error (from SystemExit or stderr)."""
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["--run-dir", str(run_dir), "--device", "cpu", *argv])
    assert exit_info.value.code == 2  # input refused before any work
    message = capsys.readouterr().err
    assert "Traceback" not in message and len(message.strip().splitlines()) == 1, message
    assert not run_dir.exists()
    return message


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5"])
def test_fraction_outside_zero_one(value, capsys, tmp_path):
    assert "train.timestep_fraction must be a fraction in (0, 1]" in _refusal(
        ["--train.timestep_fraction", value], capsys, tmp_path)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_fraction_not_finite(value, capsys, tmp_path):
    assert "train.timestep_fraction must be a finite number" in _refusal(
        ["--train.timestep_fraction", value], capsys, tmp_path)


def test_fraction_that_trains_no_step(capsys, tmp_path):
    message = _refusal(["--sampling.num_steps", "4", "--train.timestep_fraction", "0.2"], capsys, tmp_path)
    assert "train.timestep_fraction 0.2 trains int(4 x 0.2) = 0" in message


@pytest.mark.parametrize("argv", [
    ["--sampling.num_steps", "4", "--sampling.sde_window", "3", "4", "--train.timestep_fraction", "0.75"],
    ["--sampling.num_steps", "4", "--sampling.sde_window", "3", "4", "--sampling.kind", "cps"],
])
def test_window_fraction_and_zero_std_steps_that_share_no_step(argv, capsys, tmp_path):
    assert "no step would train" in _refusal(argv, capsys, tmp_path)
