"""Bad input: every option of `Config`, given NaN, infinities, a value of the wrong type or one out of its
range, from YAML or the command line, is refused with one line naming the option before any work.

The fields are walked, not listed, so an option added later is tried too; a number option must state its
range (`option(..., min= / max= / positive=)`).
"""
import argparse
import math

import pytest
import yaml

from pec.config import Config, _unwrap_optional, _walk, add_config_arguments, apply_dict, config_from_args
from pec.train import main

LEAVES = list(_walk(Config))
NON_FINITE = [math.nan, math.inf, -math.inf]
# Run to a temporary folder, 1 step, if a bad value were ever accepted (never into ./runs).
QUIET = ["--train.steps", "1", "--logging.progress", "false", "--logging.tensorboard", "false"]


def _nested(dotted: str, value):
    *sections, leaf = dotted.split(".")
    out = {leaf: value}
    for section in reversed(sections):
        out = {section: out}
    return out


def _bad_values(tp) -> list:
    """Values of the wrong type for a field of type `tp` (YAML can produce each of them)."""
    base, _ = _unwrap_optional(tp)
    if base is bool:
        return [*NON_FINITE, "abc", 2, 1.0, [True], {"a": 1}]
    if base is str:
        return [*NON_FINITE, 5, True, ["a"], {"a": 1}]
    if base is int:
        return [*NON_FINITE, "abc", True, False, 2.5, "2.5", 2**64, [1], {"a": 1}]
    if base is float:
        return [*NON_FINITE, "nan", "inf", "-inf", "abc", True, [1.0], {"a": 1}, 10**400]
    item = _unwrap_optional(base.__args__[0])[0]  # a list
    items = [[math.nan], ["abc"], [True], [2.5]] if item is int else [[5], [True], [math.nan], [["a"]]]
    return [*NON_FINITE, 5, True, {"a": 1}, *items]


def _assert_refused(dotted: str, value, make_config) -> None:
    with pytest.raises(ValueError) as info:
        make_config().validate()
    message = str(info.value)
    assert dotted in message and "\n" not in message, f"{dotted} = {value!r}: {message}"


def _from_dict(dotted, value):
    cfg = Config()
    apply_dict(cfg, _nested(dotted, value))
    return cfg


@pytest.mark.parametrize("dotted, tp", [(d, tp) for d, _, tp in LEAVES], ids=[d for d, _, _ in LEAVES])
def test_wrong_types_and_non_finite_values_name_the_option(dotted, tp):
    for value in _bad_values(tp):
        _assert_refused(dotted, value, lambda: _from_dict(dotted, value))


@pytest.mark.parametrize("dotted, f, tp", LEAVES, ids=[d for d, _, _ in LEAVES])
def test_numbers_have_a_range_and_values_outside_it_name_the_option(dotted, f, tp):
    base, _ = _unwrap_optional(tp)
    if base not in (int, float):
        return
    low, high, positive = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("positive")
    assert low is not None or high is not None or positive, f"{dotted}: option(..., min= / max= / positive=)"
    step = 1 if base is int else 0.5
    outside = ([0, -step] if positive else []) + ([low - step] if low is not None else []) + \
              ([high + step] if high is not None else [])
    for value in outside:
        _assert_refused(dotted, value, lambda: _from_dict(dotted, value))


COMMAND_LINE = [(d, tp) for d, _, tp in LEAVES if _unwrap_optional(tp)[0] in (int, float, bool, list[int])]
PARSER = argparse.ArgumentParser()
add_config_arguments(PARSER)


@pytest.mark.parametrize("dotted, tp", COMMAND_LINE, ids=[d for d, _ in COMMAND_LINE])
def test_bad_command_line_values_name_the_option(dotted, tp):
    base, _ = _unwrap_optional(tp)
    words = ["nan", "inf", "-inf", "abc"] + {int: ["true", "2.5", "1e3"], float: ["true"], bool: ["2"],
                                             list[int]: ["1 2.5", "nan 3"]}[base]
    for word in words:  # `--x=-inf`: argparse reads a lone `-inf` as an option; a list's items split at commas
        argv = [f"--{dotted}={word.replace(' ', ',')}"]
        _assert_refused(dotted, word, lambda: config_from_args(PARSER.parse_args(argv)))


def test_values_set_in_code_are_checked_too():
    for section, name, value in [("pec", "lambda_", math.nan), ("train", "steps", True), ("train", "lr", "abc"),
                                 ("eval", "num_steps", 0)]:
        cfg = Config()
        setattr(getattr(cfg, section), name, value)
        with pytest.raises(ValueError, match=f"^{section}.{name.rstrip('_')} must be"):
            cfg.validate()
    cfg = Config()
    cfg.train.lr, cfg.threads = "0.1", 2.0
    cfg.validate()
    assert (cfg.train.lr, cfg.threads) == (0.1, 2) and type(cfg.threads) is int  # stored as apply_dict would


def _exit_message(argv, capsys) -> str:
    """pec.train's exit for refused input: a non-zero status and one line (the message)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    code = info.value.code
    message = code if isinstance(code, str) else capsys.readouterr().err
    assert code not in (0, None), message
    assert "\n" not in message.strip(), message
    return message


@pytest.mark.parametrize("option, value", [
    ("pec.lambda", "nan"), ("train.clip_range", "nan"), ("train.lr", "inf"), ("train.steps", "true"),
    ("train.stop_after", "0"), ("eval.num_steps", "0"), ("threads", "-1"), ("seed", str(2**64)),
])
def test_pec_train_refuses_bad_options_before_any_work(tmp_path, capsys, option, value):
    run = tmp_path / "run"
    message = _exit_message(["--run-dir", str(run), *QUIET, f"--{option}", value], capsys)
    assert f"{option} must be" in message, message
    assert not run.exists()


def test_pec_train_refuses_a_yaml_bool_for_a_number(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"train": {"steps": True}, "pec": {"lambda": 0.1}}))
    run = tmp_path / "run"
    message = _exit_message(["--config", str(config), "--run-dir", str(run)], capsys)
    assert "train.steps must be of type int, got True" in message
    assert not run.exists()
