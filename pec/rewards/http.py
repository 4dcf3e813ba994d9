"""The `http` reward: a client of a reward server, so that large judges (UnifiedReward, VLMs) and
rewards with conflicting dependencies (GenEval) run in another process or on another machine.

Protocol: POST `{"prompts": [...], "images": [base64 PNG, ...]}` (JSON) to the server's URL; the answer
is `{"scores": [...]}` with one finite number per image, or an error status with `{"error": "..."}`.
Videos (a video model's clips): `{"prompts": [...], "videos": [[base64 PNG, ...], ...]}`, each video the
list of its frames in time order (the `--reward_video.frames` frames spread over the clip; one size and
frame count a request), one score per video. A GET is the health check: `{"reward": NAME}`, with
`"video": true` when the server's reward scores videos only (an image model is then refused before any
model loads). `python -m pec.rewards.serve NAME ...` serves any registered reward with this protocol.

The client (options `--reward_http.*`, the URL is `--paths.reward_url`):
- images go `batch_size` at a time (default 32), videos as many as hold `batch_size` frames (at least one);
- the requests of a batch go out together, up to `--reward_http.in_flight` (default 4) at a time, and
  `HttpReward.submit` does not wait for them: it returns at once with the pending scores, so the trainer
  (`pec.scoring.Scorer` with `--train.overlap_scoring`) keeps sampling and scoring while they are in flight;
- each request has one deadline for all of it (`--reward_http.timeout`, default 60 s): connecting,
  sending, the server's scoring and reading the whole answer. A watchdog shuts the socket down at the
  deadline, so a server that trickles its answer byte by byte fails then; a per-read socket timeout (all
  that urllib, requests and httpx's sync client offer) restarts on every byte and never would;
- failures to connect, timeouts and 5xx answers are retried (`--reward_http.retries`, default 3, with
  exponential backoff from 1 s); a 4xx is the server refusing the request, never retried, and its
  `{"error": ...}` text is shown;
- the answer must be a JSON list of finite numbers (not booleans or strings), one per image: anything
  else is a ValueError quoting what came back, so a run never trains on garbage;
- `--reward_http.token` (or the environment variable PEC_REWARD_TOKEN) is sent as
  `Authorization: Bearer TOKEN` to a server started with `--token`.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import io
import json
import math
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import torch

from pec.cli import one_line
from pec.perceptual.backbones import check_real_images
from pec.rewards.base import ImageReward
from pec.rewards.digit import check_prompts
from pec.video import check_videos, is_video

TIMEOUT_S = 60.0
RETRIES = 3
IN_FLIGHT = 4
BACKOFF_S = 1.0
TOKEN_ENV = "PEC_REWARD_TOKEN"
MAX_ANSWER_BYTES = 8 * 2**20  # scores (and error texts) are small; a bigger answer is not one
QUOTE_CHARS = 120
LIMIT = 300  # characters of an error text kept on its one line


def encode_png(image: torch.Tensor) -> str:
    """Base64 PNG of one image (C, H, W) in [0, 1] (8-bit, grey or RGB)."""
    from PIL import Image

    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png(data: str | bytes) -> torch.Tensor:
    """Inverse of `encode_png` (base64 text, or the PNG's bytes): (C, H, W) float32 in [0, 1].

    Only PNG is parsed. Anything Pillow cannot decode, and a decompression bomb by Pillow's own limit
    (`PIL.Image.MAX_IMAGE_PIXELS`), is a one-line ValueError.
    """
    import numpy as np
    from PIL import Image

    try:
        raw = base64.b64decode(data, validate=True) if isinstance(data, str) else data
        image = Image.open(io.BytesIO(raw), formats=["PNG"])
        array = np.asarray(image.convert("L" if image.mode == "L" else "RGB"), dtype=np.float32) / 255
    except Image.DecompressionBombError as err:
        raise ValueError(f"a decompression bomb ({err})") from None
    except binascii.Error as err:
        raise ValueError(f"not base64 ({err})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # what Pillow raises for a broken file
        raise ValueError(f"not a valid PNG ({type(err).__name__}: {one_line(err, LIMIT)})") from None
    tensor = torch.from_numpy(array.copy())
    return tensor[None] if tensor.dim() == 2 else tensor.permute(2, 0, 1)


def resolve_token(token: str | None) -> str | None:
    """`token`, else the environment variable PEC_REWARD_TOKEN; None when neither is set (empty = not set)."""
    return token or os.environ.get(TOKEN_ENV) or None


def _quote(data: bytes) -> str:
    """What a server sent, quoted on one line and cut short."""
    text = data[:QUOTE_CHARS * 4].decode("utf-8", "replace")
    return repr(text[:QUOTE_CHARS]) + ("..." if len(data) > QUOTE_CHARS or len(text) > QUOTE_CHARS else "")


class Answer(NamedTuple):
    """An HTTP answer: status code and body."""

    status: int
    body: bytes


def request(url: str, *, body: bytes | None = None, token: str | None = None,
            timeout: float = TIMEOUT_S) -> Answer:
    """One HTTP request (POST of JSON `body`, or GET without one) that ends within `timeout` seconds.

    A watchdog timer shuts the socket down at the deadline, which wakes any blocked read or write, so the
    deadline covers connecting, sending, waiting and reading the whole answer however the server trickles
    it. Raises TimeoutError at the deadline, ConnectionError for any other network or HTTP protocol failure
    (both one line); an answer over MAX_ANSWER_BYTES is a ConnectionError too.
    """
    parts = urllib.parse.urlsplit(url)
    connection_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_type(parts.hostname or "", parts.port, timeout=timeout)
    fired = threading.Event()

    def expire() -> None:
        fired.set()
        sock = connection.sock  # None while connecting: connect() is bounded by `timeout` and checks `fired`
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    watchdog = threading.Timer(timeout, expire)
    watchdog.daemon = True
    watchdog.start()
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        connection.connect()
        if fired.is_set():
            raise TimeoutError
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection.request("POST" if body is not None else "GET", target, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read(MAX_ANSWER_BYTES + 1)
    except (OSError, http.client.HTTPException) as err:
        if fired.is_set() or isinstance(err, TimeoutError):
            raise TimeoutError(f"no complete answer within {timeout:g} s") from None
        raise ConnectionError(one_line(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__, LIMIT)) from None
    finally:
        watchdog.cancel()
        connection.close()
    if len(data) > MAX_ANSWER_BYTES:
        raise ConnectionError(f"an answer over {MAX_ANSWER_BYTES} bytes")
    return Answer(response.status, data)


def error_text(answer: Answer) -> str:
    """The reason a server gave with an error status: its JSON `error`, else its body quoted."""
    try:
        payload = json.loads(answer.body)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), str):
        return f"HTTP {answer.status}: {one_line(payload['error'], LIMIT)}"
    return f"HTTP {answer.status}: {_quote(answer.body)}"


def _is_finite_number(value: object) -> bool:
    if type(value) not in (int, float):  # not bool (an int subclass), not str
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def parse_scores(data: bytes, count: int, url: str) -> torch.Tensor:
    """(count,) float32 scores from a server's answer `{"scores": [count finite numbers]}`; anything else is a
    one-line ValueError quoting what came back."""
    try:
        scores = json.loads(data).get("scores")
    except (ValueError, AttributeError, RecursionError):  # not JSON (or not UTF-8), not an object, too deep
        scores = None
    if not isinstance(scores, list) or len(scores) != count or not all(map(_is_finite_number, scores)):
        raise ValueError(f"reward server {url} (--paths.reward_url) answered {_quote(data)} for {count} images; it "
                         f"must answer {{\"scores\": [{count} finite numbers]}}")
    return torch.tensor([float(s) for s in scores], dtype=torch.float32)


def check_server(url: str | None, timeout: float = 10.0, token: str | None = None,
                 check_token: bool = False) -> None:
    """ValueError unless `url` is an http(s) URL whose server answers a GET (any HTTP status counts; with
    `check_token`, a 401 does not: the server refused `token`)."""
    if not url or not url.startswith(("http://", "https://")):
        raise ValueError(f"--paths.reward_url must be the http(s) URL of a reward server for reward 'http' "
                         f"(start one with `python -m pec.rewards.serve NAME --port PORT`), got {url!r}")
    try:
        answer = request(url, token=token, timeout=timeout)
    except (TimeoutError, ConnectionError) as err:
        raise ValueError(f"--paths.reward_url: the reward server at {url} does not answer ({err}); start it "
                         f"(`python -m pec.rewards.serve NAME --port PORT`) or fix the URL") from None
    if check_token and answer.status == 401:
        given = "refused the token of --reward_http.token / " + TOKEN_ENV if token else "requires a token"
        raise ValueError(f"--reward_http.token: the reward server at {url} {given} ({error_text(answer)}); give "
                         f"the token it was started with (`serve --token`) with --reward_http.token or {TOKEN_ENV}")


def server_needs_video(url: str | None, token: str | None = None, timeout: float = 10.0) -> bool:
    """Whether the reward server at `url` scores videos only: its health check's `"video": true`. False when
    it does not say so, or gives no such answer (`check_server` reports a server that does not answer)."""
    if not url or not url.startswith(("http://", "https://")):
        return False
    try:
        answer = request(url, token=token, timeout=timeout)
        payload = json.loads(answer.body) if answer.status == 200 else None
    except (TimeoutError, ConnectionError, ValueError, RecursionError):
        return False
    return isinstance(payload, dict) and payload.get("video") is True


class HttpReward(ImageReward):
    """Scores from a reward server (see the module docstring): of images (B, C, H, W), or of videos
    (B, F, C, H, W), sent as `"videos"`."""

    takes_video = True

    def __init__(self, url: str, *, batch_size: int = 32, timeout: float = TIMEOUT_S, retries: int = RETRIES,
                 backoff: float = BACKOFF_S, token: str | None = None, in_flight: int = IN_FLIGHT) -> None:
        super().__init__()
        checks = {"batch_size": (batch_size, type(batch_size) is int and batch_size >= 1, "an integer >= 1"),
                  "--reward_http.timeout": (timeout, _is_finite_number(timeout) and timeout > 0,
                                            "a finite number of seconds > 0"),
                  "--reward_http.retries": (retries, type(retries) is int and retries >= 0, "an integer >= 0"),
                  "backoff": (backoff, _is_finite_number(backoff) and backoff >= 0, "a finite number >= 0"),
                  "--reward_http.in_flight": (in_flight, type(in_flight) is int and in_flight >= 1, "an integer >= 1")}
        for name, (value, ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {value!r}")
        self.url, self.batch_size, self.timeout, self.retries, self.backoff = url, batch_size, timeout, retries, backoff
        self.token, self.in_flight = token, in_flight
        self._pool: ThreadPoolExecutor | None = None  # the requests' threads, started by the first `submit`
        self._pool_lock = threading.Lock()

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(B,) scores of images (B, C, H, W), or of videos (B, F, C, H, W), as many a request as hold
        `batch_size` frames (at least one): `submit`, then wait."""
        return self.submit(images, prompts).result()

    def submit(self, images: torch.Tensor, prompts: Sequence[str]) -> PendingScores:
        """Send the requests of `forward` and return at once: the scores come with `.result()`. Inputs are checked
        (and copied to the CPU) here; the requests go `in_flight` at a time from worker threads, which encode
        the PNGs. A failed request raises its error from `.result()`."""
        if is_video(images):
            check_videos(images)
            per = max(1, self.batch_size // images.shape[1])
        else:
            check_real_images(images)
            per = self.batch_size
        check_prompts(images, prompts)
        prompts, host = list(prompts), images.detach().cpu()
        pool = self._requests_pool()
        parts = [pool.submit(self.score, host[i:i + per], prompts[i:i + per]) for i in range(0, host.shape[0], per)]
        return PendingScores(parts, images.device)

    def _requests_pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.in_flight, thread_name_prefix="pec-reward-http")
            return self._pool

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(b,) scores of a batch of images, or of videos (one request)."""
        if is_video(images):
            payload = {"prompts": prompts, "videos": [[encode_png(frame) for frame in clip] for clip in images]}
        else:
            payload = {"prompts": prompts, "images": [encode_png(im) for im in images]}
        return parse_scores(self._post(json.dumps(payload).encode()), len(prompts), self.url)

    def _post(self, body: bytes) -> bytes:
        """The body of the server's 200 answer to `body`, retrying failures to connect, timeouts and 5xx."""
        tries, last, down = self.retries + 1, "", False
        for attempt in range(tries):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                answer = request(self.url, body=body, token=self.token, timeout=self.timeout)
            except TimeoutError:
                last, down = f"no complete answer within --reward_http.timeout {self.timeout:g} s", False
                continue
            except ConnectionError as err:
                last, down = str(err), True
                continue
            if answer.status == 200:
                return answer.body
            if answer.status < 500:  # the server refused this request: retrying cannot help
                hint = (f"; give the server's token with --reward_http.token or {TOKEN_ENV}"
                        if answer.status == 401 else "")
                raise ValueError(f"reward server {self.url} (--paths.reward_url) refused the request "
                                 f"({error_text(answer)}){hint}")
            last, down = error_text(answer), False
        hint = "; is `python -m pec.rewards.serve` running there?" if down else ""
        raise ConnectionError(f"reward server {self.url} (--paths.reward_url) did not answer after {tries} tries "
                              f"({last}){hint}")


class PendingScores:
    """The scores of `HttpReward.submit`: `result()` waits for every request and returns the (B,) float32 scores
    in order, on the images' device."""

    def __init__(self, parts: list[Future], device: torch.device) -> None:
        self.parts, self.device = parts, device

    def result(self) -> torch.Tensor:
        """The scores (raises the first failed request's error)."""
        return torch.cat([part.result() for part in self.parts]).to(self.device)


def build_http_reward(device: str | torch.device = "cpu", directory: object = None, paths: object = None,
                      http: object = None) -> HttpReward:
    """The http reward on --paths.reward_url, with the client settings of `http` (a
    `pec.config.RewardHttpConfig`; None = defaults); the server is checked to answer and accept the token."""
    url = getattr(paths, "reward_url", None)
    token = resolve_token(getattr(http, "token", None))
    check_server(url, token=token, check_token=True)
    return HttpReward(url, timeout=getattr(http, "timeout", TIMEOUT_S), retries=getattr(http, "retries", RETRIES),
                      token=token, in_flight=getattr(http, "in_flight", IN_FLIGHT))
