"""`python -m pec.rewards.serve NAME [--port 8000] [--host 127.0.0.1] [--token TOKEN] [--paths.X PATH ...]`:
serve any registered reward (or a weighted spec such as `pickscore:1,jpeg:0.1`) over HTTP with the
protocol of `pec.rewards.http`: POST `{"prompts": [...], "images": [base64 PNG, ...]}` -> `{"scores": [...]}`,
or `{"prompts": [...], "videos": [[base64 PNG frame, ...], ...]}` (each video its frames in time order; the
videos of a request of one size and frame count) -> one score per video: a reward that scores videos
(`takes_video`) gets them as clips (N, F, C, H, W), an image reward is averaged over every frame sent
(`pec.rewards.VideoReward`). A GET answers `{"reward": NAME}` (a health check), with `"video": true` when the
reward scores videos only (`needs_video`; such a server refuses "images"). Prints `serving NAME on
http://HOST:PORT/` once ready.

Stack: uvicorn (the ASGI server) running a starlette app. uvicorn does the HTTP parsing, keep-alive
timeouts and the bound on concurrent connections (`--max-connections`, beyond which it answers 503);
starlette hands the app the request body as a stream, so the app enforces its own body limit while
reading (uvicorn has none) and its deadline covers the reading; scoring runs in a worker thread, so the
event loop keeps answering (health checks, refusals) while a batch is scored.

Limits, each with a safe default:
- `--max-body-mb` (64): a bigger body is refused with 413 while it is read (or at once from its
  Content-Length);
- `--max-pixels` (64 million): the pixels of all images of a request (of every frame of every video),
  counted from the PNG headers before anything is decoded; more is a 400. Pillow's own
  decompression-bomb check is a 400 as well;
- `--deadline` (120 s): for the whole request, reading, decoding and scoring: a client that sends less
  than its Content-Length or trickles its body gets 408 and is dropped; one that trickles its request
  line and headers is disconnected (uvicorn has no timeout of its own there); a batch still scoring at
  the deadline is answered 503. Scoring is one request at a time (a lock), decoding included, so memory
  stays bounded by one request's images;
- `--token` (or the environment variable PEC_REWARD_TOKEN): every request must carry
  `Authorization: Bearer TOKEN` or gets 401 (compared in constant time). Required when `--host` is not a
  loopback address. The server speaks plain HTTP: beyond a trusted network, put it behind an SSH tunnel or
  a TLS reverse proxy, or the token crosses the network in clear.
Anything that is not a valid request (not JSON, missing keys, wrong types, non-string prompts, not a PNG,
a corrupt PNG or a bomb, as many prompts as images not given) gets a 4xx with a one-line
`{"error": "..."}` and one warning line in the server's log, never a traceback.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import functools
import hmac
import ipaddress
import json
import logging
import math
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import h11
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from pec.cli import command_parser, expected_errors, fail, one_line, signal_exit_code
from pec.rewards.http import LIMIT, TOKEN_ENV, decode_png, resolve_token
from pec.rewards import on_videos
from pec.rewards.video import needs_video

PROG = "pec.rewards.serve"
MAX_BODY_MB = 64.0
MAX_PIXELS = 64_000_000
DEADLINE_S = 120.0
MAX_CONNECTIONS = 8
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LOG = logging.getLogger("uvicorn.error")


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may cost (see the module docstring); checked to be positive and finite."""

    max_body_mb: float = MAX_BODY_MB
    max_pixels: int = MAX_PIXELS
    deadline: float = DEADLINE_S
    max_connections: int = MAX_CONNECTIONS

    def __post_init__(self) -> None:
        for name, value, integer in (("--max-body-mb", self.max_body_mb, False), ("--max-pixels", self.max_pixels, True),
                                     ("--deadline", self.deadline, False),
                                     ("--max-connections", self.max_connections, True)):
            if type(value) not in ((int,) if integer else (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be {'an integer' if integer else 'a finite number'} > 0, got {value!r}")

    @property
    def max_body_bytes(self) -> int:
        """--max-body-mb in bytes."""
        return int(self.max_body_mb * 2**20)


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG read from its IHDR chunk (the 24 bytes after the signature), without decoding
    anything; ValueError if `data` does not start as a PNG does."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG (no PNG signature)")
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ValueError("not a valid PNG (no IHDR header)")
    width, height = struct.unpack(">II", data[16:24])
    if not width or not height:
        raise ValueError(f"not a valid PNG (its header says {width}x{height})")
    return width, height


def count_pixels(pngs: Sequence[bytes], key: str = '"images"') -> int:
    """Total pixels of the PNG payloads `pngs` (images, or every frame of a video), from their headers only.
    A payload that is not a PNG is a 400 RequestError naming `key` (e.g. '"videos"[3]') and its index."""
    total = 0
    for i, data in enumerate(pngs):
        try:
            width, height = png_size(data)
        except ValueError as err:
            raise RequestError(400, f"{key}[{i}] is {err}") from None
        total += width * height
    return total


def parse_request(body: bytes) -> tuple[list[str], list[bytes] | list[list[bytes]], str]:
    """The prompts, the PNG bytes and their key of a request body: `{"prompts": [str, ...], "images": [base64 PNG,
    ...]}` gives the images' PNGs and "images"; `{"prompts": [...], "videos": [[base64 PNG, ...], ...]}` each
    video's frames and "videos". Anything else is a 400 RequestError saying what is wrong."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise RequestError(400, f"the body is not JSON ({type(err).__name__}: {one_line(err, 200)})") from None
    if not isinstance(request, dict):
        raise RequestError(400, f'the body must be a JSON object {{"prompts": [...], "images": [...]}} (or '
                                f'"videos"), got a {type(request).__name__}')
    if "images" in request and "videos" in request:
        raise RequestError(400, 'give "images" or "videos", not both')
    key = "videos" if "videos" in request else "images"
    for name, what in (("prompts", "strings"), (key, "base64 PNG strings" if key == "images" else
                                                 "videos, each the list of its frames as base64 PNG strings")):
        if name not in request:
            raise RequestError(400, f'missing key "{name}" (a list of {what})')
        if not isinstance(request[name], list):
            raise RequestError(400, f'"{name}" must be a list of {what}, got a {type(request[name]).__name__}')
    prompts, samples = request["prompts"], request[key]
    # Every string of the request, with its place: "images"[i], or "videos"[i][j] for frame j of video i.
    strings = [("prompts", i, None, item) for i, item in enumerate(prompts)]
    for i, item in enumerate(samples):
        if key == "images":
            strings.append((key, i, None, item))
        elif not isinstance(item, list) or not item:
            got = "no frames" if isinstance(item, list) else f"a {type(item).__name__}"
            raise RequestError(400, f'"videos"[{i}] must be a non-empty list of its frames (base64 PNG strings), '
                                    f"got {got}")
        else:
            strings += [(key, i, j, frame) for j, frame in enumerate(item)]
    for name, i, j, item in strings:
        if not isinstance(item, str):
            raise RequestError(400, f'{_place(name, i, j)} must be a string, got a {type(item).__name__}')
    if not samples:
        raise RequestError(400, f'"{key}" is empty')
    if len(prompts) != len(samples):
        raise RequestError(400, f'"prompts" has {len(prompts)} entries but "{key}" has {len(samples)}: give one '
                                f"prompt per {key[:-1]}")
    pngs: dict[tuple[int, int | None], bytes] = {}
    for name, i, j, text in strings[len(prompts):]:
        try:
            pngs[i, j] = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as err:  # ValueError: non-ASCII text
            raise RequestError(400, f"{_place(name, i, j)} is not base64 ({err})") from None
    if key == "images":
        return prompts, [pngs[i, None] for i in range(len(samples))], key
    return prompts, [[pngs[i, j] for j in range(len(video))] for i, video in enumerate(samples)], key


def _place(key: str, i: int, j: int | None) -> str:
    """Where a string of a request is: "images"[i], or "videos"[i][j] for frame j of video i."""
    return f'"{key}"[{i}]' + ("" if j is None else f"[{j}]")


class RewardApp:
    """The starlette app that scores with `reward` under `limits` (see the module docstring)."""

    def __init__(self, reward: torch.nn.Module, name: str, *, device: str | torch.device = "cpu",
                 token: str | None = None, limits: Limits = Limits()) -> None:
        self.reward, self.name, self.device, self.token, self.limits = reward, name, device, token, limits
        self.video_reward = on_videos(reward, 0)  # videos: each frame sent (an image reward's mean over them)
        self.lock = threading.Lock()  # one scoring at a time, held by the worker thread that scores
        # Workers of scoring jobs; one abandoned at the deadline keeps its worker until it ends (bounded:
        # it gives up waiting for the lock at its deadline and checks the deadline while decoding).
        self.executor = ThreadPoolExecutor(max_workers=limits.max_connections, thread_name_prefix="pec-reward")
        self.app = Starlette(routes=[Route("/{path:path}", self.endpoint, methods=["GET", "POST"])])

    def close(self) -> None:
        """Stop the worker threads (a scoring in progress ends first)."""
        self.executor.shutdown(wait=True, cancel_futures=True)

    def authorized(self, request: Request) -> bool:
        """Whether `request` carries `Authorization: Bearer TOKEN` (always, without a token)."""
        if self.token is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"),
                                                                   self.token.encode())

    async def endpoint(self, request: Request) -> Response:
        """GET: the health check; POST: score a request within the deadline."""
        if not self.authorized(request):
            return refuse(request, RequestError(401, "missing or wrong token: send the header "
                                                     "`Authorization: Bearer TOKEN` of the server's --token"))
        if request.method == "GET":
            return JSONResponse({"reward": self.name, **({"video": True} if needs_video(self.reward) else {})})
        deadline = time.monotonic() + self.limits.deadline
        try:
            body = await asyncio.wait_for(self.read_body(request), self.limits.deadline)
            job = asyncio.get_running_loop().run_in_executor(self.executor, self.score, body, deadline)
            try:
                scores = await asyncio.wait_for(job, max(0.0, deadline - time.monotonic()))
            except (asyncio.TimeoutError, TimeoutError):  # the same class from Python 3.11 on
                raise RequestError(503, f"scoring did not finish within --deadline {self.limits.deadline:g} s (the "
                                        f"server is busy, or the batch is too big for it)") from None
        except asyncio.TimeoutError:
            return refuse(request, RequestError(408, f"the request body did not arrive within --deadline "
                                                     f"{self.limits.deadline:g} s"))
        except RequestError as err:
            return refuse(request, err)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is there to read it
        except Exception as err:  # a failure of the reward or the server, not of the request: logged in full
            LOG.exception("scoring failed")
            return JSONResponse({"error": f"scoring failed: {type(err).__name__}: {one_line(err, LIMIT)}"},
                                status_code=500)
        return JSONResponse({"scores": scores})

    async def read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it is known to exceed --max-body-mb."""
        limit = self.limits.max_body_bytes
        too_big = f"the body is over the limit of {limit} bytes (--max-body-mb {self.limits.max_body_mb:g})"
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestError(413, too_big)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, too_big)
            chunks.append(chunk)
        return b"".join(chunks)

    def score(self, body: bytes, deadline: float) -> list[float]:
        """Scores of a request body (in a worker thread): parse, count pixels (every frame of every video), then
        decode and score under the lock. RequestError for a bad request; TimeoutError past `deadline` (nobody
        waits for the answer then)."""
        prompts, pngs, key = parse_request(body)
        videos = key == "videos"
        if not videos and needs_video(self.reward):
            raise RequestError(400, f'reward {self.name!r} scores videos only: send "videos" (each the list of its '
                                    f'frames), not "images"')
        pixels = (sum(count_pixels(frames, f'"videos"[{i}]') for i, frames in enumerate(pngs)) if videos
                  else count_pixels(pngs))
        if pixels > self.limits.max_pixels:
            raise RequestError(400, f"the {key} hold {pixels} pixels, over the limit of {self.limits.max_pixels} "
                                    f"(--max-pixels); send fewer or smaller {key} a request")
        if not self.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError
        try:
            images = decode_videos(pngs, deadline) if videos else decode_images(pngs, deadline)
            reward = self.video_reward if videos else self.reward
            try:
                with torch.no_grad():
                    scores = reward(images.to(self.device), prompts)
            except (ValueError, TypeError) as err:  # the reward's own input checks
                raise RequestError(400, f"reward {self.name!r} refused the images: {one_line(err, LIMIT)}") from None
        finally:
            self.lock.release()
        scores = scores.detach().float().cpu()
        if scores.shape != (len(prompts),) or not torch.isfinite(scores).all():
            raise RequestError(500, f"reward {self.name!r} gave {scores.tolist()!r:.200} for {len(prompts)} images, "
                                    f"not one finite score each")
        return scores.tolist()


