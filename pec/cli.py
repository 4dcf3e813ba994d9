"""Exit codes and one-line errors, shared by every command (`pec.train`, `pec.evaluate`, `pec.sample`,
`pec.export`, `pec.pretrain`, `pec.experiments.*`, `pec.rewards.serve`).

| code    | meaning                                                                                    |
|---------|--------------------------------------------------------------------------------------------|
| 0       | success                                                                                    |
| 1       | a failure during the run (disk full, read-only folder, reward server or peer gone, ...)    |
| 2       | input refused before any work (bad option, missing file named on the command line, bad config) |
| 128 + N | stopped by signal N (130 for SIGINT / Ctrl-C, 143 for SIGTERM)                             |

An expected failure is one line on stderr, `PROG: what went wrong`, with no traceback; a bug (any
other exception) keeps its traceback. Set PEC_TRACEBACK=1 to see the traceback of expected failures
too. Only the standard library is imported here, so that any module may use it.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

EXIT_FAILURE = 1
EXIT_REFUSED = 2  # argparse's own code for a bad option
EXIT_CODES_HELP = ("exit codes: 0 success; 1 a failure during the run; 2 input refused before any work; "
                   "128+N stopped by signal N (README: Exit codes)")

# Expected failures: one line, no traceback. A ValueError is how this package refuses a value; an OSError
# is the outside world (files, disks, sockets; ConnectionError and FileNotFoundError are OSErrors).
EXPECTED = (ValueError, OSError)
# Of those, what means "fix the command line or the config" when it happens before any work.
REFUSED = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def command_parser(prog: str, description: str | None = None, **kwargs: object) -> argparse.ArgumentParser:
    """The argument parser of a command: its exit codes in the epilog (unless one is given) and `--version`."""
    from pec import __version__

    kwargs.setdefault("epilog", EXIT_CODES_HELP)
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    parser = argparse.ArgumentParser(prog=prog, description=description, **kwargs)
    parser.add_argument("--version", action="version", version=f"%(prog)s (pec {__version__})")
    return parser


def signal_exit_code(signum: int) -> int:
    """The exit code of a command stopped by signal `signum`: 128 + its number, as shells report it."""
    return 128 + int(signum)


class CommandError(RuntimeError):
    """An expected failure whose message is already complete (a failed job, a peer gone); `code` is its
    exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


class CommandExit(SystemExit):
    """The SystemExit of an expected failure: `code` is the exit code and str() the line printed on stderr
    (so that a caller of `main(argv)` can read both)."""

    def __init__(self, code: int, line: str) -> None:
        super().__init__(code)
        self.line = line

    def __str__(self) -> str:
        return self.line


def one_line(what: BaseException | str, limit: int | None = None) -> str:
    """A message on one line (whitespace runs collapsed), cut to `limit` characters when given; an
    exception without a message gives its type name."""
    text = " ".join(str(what).split())
    if not text and isinstance(what, BaseException):
        text = type(what).__name__
    return text if limit is None or len(text) <= limit else text[:limit] + "..."


def fail(prog: str, message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """Print `PROG: message` on stderr, on one line, and exit with `code` (a CommandExit)."""
    line = f"{prog}: {' '.join(message.split())}"
    print(line, file=sys.stderr, flush=True)
    raise CommandExit(code, line)


def warn(message: str) -> None:
    """One warning line on stderr (for what must not stop a run, such as a cleanup that failed)."""
    print(f"warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


@contextmanager
def expected_errors(prog: str, *, before_work: bool = False) -> Iterator[None]:
    """Turn an expected failure inside the block into one line on stderr and its exit code (the module
    docstring's table); anything else propagates with its traceback.

    Args:
        prog: the command's name, the first word of the line.
        before_work: the block only reads and checks input (options, config files, the run folder,
            models to load): a ValueError or a missing file there is input refused (exit 2). Elsewhere
            every expected failure is a failure during the run (exit 1).

    `CommandError` exits with its own code, Ctrl-C (KeyboardInterrupt) with 128 + SIGINT.
    """
    try:
        yield
    except CommandError as err:
        _exit(prog, err, err.code)
    except EXPECTED as err:
        _exit(prog, err, EXIT_REFUSED if before_work and isinstance(err, REFUSED) else EXIT_FAILURE)
    except KeyboardInterrupt as err:
        _exit(prog, err, signal_exit_code(signal.SIGINT), "interrupted (SIGINT)")


def _exit(prog: str, err: BaseException, code: int, message: str | None = None) -> NoReturn:
    if os.environ.get("PEC_TRACEBACK"):
        traceback.print_exception(err)
    fail(prog, message or one_line(err), code)


@contextmanager
def best_effort(what: str) -> Iterator[None]:
    """A cleanup step (closing a log, a last plot) that must never replace the real error: a failure
    inside becomes one warning line naming `what`."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 (any failure of a cleanup is only worth a warning)
        warn(f"{what} failed: {one_line(err)}")
