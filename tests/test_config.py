"""Config: YAML + command-line overrides, generated --help, and start-up validation with actionable messages."""
import argparse
import shutil
from pathlib import Path

import pytest

from pec.checks import check_run
from pec.config import Config, add_config_arguments, parse_config, save_yaml, load_yaml, apply_dict, to_dict


def test_command_line_overrides_yaml_overrides_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: grpo\npec:\n  lambda: 0.3\nsampling:\n  group_size: 6\n")
    cfg = parse_config(["--config", str(path), "--pec.lambda", "0.2", "--train.lora", "false", "--resume",
                        "--run-dir", "r", "--sampling.sde_window", "1", "4"])
    assert cfg.method == "grpo" and cfg.pec.lambda_ == 0.2 and cfg.sampling.group_size == 6
    assert cfg.train.lora is False and cfg.resume is True and cfg.run_dir == "r"
    assert cfg.sampling.sde_window == [1, 4]
    assert parse_config(["--model", "sd3"]).model.name == "sd3"
    assert cfg.train.lr == Config().train.lr


def test_yaml_round_trip(tmp_path):
    cfg = parse_config(["--method", "pcgs", "--pcgs.form", "guided", "--perceptual.spaces", "a", "b",
                        "--perceptual.space", "b"])
    save_yaml(cfg, tmp_path / "config.yaml")
    again = Config()
    apply_dict(again, load_yaml(tmp_path / "config.yaml"))
    assert to_dict(again) == to_dict(cfg)


def test_help_documents_every_option():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    text = parser.format_help()
    for dotted in ("--method", "--pec.lambda", "--pcgs.form", "--train.kl_beta", "--sampling.sde_window",
                   "--perceptual.estimator", "--eval.images_per_prompt", "--model.name", "--device"):
        assert dotted in text
    assert "weight of the perceptual surprisal bonus" in text


@pytest.mark.parametrize("argv, match", [
    (["--method", "ppo"], "method must be one of"),
    (["--method", "pec", "--sampling.group_size", "1"], "group_size 2 or more"),
    (["--sampling.group_size", "4", "--perceptual.k", "4"], "lower --perceptual.k"),
    (["--sampling.kind", "ddim"], "sampling.kind"),
    (["--sampling.sde_window", "3", "2"], "sde_window"),
    (["--pec.lambda", "-1"], "pec.lambda must be >= 0"),
    (["--perceptual.space", "nope"], "perceptual.space"),
    (["--perceptual.spaces", "simclr", "simclr_eval", "--perceptual.space", "simclr_eval"], "evaluation-only space"),
    (["--resume"], "--resume needs --run-dir"),
])
def test_bad_configs_fail_with_a_message_saying_what_to_change(argv, match):
    with pytest.raises(ValueError, match=match):
        check_run(parse_config(argv))


def test_unknown_and_mistyped_options_are_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pec:\n  lamda: 0.3\n")
    with pytest.raises(ValueError, match="unknown config option 'pec.lamda'"):
        parse_config(["--config", str(path)])
    with pytest.raises(ValueError, match="sampling.group_size must be of type int"):
        parse_config(["--sampling.group_size", "2.5"])
    with pytest.raises(SystemExit):
        parse_config(["--pec.lamda", "0.1"])


def test_shipped_yaml_configs_load_and_validate():
    import pec

    configs = sorted((Path(pec.__file__).parent / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        cfg = parse_config(["--config", str(path), "--model.path", "somewhere"])
        if cfg.model.name == "embedded":  # real-model configs: validated on tiny folders in test_flux_model.py
            check_run(cfg)


def test_a_config_file_can_lay_its_options_over_a_base(tmp_path):
    (tmp_path / "base.yaml").write_text("method: pec\nsampling:\n  group_size: 6\n  num_steps: 4\n")
    (tmp_path / "variant.yaml").write_text("base: base.yaml\nsampling:\n  num_steps: 7\n")
    cfg = parse_config(["--config", str(tmp_path / "variant.yaml")])
    assert (cfg.method, cfg.sampling.group_size, cfg.sampling.num_steps) == ("pec", 6, 7)
    (tmp_path / "base.yaml").write_text("base: variant.yaml\n")
    with pytest.raises(ValueError, match="base chain comes back"):
        load_yaml(tmp_path / "variant.yaml")


@pytest.mark.parametrize("saved", sorted((Path(__file__).parent / "old_configs").glob("config-*.yaml")),
                         ids=lambda p: p.stem)
def test_config_yaml_of_older_runs_still_resumes(tmp_path, saved):
    """config.yaml files as earlier versions wrote them (fewer keys, `stop_after: null`, `threads: 1`) resume."""
    from pec.train import config_from_argv

    shutil.copy(saved, tmp_path / "config.yaml")
    cfg = config_from_argv(["--run-dir", str(tmp_path), "--resume"])
    assert cfg.train.stop_after is None and cfg.threads == 1 and cfg.eval.num_steps is None
    assert cfg.train.steps == load_yaml(saved)["train"]["steps"]  # the saved values, not today's defaults


def test_values_that_used_to_mean_not_set(tmp_path):
    """stop_after <= 0 and eval.num_steps 0 were silently read as empty: now refused; threads 0 means torch's
    default, as its help says."""
    for argv, match in [(["--train.stop_after", "0"], r"train\.stop_after must be >= 1 \(empty = run to"),
                        (["--train.stop_after=-2"], r"train\.stop_after must be >= 1"),
                        (["--eval.num_steps", "0"], r"eval\.num_steps must be >= 1 \(empty = the run's"),
                        (["--threads=-1"], r"threads must be >= 0")]:
        with pytest.raises(ValueError, match=match):
            check_run(parse_config(argv))
    assert parse_config(["--threads", "0"]).validate().threads == 0
    assert parse_config(["--train.stop_after", "none", "--eval.num_steps", ""]).validate().train.stop_after is None
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    assert "0 or empty = torch's default" in " ".join(parser.format_help().split())