def decode_images(pngs: Sequence[bytes], deadline: float = math.inf, key: str = '"images"') -> torch.Tensor:
    """(N, C, H, W) float32 images of PNG payloads of one size and channel count; a 400 RequestError (naming
    `key` and the index) for a corrupt PNG, a bomb or mixed sizes; TimeoutError once `deadline`
    (time.monotonic) has passed."""
    images = []
    for i, data in enumerate(pngs):
        if time.monotonic() > deadline:
            raise TimeoutError
        try:
            images.append(decode_png(data))
        except ValueError as err:
            raise RequestError(400, f"{key}[{i}] is {err}") from None
        if images[i].shape != images[0].shape:
            raise RequestError(400, f"{key}[{i}] is {_shape(images[i])} but {key}[0] is {_shape(images[0])}: "
                                    f"the images of a request must have one size and channel count")
    return torch.stack(images)


def decode_videos(videos: Sequence[Sequence[bytes]], deadline: float = math.inf) -> torch.Tensor:
    """(N, F, C, H, W) float32 videos of each video's PNG frames (`decode_images` per video), all of one frame
    count, size and channel count; a 400 RequestError naming the video otherwise."""
    clips = []
    for i, frames in enumerate(videos):
        clips.append(decode_images(frames, deadline, key=f'"videos"[{i}]'))
        if clips[i].shape != clips[0].shape:
            first, this = (f"{c.shape[0]} frames of {_shape(c[0])}" for c in (clips[0], clips[i]))
            raise RequestError(400, f'"videos"[{i}] has {this} but "videos"[0] has {first}: the videos of a '
                                    f"request must have one frame count, size and channel count")
    return torch.stack(clips)


