"""The shared error handling of every command (`pec.cli`) and the atomic writes (`pec.atomic`): which
failure gets which exit code and one line, cleanup that never replaces the real error, and files that
are either old or new, never cut. The commands themselves are tried in tests/bad_input/test_bad_runs.py."""
import errno
import os
import signal

import pytest

from pec.atomic import atomic_write, atomic_write_text, write_error
from pec.cli import (
    EXIT_FAILURE,
    EXIT_REFUSED,
    CommandError,
    CommandExit,
    best_effort,
    expected_errors,
)


def _exit_of(exc: BaseException, before_work: bool) -> CommandExit:
    with pytest.raises(CommandExit) as info, expected_errors("prog", before_work=before_work):
        raise exc
    return info.value


@pytest.mark.parametrize("exc, before_work, code", [
    (ValueError("--x must be > 0"), True, EXIT_REFUSED),
    (FileNotFoundError(2, "No such file or directory", "run.yaml"), True, EXIT_REFUSED),
    (ValueError("the server answered garbage"), False, EXIT_FAILURE),
    (FileNotFoundError(2, "No such file or directory", "gone.png"), False, EXIT_FAILURE),
    (OSError(errno.ENOSPC, "No space left on device"), True, EXIT_FAILURE),  # a full disk is never bad input
    (OSError(errno.EROFS, "Read-only file system"), False, EXIT_FAILURE),
    (ConnectionError("reward server did not answer"), False, EXIT_FAILURE),
    (CommandError("job failed"), True, EXIT_FAILURE),
    (CommandError("refused", EXIT_REFUSED), False, EXIT_REFUSED),
    (KeyboardInterrupt(), False, 128 + signal.SIGINT),
])
def test_expected_failures_are_one_line_with_the_tables_code(exc, before_work, code, capsys):
    exit_ = _exit_of(exc, before_work)
    assert exit_.code == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prog: ") and str(exit_) == err.strip()


def test_a_message_on_several_lines_is_printed_on_one(capsys):
    _exit_of(ValueError("first\n  second"), True)
    assert capsys.readouterr().err == "prog: first second\n"


@pytest.mark.parametrize("exc", [KeyError("x"), TypeError("bad call"), RuntimeError("a bug")])
def test_bugs_keep_their_traceback(exc):
    with pytest.raises(type(exc)), expected_errors("prog", before_work=True):
        raise exc


def test_pec_traceback_shows_the_traceback_of_an_expected_failure_too(monkeypatch, capsys):
    monkeypatch.setenv("PEC_TRACEBACK", "1")
    assert _exit_of(OSError(errno.ENOSPC, "No space left on device"), False).code == EXIT_FAILURE
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("prog: [Errno 28] No space left on device\n")


def test_a_failed_cleanup_is_a_warning_and_the_real_error_propagates(capsys):
    with pytest.raises(ValueError, match="the real error"):
        try:
            raise ValueError("the real error")
        finally:
            with best_effort("writing curves.png"):
                raise OSError(errno.ENOSPC, "No space left on device")
    assert capsys.readouterr().err == "warning: writing curves.png failed: [Errno 28] No space left on device\n"


# ------------------------------------------------------------------------------------------ atomic


def test_atomic_write_replaces_a_file_whole(tmp_path):
    path = tmp_path / "config.yaml"
    atomic_write_text(path, "old: 1\n")
    atomic_write(path, lambda fh: fh.write(b"new: 2\n"), binary=True)
    assert path.read_text() == "new: 2\n" and os.listdir(tmp_path) == ["config.yaml"]


def _cut_write(fh):
    fh.write("half")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_write_cut_short_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text("old: 1\n")
    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, _cut_write)
    assert path.read_text() == "old: 1\n" and os.listdir(tmp_path) == ["config.yaml"]

    def no_rename(src, dst):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="Read-only"):
        atomic_write_text(path, "new: 2\n")
    assert path.read_text() == "old: 1\n" and os.listdir(tmp_path) == ["config.yaml"]
    absent = tmp_path / "absent.json"
    with pytest.raises(OSError):
        atomic_write_text(absent, "{}")
    assert not absent.exists()


def test_write_error_finds_the_oserror_behind_a_serializers_own_error():
    full = OSError(errno.EFBIG, "File too large")
    try:
        try:
            raise full
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")  # how torch.save says it
    except RuntimeError as err:
        assert write_error(err) is full
    assert write_error(full) is full
    assert write_error(RuntimeError("a bug")) is None


@pytest.mark.parametrize("module", ["pec.train", "pec.evaluate", "pec.pretrain", "pec.checkpoint",
                                    "pec.export", "pec.sample", "pec.rewards.serve", "pec.experiments.paper_table",
                                    "pec.experiments.guidance_sweep"])
def test_every_command_says_its_version(module, capsys):
    import importlib

    import pec

    with pytest.raises(SystemExit) as info:
        importlib.import_module(module).main(["--version"])
    assert info.value.code == 0 and f"pec {pec.__version__}" in capsys.readouterr().out
