"""The reward server (`pec.rewards.serve`) over loopback, against hostile and careless clients: the body limit
(413, declared or streamed), the pixel limit read from PNG headers before any decoding, Pillow's bomb check,
one deadline for a request (a short, stalled or trickled body gets 408; a trickled request head is cut off;
a batch still scoring gets 503 while the health check keeps answering), bounded connections, 400 with one
line for every malformed request and no traceback in the log, the bearer token, and a non-loopback host
refused without one. One server serves the module, with small limits so that each case is cheap."""
import base64
import http.client
import io
import json
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from pec.rewards import serve
from pec.rewards.http import HttpReward, request
from pec.rewards.serve import Limits, start_server

TOKEN = "s3cret"
DEADLINE = 1.0
LIMITS = Limits(max_body_mb=1, max_pixels=100_000, deadline=DEADLINE, max_connections=4)
SLOW_S = 1.6  # longer than the deadline


class MeanReward(torch.nn.Module):
    """The mean pixel value; a prompt "slow" makes it sleep SLOW_S first."""

    def forward(self, images, prompts):
        if "slow" in prompts:
            time.sleep(SLOW_S)
        return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def server():
    with start_server(MeanReward(), "mean", token=TOKEN, limits=LIMITS) as handle:
        yield handle


def png(width, height, mode="L"):
    """Base64 PNG of a black image."""
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bilevel_bomb(side):
    """A valid 1-bit PNG of side x side black pixels: a few kB that decode to side**2 pixels (float32 RGB:
    12 bytes each)."""
    rows = (b"\x00" + bytes((side + 7) // 8)) * side
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    data = serve.PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")
    return base64.b64encode(data).decode()


def post(server, payload, token=TOKEN):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return request(server.url, body=body, token=token, timeout=10)


def error_of(answer):
    message = json.loads(answer.body)["error"]
    assert isinstance(message, str) and "\n" not in message
    return message


def raw_connection(server, head):
    sock = socket.create_connection((server.host, server.port), timeout=5)
    sock.sendall(head)
    return sock


def read_until_closed(sock, limit_s=5.0):
    """Everything the server sends until it closes the connection (a reset counts: a server that closes while
    the client still sends resets the connection), and when that happened."""
    data, start = b"", time.monotonic()
    while time.monotonic() - start < limit_s:
        try:
            part = sock.recv(65536)
        except ConnectionResetError:
            break
        if not part:
            break
        data += part
    return data, time.monotonic() - start


def test_scores_through_the_client_and_the_health_check(server):
    images, prompts = torch.rand(5, 3, 24, 16), [f"p{i}" for i in range(5)]
    reward = HttpReward(server.url, batch_size=2, token=TOKEN)  # three requests
    expected = ((images * 255).round() / 255).mean(dim=(1, 2, 3))
    assert torch.allclose(reward(images, prompts), expected, atol=1e-6)
    answer = request(server.url, token=TOKEN, timeout=5)
    assert answer.status == 200 and json.loads(answer.body) == {"reward": "mean"}


def test_requests_without_the_token_get_401(server):
    good = {"prompts": ["a"], "images": [png(4, 4)]}
    for token in (None, "wrong", TOKEN + "x"):
        for body in (None, json.dumps(good).encode()):
            answer = request(server.url, body=body, token=token, timeout=5)
            assert answer.status == 401 and "token" in error_of(answer)
    assert post(server, good).status == 200


@pytest.mark.parametrize("payload, reason", [
    (b"not json", "not JSON"),
    pytest.param(b"[" * 100_000, "not JSON", id="nested past the recursion limit"),
    (b"\xff\xfe", "not JSON"),
    ([1], "must be a JSON object"),
    ({"prompts": ["a"]}, 'missing key "images"'),
    ({"images": [png(4, 4)]}, 'missing key "prompts"'),
    ({"prompts": "a", "images": [png(4, 4)]}, '"prompts" must be a list'),
    ({"prompts": [1], "images": [png(4, 4)]}, '"prompts"[0] must be a string'),
    ({"prompts": ["a"], "images": png(4, 4)}, '"images" must be a list'),
    ({"prompts": ["a", "b"], "images": [png(4, 4), None]}, '"images"[1] must be a string'),
    ({"prompts": ["a", "b"], "images": [png(4, 4)]}, '"prompts" has 2 entries but "images" has 1'),
    ({"prompts": [], "images": []}, '"images" is empty'),
    ({"prompts": ["a"], "images": ["@@not base64@@"]}, '"images"[0] is not base64'),
    ({"prompts": ["a"], "images": [base64.b64encode(b"GIF89a" + bytes(40)).decode()]}, "not a PNG"),
    ({"prompts": ["a"], "images": [png(4, 4)[:40]]}, '"images"[0] is not a valid PNG'),  # header, no pixels
    ({"prompts": ["a", "b"], "images": [png(4, 4), png(4, 5)]}, "must have one size"),
    ({"prompts": ["a", "b"], "images": [png(4, 4), png(4, 4, "RGB")]}, "must have one size"),
])
def test_malformed_requests_get_400_with_one_line_and_no_traceback(server, caplog, payload, reason):
    answer = post(server, payload)
    assert answer.status == 400 and reason in error_of(answer)
    assert not [r for r in caplog.records if r.exc_info]
    assert post(server, {"prompts": ["a"], "images": [png(4, 4)]}).status == 200  # still serving


def test_pixels_of_all_images_are_counted_from_the_headers_before_decoding(server, monkeypatch):
    decoded = []
    monkeypatch.setattr(serve, "decode_png", lambda data: decoded.append(data) or torch.zeros(1, 1, 1))
    start = time.monotonic()
    answer = post(server, {"prompts": ["bomb"], "images": [bilevel_bomb(13000)]})  # 169 Mpx, 2 GB as float32
    assert answer.status == 400 and "169000000 pixels" in error_of(answer) and "--max-pixels" in error_of(answer)
    assert time.monotonic() - start < 1.0
    # Each image is under the limit, their sum is not.
    answer = post(server, {"prompts": ["a", "b"], "images": [png(300, 200), png(300, 200)]})
    assert answer.status == 400 and "120000 pixels" in error_of(answer)
    assert decoded == []


def test_pillow_decompression_bomb_is_a_400(server, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    answer = post(server, {"prompts": ["a"], "images": [png(30, 30)]})  # 900 > 2 x 100: Pillow's error
    assert answer.status == 400 and "decompression bomb" in error_of(answer)


def read_answer(sock):
    answer = http.client.HTTPResponse(sock)
    answer.begin()
    return answer.status, answer.read()


def test_bodies_over_the_limit_get_413(server):
    head = (f"POST / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {2**21}\r\n\r\n").encode()
    start = time.monotonic()
    with raw_connection(server, head) as sock:  # refused from the declared length, before reading the body
        status, body = read_answer(sock)
        assert status == 413 and b"--max-body-mb 1" in body and time.monotonic() - start < 0.5
        _, elapsed = read_until_closed(sock)  # the body it never sends is not waited for beyond the deadline
        assert elapsed < DEADLINE + 0.5
    chunked = f"POST / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n"
    with raw_connection(server, chunked.encode()) as sock:  # no length given: refused while reading
        piece = b"x" * 2**18
        for _ in range(5):
            sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
        status, body = read_answer(sock)
    assert status == 413 and b"--max-body-mb 1" in body
    # The client is told, not reset, while it still sends.
    with pytest.raises(ValueError, match=r"HTTP 413: the body is over the limit of 1048576 bytes \(--max-body-mb 1\)"):
        HttpReward(server.url, token=TOKEN, retries=0)(torch.rand(1, 3, 700, 700), ["big"])


def _trickle(sock, stop):
    try:
        while not stop.is_set():
            sock.sendall(b"x")
            stop.wait(0.2)
    except OSError:
        pass


def _slow_client(server, case):
    """What a client gets (data, seconds until the server closed) for a short, a trickled body, or a trickled
    request head."""
    head = f"POST / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 1000\r\n\r\nabc"
    if case == "trickled head":
        head = "POST / HTTP/1.1\r\nHost: x\r\nX-Slow: "
    stop = threading.Event()
    with raw_connection(server, head.encode()) as sock:
        if case != "short body":
            threading.Thread(target=_trickle, args=(sock, stop), daemon=True).start()
        try:
            return read_until_closed(sock)
        finally:
            stop.set()


def test_slow_clients_are_dropped_within_the_deadline(server):
    cases = ["short body", "trickled body", "trickled head"]
    with ThreadPoolExecutor(len(cases)) as pool:  # side by side: one deadline for all three
        results = dict(zip(cases, pool.map(lambda case: _slow_client(server, case), cases)))
    for case, (data, elapsed) in results.items():
        assert elapsed < DEADLINE + 1.0, case
        if case == "trickled head":
            assert data == b""  # no request yet: the connection is closed
        elif case == "trickled body" and not data:
            pass  # answered 408 and closed while bytes kept coming: the reset may beat the answer
        else:
            assert data.startswith(b"HTTP/1.1 408") and b"--deadline 1 s" in data, case
    assert request(server.url, token=TOKEN, timeout=5).status == 200


def test_health_check_answers_while_scoring_and_scoring_has_a_deadline(server):
    slow = {}
    thread = threading.Thread(target=lambda: slow.update(answer=post(server, {"prompts": ["slow"],
                                                                                 "images": [png(4, 4)]})))
    start = time.monotonic()
    thread.start()
    time.sleep(0.2)
    assert request(server.url, token=TOKEN, timeout=5).status == 200
    assert time.monotonic() - start < 0.6  # answered while the batch is being scored
    thread.join()
    assert slow["answer"].status == 503 and "--deadline 1 s" in error_of(slow["answer"])
    assert time.monotonic() - start < DEADLINE + 0.5
    # The abandoned batch keeps the scorer until it ends; the next request waits for it, within its deadline.
    assert post(server, {"prompts": ["a"], "images": [png(4, 4)]}).status == 200


def test_connections_are_bounded(server):
    idle = [socket.create_connection((server.host, server.port)) for _ in range(LIMITS.max_connections)]
    try:
        time.sleep(0.1)
        assert request(server.url, token=TOKEN, timeout=5).status == 503
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.1)
    assert request(server.url, token=TOKEN, timeout=5).status == 200


def test_a_host_beyond_loopback_needs_a_token(monkeypatch):
    monkeypatch.delenv("PEC_REWARD_TOKEN", raising=False)
    with pytest.raises(SystemExit) as info:
        serve.main(["jpeg", "--host", "0.0.0.0", "--port", "0", "--device", "cpu"])
    assert "--host 0.0.0.0 is not a loopback address: give --token" in str(info.value)
    assert "\n" not in str(info.value) and info.value.code == 2  # refused before any work
    with pytest.raises(ValueError, match="not a loopback address"):
        start_server(MeanReward(), "mean", host="0.0.0.0")
    monkeypatch.setenv("PEC_REWARD_TOKEN", "from-env")
    with start_server(MeanReward(), "mean", host="0.0.0.0", token=serve.resolve_token(None)) as handle:
        url = f"http://127.0.0.1:{handle.port}/"
        assert request(url, timeout=5).status == 401
        assert request(url, token="from-env", timeout=5).status == 200
    with pytest.raises(SystemExit) as info:  # argparse: exit 2 with the option named
        serve.main(["jpeg", "--deadline", "nan"])
    assert info.value.code == 2



def test_serve_exit_codes_follow_the_table(server):
    """An unknown reward is input refused (2); a port already taken fails the run (1); one line each."""
    with pytest.raises(SystemExit) as info:
        serve.main(["no_such_reward", "--port", "0", "--device", "cpu"])
    assert info.value.code == 2 and "no_such_reward" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(SystemExit) as info:
        serve.main(["jpeg", "--port", str(server.port), "--device", "cpu"])
    assert info.value.code == 1 and "\n" not in str(info.value)
