"""Training checkpoints that never go backwards and never run code: atomic, finite, weights-only,
kept in a rotation, plus milestones.

Layout of a run folder:

    checkpoints/step-00000012.pt   the last `keep` checkpoints (older ones are deleted once a newer
                                   one is safely on disk)
    milestones/step-00000020.pt    snapshots every `milestone_every` steps, never deleted (evaluation
                                   along training reads them)

Each file holds the trainable weights, the optimizer state, the RNG states, the step and the run's
config. Rules:
- Only tensors and plain values (dict, list, tuple, str, int, float, bool, None) are stored, and files
  are read with `torch.load(..., weights_only=True)`: loading a checkpoint, even a crafted one, never
  runs code. Checkpoints pec wrote before format 3 are full pickles (numpy's RNG state among them);
  they are refused with the command that converts them, `python -m pec.checkpoint convert RUN_OR_FILE
  --trusted`, which unpickles them only because the flag says their source is trusted.
- A state with a non-finite weight or optimizer moment is never written (`NonFiniteStateError`).
- A write goes to a temporary file in the same folder, is fsynced, then renamed over its final name and
  the folder is fsynced: a write interrupted at any point (a kill, a full disk) leaves every earlier
  checkpoint intact, and a leftover temporary file is ignored and cleaned up by the next write.
- Rotation deletes only older checkpoints than the one just written, never that one: a stray or torn
  file with a higher step is left alone and cannot push the new ones out.
- `load_checkpoint` returns the newest *valid* checkpoint: a regular file that loads, holds finite
  tensors and passes the caller's check (e.g. `Policy.check_checkpoint`: the run's model config); it
  says which ones it skipped and why (torn, foreign, a full pickle, a FIFO or folder, another config).
"""
from __future__ import annotations

import os
import pickle
import random
import re
import shlex
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pec.atomic import atomic_write, fsync_dir, write_error
from pec.cli import EXIT_REFUSED, command_parser, expected_errors, fail, one_line

PROG = "pec.checkpoint"
CHECKPOINT_DIR = "checkpoints"
MILESTONE_DIR = "milestones"
FORMAT = 3  # 3: weights-only (tensors and plain values); 2: a full pickle (numpy's RNG state, tuples)
LEGACY_FORMAT = 2  # what `convert` rewrites
_NAME = re.compile(r"^step-(\d+)\.pt$")
_KEYS = {"step", "model", "optimizer", "rng", "config"}
# What a weights-only load reads back without an allow-list (exact types: a numpy float is a float
# subclass that pickles as numpy's, and a defaultdict needs its factory).
_PLAIN = (str, int, float, bool, type(None))
_CONTAINERS = (dict, OrderedDict, list, tuple)
_TENSORS = (torch.Tensor, torch.nn.Parameter)
UNTRUSTED = (f"is a full pickle, which only an unpickler that can run code would load (a checkpoint pec wrote "
             f"before format {FORMAT}, or a crafted file): not loaded")


class NonFiniteStateError(ValueError):
    """A training state holds NaN or Inf and must not be written."""


