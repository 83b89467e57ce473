"""The in-process bound: the served work with no server, pipelined over both cores.

    python -m benchmarks.inprocess                        # batch 1 4 8 16, 2 decode threads, 2 ORT threads
    python -m benchmarks.inprocess --batch 8 --images 400 --intra-op-threads 1
    python -m benchmarks.inprocess --strategy parallel --decode-threads 2 --intra-op-threads 1

The same preprocessing (`common.preprocessing.image_to_uint8` + `normalize`, what the Triton
`preprocess` model runs) and the same ONNX Runtime model and session options as the served
classifier, in one process, both cores busy. `pipelined`: a thread pool decodes the next batch
(Pillow releases the GIL) while ONNX Runtime runs the current one; `parallel`: N worker threads each
decode a batch and run it. What a server on these cores can approach (bench takes the best layout).
Latency is per batch: from the batch's first decode being submitted to its probabilities.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.workload import ENCODINGS, load_photos
from common.contract import MODEL_ONNX, PREPROCESS_JSON
from common.onnxsession import cpu_session
from common.preprocessing import PreprocessConfig, image_to_uint8, normalize
from serving.health import number

STRATEGIES = ("pipelined", "parallel")


@dataclasses.dataclass(frozen=True)
class InProcessResult:
    batch: int
    images: int
    seconds: float
    throughput: float
    p50_ms: float
    p90_ms: float
    p99_ms: float


def session_from_onnx(path: str | Path, intra_op_threads: int) -> ort.InferenceSession:
    """The classifier's session, exactly as the served python-backend classifier makes it."""
    return cpu_session(path, intra_op_threads)


def run_pipelined(session: ort.InferenceSession, config: PreprocessConfig, photos: list[bytes], batch: int,
                  images: int, decode_threads: int, depth: int = 1) -> InProcessResult:
    """Classify `images` photos (cycling through `photos`) in batches of `batch`, decoding up to
    `depth` batches ahead on `decode_threads` threads while ONNX Runtime runs the current one."""
    if batch < 1 or images < batch:
        raise ValueError(f"need batch >= 1 and images >= batch, got batch {batch}, images {images}")
    input_name = session.get_inputs()[0].name
    batches = images // batch
    latencies = []
    with ThreadPoolExecutor(decode_threads, thread_name_prefix="decode") as pool:
        pending = collections.deque()
        next_image = 0

        def submit():
            nonlocal next_image
            futures = [pool.submit(image_to_uint8, photos[(next_image + i) % len(photos)], config)
                       for i in range(batch)]
            next_image += batch
            pending.append((time.perf_counter(), futures))

        session.run(None, {input_name: np.zeros((batch, *config.input_shape), np.float32)})  # warm-up
        start = time.perf_counter()
        for _ in range(min(depth, batches)):
            submit()
        for done in range(batches):
            submitted, futures = pending.popleft()
            crops = np.stack([f.result() for f in futures])
            if done + depth < batches:
                submit()
            session.run(None, {input_name: normalize(crops, config)})
            latencies.append(time.perf_counter() - submitted)
        seconds = time.perf_counter() - start
    p50, p90, p99 = (float(np.percentile(latencies, q)) * 1000 for q in (50, 90, 99))
    return InProcessResult(batch, batches * batch, seconds, batches * batch / seconds, p50, p90, p99)


def run_parallel(session: ort.InferenceSession, config: PreprocessConfig, photos: list[bytes], batch: int,
                 images: int, workers: int) -> InProcessResult:
    """`workers` threads, each decoding a batch and then running it (one shared session: ONNX
    Runtime's run is thread-safe): the layout of `workers` instances of one decode+infer model."""
    if batch < 1 or images < batch or workers < 1:
        raise ValueError(f"need batch >= 1, images >= batch, workers >= 1; got {batch}, {images}, {workers}")
    input_name = session.get_inputs()[0].name
    batches, claimed, latencies = images // batch, itertools.count(), []

    def work() -> None:
        for k in iter(lambda: next(claimed), None):  # next() on a count is atomic under the GIL
            if k >= batches:
                return
            submitted = time.perf_counter()
            crops = np.stack([image_to_uint8(photos[(k * batch + i) % len(photos)], config) for i in range(batch)])
            session.run(None, {input_name: normalize(crops, config)})
            latencies.append(time.perf_counter() - submitted)

    session.run(None, {input_name: np.zeros((batch, *config.input_shape), np.float32)})  # warm-up
    threads = [threading.Thread(target=work, name=f"worker-{i}") for i in range(workers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    p50, p90, p99 = (float(np.percentile(latencies, q)) * 1000 for q in (50, 90, 99))
    return InProcessResult(batch, batches * batch, seconds, batches * batch / seconds, p50, p90, p99)


def measure(artifacts: str | Path, photos: list[bytes], batches: list[int], images: int,
            decode_threads: int, intra_op_threads: int, strategy: str = "pipelined",
            model: str | Path | None = None) -> list[InProcessResult]:
    """`pipelined`: decode_threads decode ahead of one ONNX Runtime call at a time; `parallel`:
    decode_threads workers each decode and run their own batch. `model`: another ONNX file of the
    artifacts' model (default: model.onnx)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is not one of {STRATEGIES}")
    artifacts = Path(artifacts)
    config = PreprocessConfig.load(artifacts / PREPROCESS_JSON)
    session = session_from_onnx(Path(model) if model else artifacts / MODEL_ONNX, intra_op_threads)
    run = run_pipelined if strategy == "pipelined" else run_parallel
    return [run(session, config, photos, b, max(images, b), decode_threads) for b in batches]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default="artifacts/efficientnet_lite0", help="exported model (default: %(default)s)")
    p.add_argument("--model", default=None, help="ONNX file (default: <artifacts>/model.onnx)")
    p.add_argument("--batch", nargs="+", type=number(int, 1), default=[1, 4, 8, 16],
                   help="batch sizes (default: %(default)s)")
    p.add_argument("--images", type=number(int, 1), default=400,
                   help="images per batch size, at least one batch (default: %(default)s)")
    p.add_argument("--strategy", default="pipelined", choices=STRATEGIES,
                   help="decode ahead of one inference, or parallel decode+infer workers (default: %(default)s)")
    p.add_argument("--decode-threads", type=number(int, 1), default=2,
                   help="decode threads / workers (default: %(default)s)")
    p.add_argument("--intra-op-threads", type=number(int, 0), default=2,
                   help="ONNX Runtime threads, 0: its default (default: %(default)s)")
    p.add_argument("--photos", default="jpeg", choices=ENCODINGS, help="photo encoding (default: %(default)s)")
    return p


def main(args: argparse.Namespace) -> list[InProcessResult]:
    photos = list(load_photos(args.photos).values())
    results = measure(args.artifacts, photos, args.batch, args.images, args.decode_threads, args.intra_op_threads,
                      args.strategy, args.model)
    for r in results:
        print(f"in-process batch {r.batch:3d}: {r.throughput:7.1f} img/s  p50 {r.p50_ms:6.1f}  "
              f"p90 {r.p90_ms:6.1f}  p99 {r.p99_ms:6.1f} ms  ({r.images} images in {r.seconds:.1f} s)")
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
