"""DALI preprocessing for servers with Triton's DALI backend (NGC images): the DALI twin of
common/preprocessing.py, serialized into the model repository as `preprocess/1/model.dali`.

    decode (EXIF orientation applied, RGB) -> resize the shorter side to `resize` (linear, antialiased)
      -> centre crop `crop` x `crop` -> (x - 255 mean) / (255 std) -> CHW or HWC float32

On the server it decodes with nvJPEG on the GPU (`device="mixed"`); the same pipeline runs on CPU
(`device="cpu"`, device_id=None) where DALI is installed: `make dali-setup` makes .venv-dali, apart from
.venv because DALI needs numpy 2. This file imports only the standard library at module level, so the
build (in .venv) can import it; everything DALI runs in .venv-dali through this file's command line:

    .venv-dali/bin/python build/repository/dali.py serialize --preprocess preprocess.json --out model.dali
    .venv-dali/bin/python build/repository/dali.py run --pipeline model.dali --images a.jpg b.png --out x.npz
    .venv-dali/bin/python build/repository/dali.py bench --pipeline model.dali --images a.jpg --repeat 5

Where DALI differs from the python preprocess model (docs/gpu.md): its decoder is libjpeg-turbo /
nvJPEG (no JPEG draft mode), its resize is its own, and an image it cannot decode fails the whole batch
the server formed, not only its own request; image limits (bytes, pixels, aspect ratio) are not checked.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DALI_INPUT = "IMAGE"  # the ensemble's input, fed to DALI's external source: UINT8 [-1], one encoded image
DALI_OUTPUT = "PIXELS"  # = common.contract.PIXELS (this file must not import the project: it runs in .venv-dali)
MODEL_FILE = "model.dali"
DEFAULT_DALI_PYTHON = Path(".venv-dali/bin/python")


# ---------------------------------------------------------------- in .venv (no DALI needed)

def dali_python(path: str | os.PathLike | None = None) -> Path:
    """The interpreter of the DALI tool environment; FileNotFoundError saying how to make it."""
    python = Path(path or os.environ.get("DALI_PYTHON") or DEFAULT_DALI_PYTHON)
    if not python.exists():
        raise FileNotFoundError(f"no DALI environment at {python}: run `make dali-setup` (or set DALI_PYTHON)")
    return python


def run_in_dali(args: list[str], python: str | os.PathLike | None = None, timeout: float = 600) -> str:
    """Run this file's command line in the DALI environment; its stdout, or RuntimeError with its stderr."""
    done = subprocess.run([str(dali_python(python)), __file__, *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"DALI ({' '.join(args[:1])}) failed: {done.stderr.strip()[-2000:]}")
    return done.stdout


def serialize(preprocess_json: Path, out: Path, device: str = "mixed", max_batch_size: int = 32,
              python: str | None = None) -> Path:
    """Write the serialized pipeline for `preprocess.json` (through the DALI environment)."""
    run_in_dali(["serialize", "--preprocess", str(preprocess_json), "--out", str(out), "--device", device,
                 "--batch-size", str(max_batch_size)], python)
    return out


def preprocess_config(name: str, max_batch_size: int, input_dims: tuple[int, ...], batching: str,
                      header: str) -> str:
    """config.pbtxt of the DALI preprocess model: encoded bytes as UINT8 [-1] in, the normalised image out;
    `batching`: its instance_group and dynamic_batching, as the spec renders them for any model. The input is a
    ragged batch: Triton's dynamic batcher otherwise batches only requests of equal shape, here byte length."""
    dims = ", ".join(str(d) for d in input_dims)
    return (f"{header}name: \"{name}\"\nbackend: \"dali\"\nmax_batch_size: {max_batch_size}\n"
            f"input [\n  {{\n    name: \"{DALI_INPUT}\"\n    data_type: TYPE_UINT8\n    dims: [ -1 ]\n"
            "    allow_ragged_batch: true\n  }\n]\n"
            f"output [\n  {{\n    name: \"{DALI_OUTPUT}\"\n    data_type: TYPE_FP32\n    dims: [ {dims} ]\n  }}\n]\n"
            + batching)


# ---------------------------------------------------------------- in .venv-dali

def build_pipeline(config: dict, device: str, batch_size: int, num_threads: int = 1, device_id=None):
    """The DALI pipeline equivalent to common.preprocessing for the settings of a preprocess.json."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    interp = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}[config.get("interpolation", "bilinear")]
    mean = [255.0 * m for m in config["mean"]]
    std = [255.0 * s for s in config["std"]]

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id)
    def preprocess():
        encoded = fn.external_source(name=DALI_INPUT, dtype=types.UINT8, ndim=1, device="cpu")
        images = fn.decoders.image(encoded, device=device, output_type=types.RGB, adjust_orientation=True)
        # torchvision's sizes exactly: shorter side `resize`, longer side floor(resize * long / short)
        shape = fn.peek_image_shape(encoded, adjust_orientation=True)
        height, width = shape[0], shape[1]
        short = dmath.min(height, width)
        images = fn.resize(images, resize_x=fn.cast(width * config["resize"] // short, dtype=types.FLOAT),
                           resize_y=fn.cast(height * config["resize"] // short, dtype=types.FLOAT),
                           interp_type=interp, antialias=True)
        return fn.crop_mirror_normalize(images, crop=(config["crop"], config["crop"]), mean=mean, std=std,
                                        dtype=types.FLOAT, output_layout="CHW" if config["layout"] == "NCHW" else "HWC",
                                        name=DALI_OUTPUT)

    return preprocess()


def _run(pipe, encoded: list) -> list:
    import numpy as np

    outputs = []
    for start in range(0, len(encoded), pipe.max_batch_size):
        chunk = encoded[start:start + pipe.max_batch_size]
        pipe.feed_input(DALI_INPUT, [np.frombuffer(e, np.uint8) for e in chunk])
        (out,) = pipe.run()
        out = out.as_cpu() if hasattr(out, "as_cpu") else out
        outputs += [np.asarray(out.at(i)) for i in range(len(chunk))]
    return outputs


def _load(pipeline_file: Path, batch_size: int, num_threads: int):
    from nvidia.dali import Pipeline

    pipe = Pipeline.deserialize(filename=str(pipeline_file), batch_size=batch_size, num_threads=num_threads,
                                device_id=None)
    pipe.build()
    return pipe


def _cli(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description="DALI preprocessing (run with the .venv-dali interpreter)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serialize")
    s.add_argument("--preprocess", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--device", default="mixed", choices=["mixed", "cpu"])
    s.add_argument("--batch-size", type=int, default=32)
    for name in ("run", "bench"):
        r = sub.add_parser(name)
        r.add_argument("--pipeline", required=True)
        r.add_argument("--images", nargs="+", required=True)
        r.add_argument("--batch-size", type=int, default=8)
        r.add_argument("--threads", type=int, default=1)
        r.add_argument("--out", default=None)
        r.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    if args.command == "serialize":
        config = json.loads(Path(args.preprocess).read_text())
        pipe = build_pipeline(config, args.device, args.batch_size)
        pipe.serialize(filename=args.out)
        return
    encoded = [Path(f).read_bytes() for f in args.images]
    pipe = _load(Path(args.pipeline), args.batch_size, args.threads)
    if args.command == "run":
        import numpy as np

        np.savez(args.out, *_run(pipe, encoded))
        return
    _run(pipe, encoded)  # warm-up
    seconds = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        _run(pipe, encoded)
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"images": len(encoded), "seconds": seconds, "threads": args.threads,
                      "batch_size": args.batch_size}))


if __name__ == "__main__":
    _cli(sys.argv[1:])
