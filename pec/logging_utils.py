"""What a run writes besides checkpoints: per-step metrics (JSONL + TensorBoard, and Weights & Biases with
`--logging.wandb`), plots and sample grids (written atomically, `pec.atomic`; a video model's grids are frame
strips plus an animated GIF).

Resuming is exact: `MetricsLog.open(path, keep_through=step)` drops rows of steps after the last
checkpoint (they were computed but their checkpoint never landed, so they will be redone), and
TensorBoard's `purge_step` does the same for the event files. No row is lost or duplicated. W&B cannot
drop what it was sent: a resumed run continues the same W&B run (`WandbLog`) and skips the redone steps it
already holds, whose values the redone steps reproduce (resuming is exact; only `time/*` differ).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pec.atomic import atomic_write, atomic_write_text  # noqa: E402
from pec.cli import one_line, warn  # noqa: E402
from pec.config import LoggingConfig  # noqa: E402
from pec.video import check_videos, is_video, spread_frames  # noqa: E402


class MetricsLog:
    """Append-only JSONL file of per-step metric rows, each with a "step" key."""

    def __init__(self, path: str | Path, rows: list[dict[str, Any]]) -> None:
        self.path = Path(path)
        self.rows = rows

    @classmethod
    def open(cls, path: str | Path, keep_through: int = 0) -> MetricsLog:
        """Open (or create) the log, keeping only rows with step <= keep_through and rewriting the file
        (atomically).

        A line that is not a JSON row, such as a torn last line (the process died mid-write), is dropped
        with one warning that names it.
        """
        path = Path(path)
        rows: list[dict[str, Any]] = []
        torn: list[int] = []
        if path.exists():
            lines = path.read_text(errors="replace").splitlines()
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if not isinstance(row, dict):
                    torn.append(number)
                elif row.get("step", math.inf) <= keep_through:
                    rows.append(row)
            if torn:
                which = "its last line" if torn == [len(lines)] else f"line(s) {', '.join(map(str, torn))}"
                warn(f"{path}: dropped {which}, not a complete JSON row (a write cut short)")
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        return cls(path, rows)

    def append(self, row: dict[str, Any]) -> None:
        """Append one row and flush it to disk."""
        row = {k: _plain(v) for k, v in row.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.rows.append(row)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class TensorBoardLog:
    """Scalars to TensorBoard; a no-op when disabled. Resuming purges events after the checkpoint step."""

    def __init__(self, log_dir: str | Path, enabled: bool, purge_step: int | None = None) -> None:
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def log(self, row: dict[str, Any], step: int) -> None:
        """Write every numeric entry of `row` at `step`."""
        if self.writer is None:
            return
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        """Close the event file."""
        if self.writer is not None:
            self.writer.close()


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row but its "step": what the trackers log."""
    return {key: value for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value)}


WANDB_EXTRA = 'pip install -e ".[wandb]"'
WANDB_STATE = "wandb.json"  # in the run folder: the W&B run's id and the last step sent to it


def check_wandb(logging: LoggingConfig) -> None:
    """ValueError (one line) when `--logging.wandb` is set but the wandb package does not import."""
    if not logging.wandb:
        return
    try:
        import wandb  # noqa: F401
    except ImportError as err:
        raise ValueError(f"--logging.wandb {logging.wandb}: the wandb package is not installed ({one_line(err)}); "
                         f"install the extra with {WANDB_EXTRA}, or drop --logging.wandb") from None


