"""Rewards off the critical path (`--train.overlap_scoring`, issue 20): the sampler hands each micro-batch on
as soon as it is decoded, while the next one samples; the scorer's worker follows the caller's thread count;
the `http` reward's requests go out without waiting; and a run's metrics (and its use of the global random
stream) equal the serial path's bit for bit on the CPU, for the plain, guided, DPM-solved and `http` paths."""
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from pec.rewards.http import HttpReward
from pec.rewards.serve import start_server
from pec.sampling import sample
from pec.scoring import Scorer
from pec.trainer import Trainer

from _tiny_runs import tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import metrics_equivalence  # noqa: E402

PROMPTS = ["a handwritten 3", "the digit seven", "number 0"]


def _counting(model, monkeypatch):
    """Count the model's forwards: [n] grows by one per `velocity` call."""
    count = [0]
    forward = model.velocity

    def velocity(*args, **kwargs):
        count[0] += 1
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "velocity", velocity)
    return count


@pytest.mark.parametrize("decode_chunk, guided", [(1, False), (4, False), (None, False), (1, True)])
def test_each_micro_batch_is_handed_on_once_decoded_and_the_rollout_is_unchanged(model, monkeypatch,
                                                                                   decode_chunk, guided):
    monkeypatch.setattr(model, "decode_chunk", decode_chunk)
    forwards = _counting(model, monkeypatch)
    kwargs = dict(group_size=2, num_steps=3, seed=0, batch_size=2, guidance_scale=2.0, record_means=True)
    if guided:
        kwargs.update(guidance_fn=lambda x, sigma, v: -x, guidance_weight=0.5)
    serial = sample(model, PROMPTS, **kwargs)
    total, forwards[0] = forwards[0], 0
    handed = []
    overlapped = sample(model, PROMPTS, **kwargs,
                        on_decoded=lambda images, prompts: handed.append((images.clone(), prompts, forwards[0])))
    for field in ("latents", "log_probs", "images", "means", "guidance"):
        a, b = getattr(serial, field), getattr(overlapped, field)
        assert (a is None and b is None) or torch.equal(a, b), field
    assert [len(prompts) for _, prompts, _ in handed] == [2, 2, 2]
    assert [p for _, prompts, _ in handed for p in prompts] == serial.prompts
    assert torch.equal(torch.cat([images for images, _, _ in handed]), serial.images)
    # When each micro-batch arrives, in forwards done so far: a third of them (its own), two thirds (the first
    # decode chunk of 4 rows waits for the second micro-batch), or all (a whole-batch decoder; guidance, which
    # steps the whole batch together).
    expected = {1: total // 3, 4: 2 * total // 3, None: total}[decode_chunk] if not guided else total
    assert handed[0][2] == expected and handed[-1][2] == total


def test_the_scoring_worker_follows_the_callers_thread_count_and_restarts_after_close():
    seen = []

    class Threads(torch.nn.Module):
        def forward(self, images):
            seen.append(torch.get_num_threads())
            return images.flatten(1)

    scorer = Scorer(lambda images, prompts: images.mean(dim=(1, 2, 3)), {"t": Threads()}, micro_batch=2, overlap=True)
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    try:
        scorer.score(torch.rand(2, 1, 4, 4), ["a", "b"])  # the worker thread starts with `before`
        torch.set_num_threads(other)
        scorer.score(torch.rand(2, 1, 4, 4), ["a", "b"])
        scorer.close()
        scorer.score(torch.rand(2, 1, 4, 4), ["a", "b"])  # a closed scorer starts another worker
    finally:
        torch.set_num_threads(before)
        scorer.close()
    assert seen == [before, other, other]


class HeldServer(ThreadingHTTPServer):
    """Holds every POST until `release` is set and answers the scores float(prompt); counts requests in flight."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), HeldHandler)
        self.release, self.lock, self.active, self.most = threading.Event(), threading.Lock(), 0, 0
        self.url = f"http://127.0.0.1:{self.server_address[1]}/"


class HeldHandler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.active += 1
            self.server.most = max(self.server.most, self.server.active)
        self.server.release.wait(10)
        with self.server.lock:
            self.server.active -= 1
        answer = json.dumps({"scores": [float(p) for p in body["prompts"]]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def test_http_submit_returns_at_once_with_its_requests_in_flight():
    server = HeldServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        reward = HttpReward(server.url, batch_size=1, in_flight=3, timeout=10, retries=0)
        pending = reward.submit(torch.rand(4, 3, 8, 8), ["0", "1", "2", "3"])  # returns while the server holds all
        deadline = time.monotonic() + 5
        while server.active < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # a fourth request would arrive now if more than in_flight went out
        assert server.active == 3 and not any(part.done() for part in pending.parts)
        server.release.set()
        assert pending.result().tolist() == [0.0, 1.0, 2.0, 3.0]  # in order
        assert server.most == 3
    finally:
        server.release.set()
        server.shutdown()


class PixelMean(torch.nn.Module):
    def forward(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def reward_server():
    with start_server(PixelMean(), "mean") as handle:
        yield handle


CASES = {
    "pec": {"method": "pec"},
    "pcgs_guided": {"method": "pcgs", "pcgs": {"form": "guided", "guidance_weight": 0.5}},
    "nft_dpm2": {"algorithm": "nft", "method": "grpo"},
    "http": {"method": "pec", "reward": "http"},
}


@pytest.mark.parametrize("name", list(CASES))
def test_overlapped_scoring_trains_bit_for_bit_as_the_serial_path(world, tmp_path, reward_server, monkeypatch, name):
    monkeypatch.setattr("pec.trainer.plot_metrics", lambda *args, **kwargs: None)  # most of a tiny run's time
    rows, rng = {}, {}
    for overlap in (False, True):
        # 6 samples in micro-batches of 2: three chunks, scored while the next samples.
        overrides = {**CASES[name], "train": {"steps": 2, "micro_batch": 2, "overlap_scoring": overlap},
                     "paths": {"reward_url": reward_server.url}}
        trainer = Trainer(tiny_config(world, tmp_path / f"{name}-{overlap}", **overrides))
        rows[overlap] = [{k: v for k, v in row.items() if not k.startswith("time/")} for row in trainer.run()]
        rng[overlap] = torch.get_rng_state()  # every run starts from torch.manual_seed(seed)
    assert metrics_equivalence.differences({name: rows[False]}, {name: rows[True]}) == []
    assert torch.equal(rng[False], rng[True])
