"""The `http` reward: a client of a reward server, so that large judges (UnifiedReward, VLMs) and
rewards with conflicting dependencies (GenEval) run in another process or on another machine.

Protocol: POST `{"prompts": [...], "images": [base64 PNG, ...]}` (JSON) to the server's URL; the answer
is `{"scores": [...]}` with one float per image. Images go `batch_size` at a time (default 32), each
request with a timeout (default 60 s) and up to `retries` retries (default 3) with exponential
backoff; a server that never answers raises a ConnectionError that names --paths.reward_url.
`python -m pec.rewards.serve NAME ...` serves any registered reward with this protocol.
"""
from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

import torch

from pec.rewards.base import ImageReward

TIMEOUT_S = 60.0
RETRIES = 3
BACKOFF_S = 1.0


def encode_png(image: torch.Tensor) -> str:
    """Base64 PNG of one image (C, H, W) in [0, 1] (8-bit, grey or RGB)."""
    from PIL import Image

    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png(data: str) -> torch.Tensor:
    """Inverse of `encode_png`: (C, H, W) float32 in [0, 1]."""
    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data)))
    array = np.asarray(image.convert("L" if image.mode == "L" else "RGB"), dtype=np.float32) / 255
    tensor = torch.from_numpy(array.copy())
    return tensor[None] if tensor.dim() == 2 else tensor.permute(2, 0, 1)


def check_server(url: str | None, timeout: float = 10.0) -> None:
    """ValueError unless `url` is an http(s) URL whose server answers (any HTTP status counts)."""
    if not url or not url.startswith(("http://", "https://")):
        raise ValueError(f"--paths.reward_url must be the http(s) URL of a reward server for reward 'http' "
                         f"(start one with `python -m pec.rewards.serve NAME --port PORT`), got {url!r}")
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as err:
        raise ValueError(f"--paths.reward_url: the reward server at {url} does not answer ({err}); start it "
                         f"(`python -m pec.rewards.serve NAME --port PORT`) or fix the URL") from None


class HttpReward(ImageReward):
    """Scores from a reward server (see the module docstring)."""

    def __init__(self, url: str, *, batch_size: int = 32, timeout: float = TIMEOUT_S, retries: int = RETRIES,
                 backoff: float = BACKOFF_S) -> None:
        super().__init__()
        if batch_size < 1 or timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(f"batch_size must be >= 1, timeout > 0, retries and backoff >= 0; got {batch_size}, "
                             f"{timeout}, {retries}, {backoff}")
        self.url, self.batch_size, self.timeout, self.retries, self.backoff = url, batch_size, timeout, retries, backoff

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        body = json.dumps({"prompts": prompts, "images": [encode_png(im) for im in images]}).encode()
        scores = self._post(body)
        if not isinstance(scores, Sequence) or len(scores) != len(prompts):
            raise ValueError(f"reward server {self.url} answered {scores!r:.80} for {len(prompts)} images; it must "
                             f"answer {{\"scores\": [one float per image]}}")
        return torch.tensor([float(s) for s in scores], dtype=torch.float32)

    def _post(self, body: bytes) -> list:
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())["scores"]
            except (urllib.error.URLError, OSError, KeyError, json.JSONDecodeError) as err:
                last = err
        raise ConnectionError(f"reward server {self.url} (--paths.reward_url) did not answer after "
                              f"{self.retries + 1} tries ({last}); is `python -m pec.rewards.serve` running?")


def build_http_reward(device: str | torch.device = "cpu", directory: object = None,
                      paths: object = None) -> HttpReward:
    """The http reward on --paths.reward_url (checked to answer first)."""
    url = getattr(paths, "reward_url", None)
    check_server(url)
    return HttpReward(url)