def _shape(image: torch.Tensor) -> str:
    channels, height, width = image.shape
    return f"{width}x{height} {'grey' if channels == 1 else 'RGB'}"


def refuse(request: Request, err: RequestError) -> JSONResponse:
    """The one-line JSON answer to a refused request (and one warning line in the log).

    After a 408 the connection is closed. Otherwise uvicorn reads and discards the rest of an unread body
    (`_HeadDeadlineProtocol` bounds that by the deadline) before it closes or reuses the connection: closing
    with unread data would reset it, and the client could lose the answer while it is still sending."""
    client = f"{request.client.host}:{request.client.port}" if request.client else "?"
    LOG.warning("refused %s from %s: %d %s", request.method, client, err.status, err)
    headers = {"Connection": "close"} if err.status == 408 else {}
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"error": str(err)}, status_code=err.status, headers=headers)


class _HeadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol plus what uvicorn lacks: a connection is closed `head_deadline` seconds after it
    opened, or after its last answer, if by then the client has not sent a complete request line and
    headers, or is still sending a body that was answered (refused) without being read."""

    def __init__(self, *args: object, head_deadline: float, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.head_deadline = head_deadline
        self.head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        self.head_timer = self.loop.call_later(self.head_deadline, self._expire)

    def _expire(self) -> None:
        idle = self.conn.their_state is h11.IDLE
        lingering = self.conn.our_state is h11.DONE and self.conn.their_state is h11.SEND_BODY
        if (idle or lingering) and not self.transport.is_closing():
            self.transport.close()


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address ('localhost', 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def check_access(host: str, token: str | None) -> None:
    """ValueError unless a server on `host` is safe to start with `token`: a token of visible ASCII without
    spaces, and one at all when `host` is not a loopback address."""
    if token is not None and not (token.isascii() and token.isprintable() and " " not in token):
        raise ValueError("--token must be visible ASCII characters without spaces")
    if token is None and not is_loopback(host):
        raise ValueError(f"--host {host} is not a loopback address: give --token TOKEN (or set {TOKEN_ENV}) so "
                         f"that only clients with the token are scored")


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) (port 0 = any free port); a ValueError naming the options if it cannot."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err})") from None
    return sock


class RewardServer:
    """A reward server running in a background thread (see `start_server`); `stop()` ends it."""

    def __init__(self, app: RewardApp, server: uvicorn.Server, sock: socket.socket) -> None:
        self.app, self.server, self.socket = app, server, sock
        host, self.port = sock.getsockname()[:2]
        self.host = f"[{host}]" if ":" in host else host
        self.url = f"http://{self.host}:{self.port}/"
        self.thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="pec-reward-server",
                                       daemon=True)

    def running(self) -> bool:
        """Whether the server thread is alive."""
        return self.thread.is_alive()

    def stop(self) -> None:
        """Stop accepting, finish (up to 5 s) the requests in progress, and free the port and the threads."""
        self.server.should_exit = True
        self.thread.join()
        self.app.close()
        self.socket.close()

    def __enter__(self) -> RewardServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(reward: torch.nn.Module, name: str, host: str = "127.0.0.1", port: int = 0, *,
                 device: str | torch.device = "cpu", token: str | None = None,
                 limits: Limits = Limits()) -> RewardServer:
    """Serve `reward` as `name` on (host, port) (port 0 = any free port) in a background thread; returns once it
    accepts connections. ValueError if `host` is not loopback and there is no `token`, or it cannot listen."""
    check_access(host, token)
    app = RewardApp(reward, name, device=device, token=token, limits=limits)
    sock = _listen(host, port)
    protocol = functools.partial(_HeadDeadlineProtocol, head_deadline=limits.deadline)
    config = uvicorn.Config(app.app, http=protocol, ws="none", lifespan="off", loop="asyncio", log_config=None,
                            log_level="warning", access_log=False, limit_concurrency=limits.max_connections,
                            timeout_graceful_shutdown=5)
    handle = RewardServer(app, uvicorn.Server(config), sock)
    handle.thread.start()
    while not handle.server.started:
        if not handle.thread.is_alive():
            handle.stop()
            raise RuntimeError(f"the reward server on {handle.url} did not start")
        time.sleep(0.01)
    return handle


def _positive(kind: type) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} > 0, got "
                                             f"{text!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
        return value
    return parse


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: build the reward from the command line (`--paths.*` as in pec.train) and serve it until
    SIGINT or SIGTERM."""
    from pec.config import PathsConfig

    parser = command_parser("python -m pec.rewards.serve", __doc__)
    parser.add_argument("name", help="a registered reward name or a weighted spec (name:weight,...)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; any but a loopback address "
                                                            "needs --token (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on; 0 = any free port (default: 8000)")
    parser.add_argument("--token", default=None, help=f"bearer token every request must carry (`Authorization: "
                                                      f"Bearer TOKEN`); default: the environment variable "
                                                      f"{TOKEN_ENV}, else none (then --host must be loopback)")
    parser.add_argument("--max-body-mb", type=_positive(float), default=MAX_BODY_MB,
                        help=f"largest request body in MiB; more is a 413 (default: {MAX_BODY_MB:g})")
    parser.add_argument("--max-pixels", type=_positive(int), default=MAX_PIXELS,
                        help=f"most pixels of all images of a request, read from the PNG headers before decoding; "
                             f"more is a 400 (default: {MAX_PIXELS})")
    parser.add_argument("--deadline", type=_positive(float), default=DEADLINE_S,
                        help=f"seconds a request may take in all, reading, decoding and scoring (default: "
                             f"{DEADLINE_S:g})")
    parser.add_argument("--max-connections", type=_positive(int), default=MAX_CONNECTIONS,
                        help=f"most open connections; more get 503 (default: {MAX_CONNECTIONS})")
    parser.add_argument("--device", default="auto", help="torch device; auto = cuda if available (default: auto)")
    parser.add_argument("--assets", default=None, help="the embedded world's assets folder (as pec.train --assets)")
    defaults = PathsConfig()
    for f in dataclasses.fields(PathsConfig):
        parser.add_argument(f"--paths.{f.name}", dest=f.name, default=getattr(defaults, f.name),
                            help=f.metadata["help"])
    args = parser.parse_args(argv)
    paths = PathsConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PathsConfig)})
    token = resolve_token(args.token)
    with expected_errors(PROG, before_work=True):
        check_access(args.host, token)  # before anything heavy is imported or loaded
        from pec.policy import resolve_device
        from pec.rewards import build_reward

        limits = Limits(args.max_body_mb, args.max_pixels, args.deadline, args.max_connections)
        device = resolve_device(args.device)
        reward = build_reward(args.name, device=device, directory=args.assets, paths=paths)
    with expected_errors(PROG):  # binding the port (in use, no permission) is a failure of the run
        server = start_server(reward, args.name, args.host, args.port, device=device, token=token, limits=limits)
    stopped_by: list[int] = []
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopped_by.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    print(f"serving {args.name} on {server.url}", flush=True)
    try:
        while server.running() and not stop.wait(0.5):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped_by:
        raise SystemExit(signal_exit_code(stopped_by[0]))
    if not stop.is_set():
        fail(PROG, f"the server on {server.url} stopped unexpectedly")


if __name__ == "__main__":
    main()