class WandbLog:
    """Weights & Biases beside TensorBoard, the same shape: `log` sends a metrics row's scalars at its step,
    `log_image` a sample grid, and the run's config goes with `wandb.init`; a no-op when disabled (no
    `--logging.wandb` project, or not rank 0).

    The W&B run's id is kept in RUN/wandb.json with the last step sent, so a resumed run continues the same
    W&B run (`resume="allow"`: one written offline and never synced continues too) and skips the redone steps
    that run already holds. The W&B files go under RUN/wandb, or under $WANDB_DIR when it is set; the
    console is not captured (the run folder keeps the record). A W&B run that cannot start (online without
    `wandb login`, a project W&B refuses) is a ValueError that says what to do.
    """

    def __init__(self, run_dir: str | Path, logging: LoggingConfig, config: dict[str, Any], enabled: bool,
                 resume: bool = False, secrets: Sequence[str] = ()) -> None:
        self.run = None
        self.state_path = Path(run_dir) / WANDB_STATE
        if not (enabled and logging.wandb):
            return
        import wandb

        state = _read_state(self.state_path) if resume else {}
        try:
            with _argv_without(secrets):  # W&B records the command line, which may hold a secret option's value
                self.run = wandb.init(
                    project=logging.wandb, entity=logging.wandb_entity,
                    name=logging.wandb_name or Path(run_dir).name, mode=logging.wandb_mode, config=config,
                    id=state.get("id"), resume="allow" if state else None,
                    dir=None if os.environ.get("WANDB_DIR") else str(run_dir), settings=wandb.Settings(console="off"))
        except wandb.errors.Error as err:
            raise ValueError(f"--logging.wandb {logging.wandb}: W&B could not start the run ({one_line(err)}); log "
                             f"in with `wandb login` (or set WANDB_API_KEY), or log offline with "
                             f"--logging.wandb_mode offline") from None
        self.step = int(state.get("step", -1))  # the last step the W&B run holds
        self._save()

    def log(self, row: dict[str, Any], step: int) -> None:
        """Send every numeric entry of `row` at `step` (not a step the W&B run already holds)."""
        if self.run is None or step <= self.step:
            return
        self.run.log(scalars(row), step=step)
        self.step = step
        self._save()

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        """Send the PNG at `path` as image `key` at `step` (with that step's scalars when it has them)."""
        if self.run is None or step < self.step:
            return
        import wandb

        self.run.log({key: wandb.Image(str(path))}, step=step)
        self.step = step
        self._save()

    def close(self, failed: bool = False) -> None:
        """Finish the W&B run (marked failed when the run ends with an error)."""
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None

    def _save(self) -> None:
        atomic_write_text(self.state_path, json.dumps({"id": self.run.id, "step": self.step}) + "\n")


@contextlib.contextmanager
def _argv_without(secrets: Sequence[str]) -> Iterator[None]:
    """sys.argv with every value of `secrets` replaced by ***, for the duration of the block."""
    saved = sys.argv
    argv = list(saved)
    for secret in secrets:
        argv = [arg.replace(secret, "***") for arg in argv]
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def _read_state(path: Path) -> dict[str, Any]:
    """RUN/wandb.json, or {} when absent (a run that logged no W&B run before) or unreadable (one warning)."""
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text())
        if isinstance(state, dict) and isinstance(state.get("id"), str) and isinstance(state.get("step"), int):
            return state
    except (OSError, ValueError):
        pass
    warn(f"{path}: not the W&B run's id and step; this resumed run starts a new W&B run")
    return {}


def plot_metrics(rows: Sequence[dict[str, Any]], keys: Sequence[str], path: str | Path,
                 title: str = "") -> None:
    """One panel per key (a metric name, or a prefix matching several), each a curve over steps."""
    panels = [[k2 for k2 in sorted(rows[0]) if k2 == k or k2.startswith(k + "/")] if rows else [] for k in keys]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, key, names in zip(axes[0], keys, panels):
        steps = [r["step"] for r in rows]
        for name in names:
            ax.plot(steps, [r.get(name, float("nan")) for r in rows], label=name.split("/")[-1])
        ax.set_title(key)
        ax.set_xlabel("step")
        if len(names) > 1:
            ax.legend(fontsize=7)
    save_figure(fig, path, title)


