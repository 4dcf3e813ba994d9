"""`python -m pec.rewards.serve NAME [--port 8000] [--host 127.0.0.1] [--device auto] [--paths.X PATH ...]`:
serve any registered reward (or a weighted spec such as `pickscore:1,jpeg:0.1`) over HTTP with the
protocol of `pec.rewards.http`: POST `{"prompts": [...], "images": [base64 PNG...]}` -> `{"scores": [...]}`.
A GET answers `{"reward": NAME}` (a health check). Prints `serving NAME on http://HOST:PORT/` once ready.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from pec.rewards.http import decode_png


def make_server(reward: torch.nn.Module, name: str, host: str = "127.0.0.1", port: int = 0,
                device: str | torch.device = "cpu") -> ThreadingHTTPServer:
    """An HTTP server scoring with `reward` (requests are scored one at a time); port 0 = any free port."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._send(200, {"reward": name})

        def do_POST(self) -> None:  # noqa: N802
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                images = torch.stack([decode_png(x) for x in request["images"]]).to(device)
                with lock:
                    scores = reward(images, request["prompts"])
            except (ValueError, KeyError, TypeError, RuntimeError) as err:
                self._send(400, {"error": str(err)})
                return
            self._send(200, {"scores": scores.float().cpu().tolist()})

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: no line per request."""

    return ThreadingHTTPServer((host, port), Handler)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: build the reward from the command line (`--paths.*` as in pec.train) and serve it."""
    from pec.config import PathsConfig
    from pec.policy import resolve_device
    from pec.rewards import build_reward

    parser = argparse.ArgumentParser(prog="python -m pec.rewards.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="a registered reward name or a weighted spec (name:weight,...)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on; 0 = any free port (default: 8000)")
    parser.add_argument("--device", default="auto", help="torch device; auto = cuda if available (default: auto)")
    parser.add_argument("--assets", default=None, help="the embedded world's assets folder (as pec.train --assets)")
    defaults = PathsConfig()
    for f in dataclasses.fields(PathsConfig):
        parser.add_argument(f"--paths.{f.name}", dest=f.name, default=getattr(defaults, f.name),
                            help=f.metadata["help"])
    args = parser.parse_args(argv)
    paths = PathsConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PathsConfig)})
    device = resolve_device(args.device)
    try:
        reward = build_reward(args.name, device=device, directory=args.assets, paths=paths)
    except ValueError as err:
        raise SystemExit(f"pec.rewards.serve: {err}") from None
    server = make_server(reward, args.name, args.host, args.port, device)
    host, port = server.server_address[:2]
    print(f"serving {args.name} on http://{host}:{port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
