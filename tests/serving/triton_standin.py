"""A stand-in for the Triton HTTP calls a drain makes (health, repository index, model configuration,
unload), serving one ensemble and the model it chains. After its unload the ensemble's state is
`unload_leaves`: UNLOADING for good (requests still in flight, as a stalled request would leave it) or
UNAVAILABLE (drained). In a test's thread, or as a process serving.supervise starts in tritonserver's place:

    python -m tests.serving.triton_standin --http-port 8000 [--unload-leaves UNLOADING]
"""
from __future__ import annotations

import argparse
import signal
import sys
from http.server import ThreadingHTTPServer

from serving.health import JsonHandler

ENSEMBLE, CHAINED = "image_classifier", "classifier"


class TritonStandIn(ThreadingHTTPServer):
    def __init__(self, port: int = 0, unload_leaves: str = "UNAVAILABLE"):
        self.states = {ENSEMBLE: "READY", CHAINED: "READY"}
        self.unload_leaves = unload_leaves
        super().__init__(("127.0.0.1", port), _Handler)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _Handler(JsonHandler):
    server: TritonStandIn

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        parts = self.path.strip("/").split("/")
        if self.path in ("/v2/health/live", "/v2/health/ready"):
            self._send(200, {})
        elif parts[:2] == ["v2", "models"] and parts[3:] == ["config"] and parts[2] in self.server.states:
            self._send(200, {"name": parts[2], "platform": "ensemble"} if parts[2] == ENSEMBLE
                       else {"name": parts[2], "backend": "python"})
        else:
            self._send(404, {"error": f"no {self.path}"})

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = self.path.strip("/").split("/")
        if self.path == "/v2/repository/index":
            self._send(200, [{"name": m, "version": "1", "state": s} for m, s in self.server.states.items()])
        elif parts[:3] == ["v2", "repository", "models"] and parts[4:] == ["unload"] and parts[3] in self.server.states:
            self.server.states[parts[3]] = self.server.unload_leaves
            self._send(200, {})
        else:
            self._send(404, {"error": f"no {self.path}"})


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--unload-leaves", default="UNAVAILABLE")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    TritonStandIn(args.http_port, args.unload_leaves).serve_forever()
