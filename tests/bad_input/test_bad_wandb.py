"""`--logging.wandb` refused at start-up with one line (exit 2, no traceback, before any model loads): without the
wandb package (the optional extra), and with a W&B mode that does not exist."""
import sys

import pytest

from pec.train import main


def refused(world, run_dir, *extra):
    """pec.train's one-line refusal of a tiny run with `extra` options."""
    with pytest.raises(SystemExit) as info:
        main(["--device", "cpu", "--assets", str(world), "--model.path", str(world / "embedded"),
              "--run-dir", str(run_dir), "--logging.progress", "false", *extra])
    assert info.value.code == 2
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_missing_wandb_package_is_one_line(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, as when not installed
    message = refused(world, tmp_path / "run", "--logging.wandb", "my-project")
    assert "--logging.wandb my-project" in message and 'pip install -e ".[wandb]"' in message
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before the run folder (and any model)


def test_an_unknown_wandb_mode_is_one_line(world, tmp_path):
    message = refused(world, tmp_path / "run", "--logging.wandb", "p", "--logging.wandb_mode", "cloud")
    assert "logging.wandb_mode" in message and "offline" in message
