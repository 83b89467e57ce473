"""The usual alternative to Triton: FastAPI + ONNX Runtime in one uvicorn process, same work.

    python -m benchmarks.fastapi_service --port 8080          # then:
    curl --data-binary @cat.jpg http://127.0.0.1:8080/classify?top_k=5

POST /classify takes one encoded image as the request body and returns
{"predictions": [{"index", "label", "score"}, ...]} (top k, best first); GET /health. Each request
is decoded with the project's preprocessing and run through the same ONNX model (batch 1, same
session options as the served classifier) in Starlette's thread pool, so requests overlap; a bad
image is a 400 naming the problem. `--model` picks another ONNX file of the same model (the INT8
variant the repository serves, say); labels and preprocess.json come from `--artifacts`. The
benchmark starts it as a subprocess (FastAPIService).
"""

import argparse
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from common.contract import LABELS_TXT, MODEL_ONNX, ONNX_PROBABILITIES, PREPROCESS_JSON
from serving.health import number

ENV_ARTIFACTS = "FASTAPI_SERVICE_ARTIFACTS"
ENV_THREADS = "FASTAPI_SERVICE_THREADS"
ENV_MODEL = "FASTAPI_SERVICE_MODEL"


def create_app(artifacts: str | Path, intra_op_threads: int = 2, model: str | Path | None = None):
    import numpy as np
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.concurrency import run_in_threadpool

    from benchmarks.inprocess import session_from_onnx
    from common.preprocessing import ImageError, PreprocessConfig, image_to_uint8, normalize

    artifacts = Path(artifacts)
    config = PreprocessConfig.load(artifacts / PREPROCESS_JSON)
    labels = (artifacts / LABELS_TXT).read_text().splitlines()
    session = session_from_onnx(Path(model) if model else artifacts / MODEL_ONNX, intra_op_threads)
    input_name = session.get_inputs()[0].name

    def predict(data: bytes, top_k: int) -> list[dict]:
        pixels = normalize(image_to_uint8(data, config)[None], config)
        (probabilities,) = session.run([ONNX_PROBABILITIES], {input_name: pixels})
        top = np.argsort(-probabilities[0])[:top_k]
        return [{"index": int(i), "label": labels[i], "score": float(probabilities[0, i])} for i in top]

    app = FastAPI(title="image classifier (FastAPI + ONNX Runtime)")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/classify")
    async def classify(request: Request, top_k: int = 5) -> dict:
        data = await request.body()
        try:
            return {"predictions": await run_in_threadpool(predict, data, max(1, min(top_k, len(labels))))}
        except ImageError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None

    return app


def app_from_env():
    """uvicorn factory (`--workers` > 1 needs an import string): settings from the environment."""
    return create_app(os.environ[ENV_ARTIFACTS], int(os.environ.get(ENV_THREADS, "2")), os.environ.get(ENV_MODEL))


class FastAPIService:
    """The service as a subprocess on loopback; a context manager like serving.server.TritonServer."""

    def __init__(self, artifacts: str | Path, port: int, intra_op_threads: int = 2, workers: int = 1,
                 log_file: str | Path | None = None, model: str | Path | None = None):
        self.artifacts, self.port, self.model = Path(artifacts), port, Path(model) if model else None
        self.intra_op_threads, self.workers = intra_op_threads, workers
        self.log_file = Path(log_file) if log_file else None
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "FastAPIService":
        cmd = [sys.executable, "-m", "benchmarks.fastapi_service", "--artifacts", str(self.artifacts.resolve()),
               "--port", str(self.port), "--intra-op-threads", str(self.intra_op_threads),
               "--workers", str(self.workers)] + (["--model", str(self.model.resolve())] if self.model else [])
        log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        project_root = str(Path(__file__).resolve().parent.parent)
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=project_root)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the FastAPI service exited with code {self.process.returncode} while starting")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"the FastAPI service was not ready after {timeout:.0f} s")

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "FastAPIService":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default="artifacts/efficientnet_lite0", help="exported model (default: %(default)s)")
    p.add_argument("--model", default=None, help="ONNX file to serve (default: <artifacts>/model.onnx)")
    p.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    p.add_argument("--port", type=number(int, 1, 65535), default=8080, help="(default: %(default)s)")
    p.add_argument("--intra-op-threads", type=number(int, 0), default=2,
                   help="ONNX Runtime threads, 0: its default (default: %(default)s)")
    p.add_argument("--workers", type=number(int, 1), default=1, help="uvicorn worker processes (default: %(default)s)")
    return p


def main(args: argparse.Namespace) -> None:
    import uvicorn

    if args.workers == 1:
        uvicorn.run(create_app(args.artifacts, args.intra_op_threads, args.model), host=args.host, port=args.port,
                    log_level="warning")
    else:
        os.environ[ENV_ARTIFACTS] = str(Path(args.artifacts).resolve())
        os.environ[ENV_THREADS] = str(args.intra_op_threads)
        if args.model:
            os.environ[ENV_MODEL] = str(Path(args.model).resolve())
        uvicorn.run("benchmarks.fastapi_service:app_from_env", factory=True, host=args.host, port=args.port,
                    workers=args.workers, log_level="warning")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
