"""Atomic file writes: a file that a run writes or rewrites (config.yaml, plots, sample grids, tables) is
either its old version or its complete new one, never a cut one, whatever stops the write (a full disk,
a kill, a power cut).

The bytes go to a temporary file in the same folder, which is fsynced and then renamed over the final
name (a rename within a filesystem is atomic), and the folder is fsynced so that the rename lasts.
Only the standard library is imported here, so that any module may use it.
"""
from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | Path, write: Callable[[IO[Any]], object], *, binary: bool = False) -> Path:
    """Write `path` atomically: `write(fh)` fills an open temporary file (binary, or UTF-8 text written
    as given, without newline translation, as the csv module wants), which then replaces `path`.

    On any failure the temporary file is removed, `path` keeps its old content (or stays absent) and the
    error propagates (an OSError for a full or read-only disk). Returns `path`.
    """
    path = Path(path)
    # A name of its own per writer: processes writing the same file at once never share a temporary.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") if binary else open(tmp, "x", encoding="utf-8", newline="") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write` of a string (UTF-8)."""
    return atomic_write(path, lambda fh: fh.write(text))


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in `folder` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_error(err: BaseException) -> OSError | None:
    """The OSError behind a failed write: `err` itself, or the one a serializer turned into an error of its
    own (torch.save reports a full disk as a RuntimeError raised while handling the file's OSError);
    None when `err` is not a failed write."""
    if isinstance(err, OSError):
        return err
    return err.__context__ if isinstance(err.__context__, OSError) else None
