"""Bad answers to the `http` reward's client, over loopback: scores that are a string, booleans, NaN or of the
wrong length stop `pec.train` with one line before any step is trained; a 4xx is not retried and its reason
is shown, a 5xx is retried, a wrong token is caught before the run starts, and a server that trickles its
answer fails at the client's deadline. `--reward_http.*` reaches the client from the command line."""
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from pec.config import PathsConfig
from pec.rewards import build_reward
from pec.rewards.http import HttpReward
from pec.rewards.serve import start_server
from pec.train import main as train_main


class FakeServer(ThreadingHTTPServer):
    """Answers every POST with `answer` (status, body) and counts the POSTs; a GET gets 200."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakeHandler)
        self.answer = (200, b"{}")
        self.posts = 0
        self.authorization = None
        self.url = f"http://127.0.0.1:{self.server_address[1]}/"


class FakeHandler(BaseHTTPRequestHandler):
    def _send(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        self._send(200, b'{"reward": "fake"}')

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.posts += 1
        self.server.authorization = self.headers.get("Authorization")
        self._send(*self.server.answer)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def fake():
    server = FakeServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture()
def reset(fake):
    fake.answer, fake.posts, fake.authorization = (200, b"{}"), 0, None
    return fake


def tiny_argv(world, run_dir, url, *extra):
    """pec.train on the tiny world (2 prompts x 3 samples, 2 denoising steps, 1 step) with the http reward."""
    return ["--device", "cpu", "--run-dir", str(run_dir), "--assets", str(world), "--model.path", str(world / "embedded"),
            "--sampling.prompts_per_step", "2", "--sampling.group_size", "3", "--sampling.num_steps", "2",
            "--train.steps", "1", "--train.micro_batch", "6", "--perceptual.k", "1", "--logging.tensorboard", "false",
            "--logging.grid_samples", "2", "--logging.progress", "false", "--reward", "http",
            "--paths.reward_url", url, *extra]


def failing_main(argv):
    """pec.train's main on `argv`, which must fail during the run: exit 1 with a one-line message."""
    with pytest.raises(SystemExit) as info:
        train_main(argv)
    assert info.value.code == 1
    message = str(info.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("answer, quoted", [
    (b'{"scores": "9999"}', "9999"),
    (b'{"scores": [true, true, true, true, true, true]}', "true"),
    (b'{"scores": [NaN, 1, 1, 1, 1, 1]}', "NaN"),
    (b'{"scores": [1.0, 2.0]}', "[1.0, 2.0]"),
    (b'{"scores": ["1", "2", "3", "4", "5", "6"]}', '"1"'),
    (b"<html>oops</html>", "oops"),
], ids=["string", "booleans", "nan", "wrong length", "numbers as strings", "not json"])
def test_garbage_scores_stop_the_run_before_it_trains(world, tmp_path, reset, answer, quoted):
    reset.answer = (200, answer)
    run = tmp_path / "run"
    message = failing_main(tiny_argv(world, run, reset.url, "--reward_http.token", "s3cret",
                                     "--reward_http.retries", "2"))
    assert quoted in message and "6 finite numbers" in message and "--paths.reward_url" in message
    assert reset.posts == 1  # a bad answer to a good request is not retried
    assert reset.authorization == "Bearer s3cret"  # --reward_http.token reached the client
    assert "s3cret" not in (run / "config.yaml").read_text()  # a secret never lands in the (shared) run folder
    metrics = run / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()  # no step was trained


def test_a_4xx_is_not_retried_and_its_reason_is_shown(reset):
    reset.answer = (400, b'{"error": "\\"images\\"[0] is not a PNG (no PNG signature)"}')
    reward = HttpReward(reset.url, retries=3, backoff=0)
    with pytest.raises(ValueError, match=r'refused the request \(HTTP 400: "images"\[0\] is not a PNG'):
        reward(torch.rand(2, 3, 8, 8), ["a", "b"])
    assert reset.posts == 1
    reset.answer = (401, b'{"error": "missing or wrong token"}')
    with pytest.raises(ValueError, match="HTTP 401: missing or wrong token.*--reward_http.token or PEC_REWARD_TOKEN"):
        reward(torch.rand(2, 3, 8, 8), ["a", "b"])
    assert reset.posts == 2


def test_a_5xx_is_retried_and_its_reason_is_shown(reset):
    reset.answer = (503, b'{"error": "scoring did not finish within --deadline 1 s"}')
    with pytest.raises(ConnectionError, match=r"did not answer after 3 tries \(HTTP 503: scoring did not finish"):
        HttpReward(reset.url, retries=2, backoff=0)(torch.rand(2, 3, 8, 8), ["a", "b"])
    assert reset.posts == 3


def test_a_wrong_token_fails_before_the_run(world, tmp_path, monkeypatch):
    monkeypatch.delenv("PEC_REWARD_TOKEN", raising=False)
    with start_server(build_reward("jpeg"), "jpeg", token="right") as server:
        for extra in ([], ["--reward_http.token", "wrong"]):
            with pytest.raises(SystemExit) as info:  # a ValueError while the trainer is built: one line
                train_main(tiny_argv(world, tmp_path / "run", server.url, *extra))
            assert "--reward_http.token: the reward server at" in str(info.value)
        monkeypatch.setenv("PEC_REWARD_TOKEN", "right")  # the variable stands in for the option
        reward = build_reward("http", paths=PathsConfig(reward_url=server.url))
        assert reward(torch.rand(2, 3, 8, 8), ["a", "b"]).shape == (2,)


class TricklingServer:
    """A raw socket server that answers a GET at once and a POST one byte every 0.2 s (a valid answer, for
    at most 10 s, so that a client without a total deadline fails the test instead of hanging it)."""

    ANSWER = b'HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n{"scores": [1.0, 2.0]}        '

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/"
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.answer, args=(conn,), daemon=True).start()

    def answer(self, conn):
        with conn:
            try:
                if conn.recv(65536).startswith(b"GET"):
                    conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}')
                    return
                for byte in self.ANSWER[:50]:
                    conn.sendall(bytes([byte]))
                    time.sleep(0.2)
            except OSError:
                pass


def test_a_trickling_server_fails_at_the_deadline(world, tmp_path):
    server = TricklingServer()
    try:
        start = time.monotonic()
        with pytest.raises(ConnectionError, match="no complete answer within --reward_http.timeout 1 s"):
            HttpReward(server.url, timeout=1, retries=0)(torch.rand(2, 3, 8, 8), ["a", "b"])
        assert time.monotonic() - start < 3
        # --reward_http.* reach the client from pec.train's command line.
        message = failing_main(tiny_argv(world, tmp_path / "run", server.url, "--reward_http.timeout", "1",
                                         "--reward_http.retries", "0"))
        assert "no complete answer within --reward_http.timeout 1 s" in message
    finally:
        server.sock.close()