class UntrustedCheckpointError(ValueError):
    """A checkpoint that only a full unpickler would load (pec's format 2, or a crafted file): it is
    never unpickled, and the message gives the command that converts it if it is trusted."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(f"{UNTRUSTED}; if you trust it, convert it with: {convert_command(path)}")


class NoCheckpointError(FileNotFoundError, ValueError):
    """A run folder holds no valid checkpoint (also a ValueError: a one-line, expected failure)."""


def convert_command(target: str | Path) -> str:
    """The command that rewrites the trusted format-2 checkpoint(s) `target` (a file or a run folder)."""
    return f"python -m pec.checkpoint convert {shlex.quote(str(target))} --trusted"


def rng_state() -> dict[str, Any]:
    """The RNG states of Python, numpy, torch CPU and (when present) every CUDA device, as tensors and
    plain values (so a weights-only load reads them back)."""
    state = {"python": _python_rng(random.getstate()), "numpy": _numpy_rng(np.random.get_state()),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states saved by `rng_state` (wherever a checkpoint's `map_location` put its tensors)."""
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss_next"]))
    np.random.set_state((npy["bit_generator"], npy["key"].cpu().numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _python_rng(state: tuple) -> dict[str, Any]:
    """`random.getstate()` (version, 625 ints, cached gaussian) as a tensor and plain values."""
    version, internal, gauss_next = state
    return {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next}


def _numpy_rng(state: tuple) -> dict[str, Any]:
    """numpy's legacy state tuple (name, 624 uint32 keys, pos, has_gauss, cached gaussian) as a tensor
    and plain values."""
    name, key, pos, has_gauss, gauss = state
    return {"bit_generator": str(name), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def checkpoint_name(step: int) -> str:
    """File name of the checkpoint of `step` (zero-padded so names sort by step)."""
    return f"step-{step:08d}.pt"


def nonfinite_entries(tree: Any, prefix: str = "") -> list[str]:
    """Dotted names of the floating-point tensors in a nested dict/list state that hold NaN or Inf."""
    bad: list[str] = []
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and not bool(torch.isfinite(tree).all()):
            bad.append(prefix or "<tensor>")
    elif isinstance(tree, dict):
        for key, value in tree.items():
            bad += nonfinite_entries(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            bad += nonfinite_entries(value, f"{prefix}[{i}]")
    return bad


def foreign_entries(tree: Any, prefix: str = "") -> list[str]:
    """Dotted names (with their type) of the entries of a nested state that are neither tensors nor plain
    values, i.e. what a weights-only load could not read back."""
    kind = type(tree)
    if kind in _TENSORS or kind in _PLAIN:
        return []
    if kind not in _CONTAINERS:
        return [f"{prefix or '<root>'} ({kind.__module__}.{kind.__qualname__})"]
    bad: list[str] = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            bad += foreign_entries(key, f"{name} (key)") + foreign_entries(value, name)
    else:
        for i, value in enumerate(tree):
            bad += foreign_entries(value, f"{prefix}[{i}]")
    return bad


def save_checkpoint(run_dir: str | Path, *, step: int, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], config: dict[str, Any], rng: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None, keep: int = 2, milestone: bool = False) -> Path:
    """Write the checkpoint of a finished `step` into `run_dir/checkpoints` and keep the newest `keep`.

    Args:
        run_dir: the run folder.
        step: the last finished training step the state belongs to.
        model_state, optimizer_state: the trainable weights and the optimizer's state dict.
        config: the run's configuration (a plain dict), checked on resume.
        rng: RNG states to store (default: the current ones, `rng_state()`).
        extra: anything else to keep, as tensors and plain values.
        keep: how many regular checkpoints to keep (>= 1), counting this one; only older ones are
            deleted (never this one, nor a file of a higher step); milestones are never deleted.
        milestone: also keep this state in `run_dir/milestones`.

    Returns:
        The path of the new checkpoint.

    Raises:
        NonFiniteStateError: a weight or optimizer moment is not finite; nothing is written.
        TypeError: the state holds something other than tensors and plain values; nothing is written.
        OSError: the write failed (e.g. the disk is full); earlier checkpoints are intact and the
            partial file is removed.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    bad = nonfinite_entries({"model": model_state, "optimizer": optimizer_state})
    if bad:
        raise NonFiniteStateError(f"the state of step {step} holds NaN/Inf in {', '.join(bad[:5])}"
                                  f"{' ...' if len(bad) > 5 else ''}; it was not written")
    payload = {"format": FORMAT, "step": step, "model": model_state, "optimizer": optimizer_state,
               "rng": rng if rng is not None else rng_state(), "config": config, "extra": extra or {}}
    folder = Path(run_dir) / CHECKPOINT_DIR
    path = _atomic_save(payload, folder / checkpoint_name(step))
    if milestone:
        _link_or_copy(path, Path(run_dir) / MILESTONE_DIR / checkpoint_name(step), payload)
    # Only regular files of earlier steps rotate out: a stray file of a higher step (torn, or from
    # elsewhere) must not count as newer than the checkpoint just written.
    older = [p for p in _sorted_files(folder) if _step_of(p) < step and p.is_file()]
    for old in older[keep - 1:]:
        old.unlink(missing_ok=True)
    return path


def checkpoint_files(run_dir: str | Path) -> list[Path]:
    """Every entry named like a checkpoint in a run (rotation and milestones), newest step first; for
    one step the rotation's copy comes before the milestone's. Entries that are not regular files are
    listed too (`read_checkpoint` refuses them, saying what they are)."""
    run_dir = Path(run_dir)
    files = _sorted_files(run_dir / CHECKPOINT_DIR) + _sorted_files(run_dir / MILESTONE_DIR)
    return sorted(files, key=lambda p: -_step_of(p))


def milestone_files(run_dir: str | Path) -> list[Path]:
    """The milestone snapshots of a run, oldest step first."""
    return _sorted_files(Path(run_dir) / MILESTONE_DIR)[::-1]


def checkpoint_at(run_dir: str | Path, step: int, map_location: str | torch.device = "cpu", *,
                  check: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The checkpoint of finished `step` (a kept one or else a milestone), validated like `read_checkpoint`
    and by `check` (see `load_checkpoint`); a ValueError lists the steps the run holds when there is none,
    or names each file of that step and why it was refused."""
    files = [p for p in checkpoint_files(run_dir) if _step_of(p) == step]
    if not files:
        held = sorted({_step_of(p) for p in checkpoint_files(run_dir)})
        raise ValueError(f"{run_dir} has no checkpoint of step {step}; it holds steps {held} (milestones are kept "
                         f"with --logging.milestone_every)")
    refused = []
    for path in files:
        try:
            return _read_checked(path, map_location, check)
        except ValueError as err:
            refused.append(f"{path}: {err}")
    raise ValueError(f"no valid checkpoint of step {step} in {run_dir}: {'; '.join(refused)}")


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether `run_dir` holds any checkpoint file (valid or not)."""
    return bool(checkpoint_files(run_dir))


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one checkpoint file, weights-only, and check that it is complete and finite.

    The returned dict also holds "path".

    Raises:
        UntrustedCheckpointError: a full pickle (pec's format 2, or a crafted file); it was not unpickled.
        ValueError: anything else that makes it unusable (not a regular file, torn, foreign, another
            format, incomplete, non-finite), saying why.
    """
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO named like a checkpoint must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise ValueError(f"cannot be read ({err.strerror or err})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ValueError(f"is not a regular file (a {_file_kind(mode)})")
    with os.fdopen(fd, "rb") as fh:
        try:
            payload = torch.load(fh, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:  # the restricted unpickler met a global: code it refuses to run
            raise UntrustedCheckpointError(path) from None
        except Exception as err:  # a torn or foreign file: any other loading error means "not loadable"
            raise ValueError(f"cannot be loaded ({type(err).__name__}: {one_line(err)})") from None
    if not isinstance(payload, dict) or not _KEYS <= payload.keys():
        raise ValueError("is not a pec checkpoint (missing keys)")
    if payload.get("format") != FORMAT:
        raise ValueError(f"has checkpoint format {payload.get('format')!r}; this pec reads format {FORMAT}")
    if not (isinstance(payload["model"], dict) and all(isinstance(t, torch.Tensor) for t in payload["model"].values())
            and isinstance(payload["optimizer"], dict) and isinstance(payload["config"], dict)
            and isinstance(payload["rng"], dict)):
        raise ValueError("is not a pec checkpoint (entries of the wrong type)")
    bad = nonfinite_entries({"model": payload["model"], "optimizer": payload["optimizer"]})
    if bad:
        raise ValueError(f"holds NaN/Inf in {', '.join(bad[:3])}")
    payload["path"] = path
    return payload


def load_checkpoint(run_dir: str | Path, map_location: str | torch.device = "cpu", *,
                    check: Callable[[dict[str, Any]], None] | None = None,
                    on_skip: Callable[[Path, str], None] | None = None) -> dict[str, Any]:
    """The newest valid checkpoint of `run_dir` (see the module docstring); "path" says which file.

    Args:
        run_dir: the run folder.
        map_location: where tensors are loaded.
        check: raises ValueError when a loaded checkpoint does not fit the caller (e.g. another
            model or LoRA config); such a checkpoint is skipped like a torn one.
        on_skip: called with (path, reason) for every newer checkpoint that was skipped.

    Raises:
        NoCheckpointError: no valid checkpoint; the message lists every file tried and why it failed,
            and gives the converter's command when some were full pickles.
    """
    tried: list[str] = []
    untrusted = False
    for path in checkpoint_files(run_dir):
        try:
            return _read_checked(path, map_location, check)
        except ValueError as err:
            untrusted |= isinstance(err, UntrustedCheckpointError)
            tried.append(f"{path.name}: {UNTRUSTED if isinstance(err, UntrustedCheckpointError) else err}")
            if on_skip is not None:
                on_skip(path, str(err))
    detail = f" (tried {'; '.join(tried)})" if tried else ""
    hint = f". If you trust these files, convert them with: {convert_command(run_dir)}" if untrusted else ""
    raise NoCheckpointError(f"no valid checkpoint in {Path(run_dir) / CHECKPOINT_DIR}{detail}: nothing to "
                            f"resume or evaluate{hint}")


def config_mismatch(saved: dict[str, Any], current: dict[str, Any], keys: Iterable[str]) -> str | None:
    """None when the dotted config `keys` agree between two config dicts, else what differs."""
    diffs = []
    for key in keys:
        a, b = _lookup(saved, key), _lookup(current, key)
        if a != b:
            diffs.append(f"{key} is {a!r} in the checkpoint but {b!r} now")
    return "; ".join(diffs) or None


# ---------------------------------------------------------------------------------------------- convert


def convert_file(path: str | Path) -> str:
    """Rewrite one trusted format-2 checkpoint (a full pickle) in the current format, atomically, in place.

    Unpickles `path` with a full unpickler, which runs any code the file holds: call it only on files
    whose source is trusted. Returns what was done ("converted" or "already format 3").

    Raises:
        ValueError: the file is neither a current checkpoint nor a loadable format-2 one (saying why).
    """
    path = Path(path)
    try:
        read_checkpoint(path)
        return f"already format {FORMAT}"
    except UntrustedCheckpointError:
        pass
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"cannot be loaded ({type(err).__name__}: {one_line(err)})") from None
    if not isinstance(payload, dict) or not _KEYS <= payload.keys() or payload.get("format") != LEGACY_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else None
        raise ValueError(f"is not a pec checkpoint of format {LEGACY_FORMAT} (format {found!r}); not converted")
    rng = dict(payload["rng"])
    rng["python"], rng["numpy"] = _python_rng(rng["python"]), _numpy_rng(rng["numpy"])
    payload.update(format=FORMAT, rng=rng)
    foreign = foreign_entries(payload)
    if foreign:
        raise ValueError(f"holds entries that are neither tensors nor plain values ({', '.join(foreign[:3])}); "
                         f"not converted")
    _atomic_save(payload, path)
    return f"converted (format {LEGACY_FORMAT} -> {FORMAT})"


def convert(target: str | Path, report: Callable[[str], None] = print) -> int:
    """Convert a trusted checkpoint file, or every checkpoint of a trusted run folder (rotation and
    milestones; a milestone that shared its bytes with a rotation file shares the converted ones).
    Reports one line per file; returns how many files could not be converted."""
    target = Path(target)
    if target.is_dir():
        files = checkpoint_files(target)
        if not files:
            raise ValueError(f"{target} holds no checkpoint (step-*.pt in {CHECKPOINT_DIR}/ or {MILESTONE_DIR}/)")
    elif target.is_file():
        files = [target]
    else:
        raise ValueError(f"{target} is neither a checkpoint file nor a run folder")
    done: dict[tuple[int, int], Path] = {}  # (device, inode) before conversion -> its converted path
    failed = 0
    for path in files:
        try:
            if not path.is_file():
                raise ValueError("is not a regular file")
            st = path.stat()
            same = done.get((st.st_dev, st.st_ino))
            if same is not None:  # a milestone hard-linked to a rotation file: link it to the new bytes
                _link_or_copy(same, path, None)
                report(f"{path}: converted (linked to {same.name})")
                continue
            outcome = convert_file(path)
            if outcome.startswith("converted"):
                done[(st.st_dev, st.st_ino)] = path
            report(f"{path}: {outcome}")
        except (ValueError, OSError) as err:
            failed += 1
            report(f"{path}: {err}")
    return failed


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `python -m pec.checkpoint` (the `convert` command)."""
    parser = command_parser(
        "python -m pec.checkpoint",
        description=f"Checkpoint tools. `convert` rewrites checkpoints written before format {FORMAT} (full "
                    f"pickles, which pec no longer loads because unpickling can run any code the file holds) "
                    f"in format {FORMAT} (tensors and plain values, read with torch.load(weights_only=True)).")
    commands = parser.add_subparsers(dest="command", required=True)
    conv = commands.add_parser(
        "convert", help=f"rewrite trusted format-{LEGACY_FORMAT} checkpoints in format {FORMAT}, in place",
        description=f"Rewrite trusted checkpoints of format {LEGACY_FORMAT} in format {FORMAT}, each atomically "
                    f"in place (files already in format {FORMAT} are left as they are). This UNPICKLES the files, "
                    f"which runs any code they hold: convert only checkpoints you wrote yourself or got from a "
                    f"source you trust, and say so with --trusted.")
    conv.add_argument("targets", nargs="+", metavar="RUN_OR_FILE",
                      help="a run folder (every step-*.pt in its checkpoints/ and milestones/) or a checkpoint file")
    conv.add_argument("--trusted", action="store_true",
                      help="required: the files come from a trusted source (they are unpickled)")
    args = parser.parse_args(argv)
    if not args.trusted:
        fail(PROG, f"convert unpickles {' '.join(args.targets)}, which runs any code the files hold: nothing was "
                   f"read. Pass --trusted if you trust their source", EXIT_REFUSED)
    failed = 0
    with expected_errors(PROG, before_work=True):
        for target in args.targets:
            failed += convert(target)
    if failed:
        fail(PROG, f"{failed} file(s) not converted (see above)")


# ---------------------------------------------------------------------------------------------- internals


def _read_checked(path: Path, map_location: str | torch.device,
                  check: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    payload = read_checkpoint(path, map_location)
    if check is not None:
        check(payload)
    return payload


def _file_kind(mode: int) -> str:
    kinds = {stat.S_ISDIR: "directory", stat.S_ISFIFO: "FIFO", stat.S_ISSOCK: "socket", stat.S_ISCHR: "character "
             "device", stat.S_ISBLK: "block device"}
    return next((name for test, name in kinds.items() if test(mode)), "special file")


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _step_of(path: Path) -> int:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else -1


def _sorted_files(folder: Path) -> list[Path]:
    """Entries named like checkpoints in `folder`, newest step first (temporary and foreign names are
    ignored)."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name)), key=_step_of, reverse=True)


def _atomic_save(payload: dict[str, Any], path: Path) -> Path:
    """`pec.atomic.atomic_write` of a checkpoint; a failed write is an OSError (torch.save reports a full
    disk as a RuntimeError of its own)."""
    foreign = foreign_entries(payload)
    if foreign:  # a weights-only load could not read it back: a bug in what the caller stores
        raise TypeError(f"a checkpoint stores tensors and plain values only; {path.name} would hold "
                        f"{', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}")
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob("*.tmp"):  # left by a writer that was killed
        if not stale.is_dir():
            stale.unlink(missing_ok=True)
    try:
        return atomic_write(path, lambda fh: torch.save(payload, fh), binary=True)
    except RuntimeError as err:
        cause = write_error(err)
        if cause is None:
            raise
        raise cause from err


def _link_or_copy(src: Path, dst: Path, payload: dict[str, Any] | None) -> None:
    """Make `dst` hold `src`'s checkpoint, atomically: a hard link (shared bytes) where the filesystem
    allows, else a copy of `payload` (read from `src` when None)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except OSError:
        tmp.unlink(missing_ok=True)
        _atomic_save(payload if payload is not None else torch.load(src, weights_only=True), dst)


if __name__ == "__main__":
    main()