def save_figure(fig, path: str | Path, title: str | None = None) -> None:
    """Lay out a matplotlib figure, give it a title, write it as a PNG (atomically) and free it."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100), binary=True)
    finally:
        plt.close(fig)


STRIP_FRAMES = 4  # frames across a video's row in a PNG grid
GIF_FPS = 8


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int, scale: int = 4) -> None:
    """Save images (N, C, H, W) in [0, 1] as one PNG grid of `nrow` images per row (nearest upscaling),
    atomically.

    Videos (N, F, C, H, W) (a video model's samples): the PNG holds frame strips, one row per video with
    `STRIP_FRAMES` frames spread over its clip (`pec.video.frame_indices`), and an animated GIF of the grid
    (`nrow` videos a row, every frame, `GIF_FPS` frames a second) is written beside it (`path` with the suffix
    .gif). The GIF comes from Pillow's own GIF writer, which the PNG needs anyway: no other dependency. If
    Pillow cannot encode it, that is one warning and the frame strips stand alone; a failure to write either
    file (a full disk) is an OSError, as for the PNG of images.
    """
    if not is_video(images):
        _write_png(_grid(images, nrow, scale), path)
        return
    videos = check_videos(images).detach().float().cpu()
    strips = spread_frames(videos, STRIP_FRAMES)
    _write_png(_grid(strips.flatten(0, 1), strips.shape[1], scale), path)
    gif = Path(path).with_suffix(".gif")
    try:
        data = _encode_gif([_grid(videos[:, f], nrow, scale) for f in range(videos.shape[1])])
    except (ImportError, KeyError, OSError) as err:  # no GIF writer in this Pillow (KeyError: none registered)
        warn(f"{gif}: not written, Pillow could not encode a GIF ({type(err).__name__}: {err}); the frame strips "
             f"are in {path}")
        return
    atomic_write(gif, lambda fh: fh.write(data), binary=True)


def save_sample(sample: torch.Tensor, path: str | Path) -> Path:
    """Save one sample in [0, 1] at its own size, atomically: an image (C, H, W) as a PNG, a video (F, C, H, W) as
    an animated GIF of every frame (`GIF_FPS` a second); `path`'s suffix is replaced by .png / .gif, and the path
    written is returned."""
    if sample.dim() not in (3, 4) or sample.shape[-3] not in (1, 3):
        raise ValueError(f"a sample must have shape (C, H, W) or (F, C, H, W) with C = 1 or 3, got "
                         f"{tuple(sample.shape)}")
    frames = sample.detach().float().cpu().clamp(0, 1)
    frames = frames if frames.dim() == 4 else frames[None]
    arrays = [(f.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for f in frames]
    if sample.dim() == 3:
        path = Path(path).with_suffix(".png")
        _write_png(arrays[0], path)
        return path
    path = Path(path).with_suffix(".gif")
    data = _encode_gif(arrays)
    return atomic_write(path, lambda fh: fh.write(data), binary=True)


def _grid(images: torch.Tensor, nrow: int, scale: int) -> np.ndarray:
    """Images (N, C, H, W) in [0, 1] as one uint8 (rows, cols, C) grid of `nrow` images per row, 1-pixel white
    borders, upscaled `scale` times (nearest)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, 1 or 3, H, W) or (N, F, 1 or 3, H, W), got "
                         f"{tuple(images.shape)}")
    n, c, h, w = images.shape
    ncol = math.ceil(n / nrow)
    pad = 1
    grid = torch.ones(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    for i, img in enumerate(images.detach().float().cpu().clamp(0, 1)):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return np.kron(arr, np.ones((scale, scale, 1), dtype=np.uint8))


def _pil(arr: np.ndarray):
    from PIL import Image

    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def _write_png(arr: np.ndarray, path: str | Path) -> None:
    image = _pil(arr)
    atomic_write(path, lambda fh: image.save(fh, format="PNG"), binary=True)


def _encode_gif(frames: Sequence[np.ndarray]) -> bytes:
    """An animated GIF (looping, `GIF_FPS` frames a second) of uint8 frames, in memory."""
    images = [_pil(arr) for arr in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / GIF_FPS),
                   loop=0)
    return buffer.getvalue()


def _plain(value: Any) -> Any:
    """JSON-friendly scalar (tensors and numpy numbers to float / int)."""
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value
