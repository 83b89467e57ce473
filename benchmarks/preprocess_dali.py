"""`make bench-preprocess`: DALI on CPU vs the Pillow path of common/preprocessing.py, per image and per core.

    python -m benchmarks.preprocess_dali --artifacts artifacts/efficientnet_lite0 --dali-python .venv-dali/bin/python

Both on one thread over the bundled photos (encoded bytes -> normalised tensor). The Pillow path is the
python preprocess model's (JPEG draft mode on); DALI runs the serialized pipeline of build/repository/dali.py
with `device="cpu"`. On a GPU server DALI decodes with nvJPEG instead; this measures only its CPU path.
Writes preprocess_dali.{json,md}, each naming the machine, to --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import report
from build.repository import dali
from common.contract import PREPROCESS_JSON
from common.preprocessing import PreprocessConfig, image_to_uint8, normalize
from common.samples import sample_photos
from serving.health import number


def pillow_seconds(files: list[Path], config: PreprocessConfig, repeat: int) -> list[float]:
    encoded = [f.read_bytes() for f in files]
    for data in encoded:  # warm-up
        normalize(image_to_uint8(data, config)[None], config)
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        for data in encoded:
            normalize(image_to_uint8(data, config)[None], config)
        runs.append(time.perf_counter() - start)
    return runs


def main(args: argparse.Namespace) -> dict:
    preprocess_json = Path(args.artifacts) / PREPROCESS_JSON
    if not preprocess_json.exists():  # a default config would time some other preprocessing than the model's
        raise FileNotFoundError(f"{preprocess_json} not found: run `make export` (python -m training.export) "
                                "first, or give --artifacts an exported model")
    config = PreprocessConfig.load(preprocess_json)
    files = list(sample_photos().values())
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = dali.serialize(preprocess_json, Path(tmp) / "model.dali", "cpu", args.batch_size, args.dali_python)
        out = dali.run_in_dali(["bench", "--pipeline", str(pipeline), "--images", *map(str, files), "--threads", "1",
                                "--batch-size", str(args.batch_size), "--repeat", str(args.repeat)], args.dali_python)
    dali_runs = json.loads(out.strip().splitlines()[-1])["seconds"]
    pillow_runs = pillow_seconds(files, config, args.repeat)
    n = len(files)
    result = {name: {"ms_per_image": 1000 * statistics.median(runs) / n,
                     "images_per_s_per_core": n / statistics.median(runs), "runs_s": runs}
              for name, runs in (("pillow", pillow_runs), ("dali_cpu", dali_runs))}
    result["dali_cpu_vs_pillow"] = result["pillow"]["ms_per_image"] / result["dali_cpu"]["ms_per_image"]
    for name in ("pillow", "dali_cpu"):
        print(f"{name:9s} {result[name]['ms_per_image']:6.2f} ms/image  "
              f"{result[name]['images_per_s_per_core']:6.1f} img/s per core")
    print(f"DALI-CPU / Pillow throughput: {result['dali_cpu_vs_pillow']:.2f}x ({n} photos, {args.repeat} runs, 1 thread)")
    setup = {"preprocess_json": str(preprocess_json), "preprocess": config.to_dict(), "photos": n,
             "repeat": args.repeat, "batch_size": args.batch_size, "threads": 1}
    print("wrote " + ", ".join(map(str, write(result, setup, Path(args.out)))))
    return result


def write(result: dict, setup: dict, out: Path) -> list[Path]:
    """preprocess_dali.json (the machine, `setup`, `result`) and preprocess_dali.md (the machine, a table)."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"DALI on CPU vs Pillow, {setup['threads']} thread, {setup['photos']} bundled photos, median of "
             f"{setup['repeat']} runs, DALI batch {setup['batch_size']}, {setup['preprocess_json']}", "",
             "| path | ms per image | img/s per core |", "|---|---:|---:|"]
    lines += [f"| {name} | {result[name]['ms_per_image']:.2f} | {result[name]['images_per_s_per_core']:.1f} |"
              for name in ("pillow", "dali_cpu")]
    lines += ["", f"- DALI-CPU / Pillow throughput: {result['dali_cpu_vs_pillow']:.2f}x"]
    return [report.write_json(out / "preprocess_dali.json", {**setup, **result}),
            report.write_markdown(out / "preprocess_dali.md", "\n".join(lines) + "\n")]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default="artifacts/efficientnet_lite0", help="for preprocess.json (default: %(default)s)")
    p.add_argument("--dali-python", default=None, help="the DALI environment's python (default: .venv-dali/bin/python)")
    p.add_argument("--batch-size", type=number(int, 1), default=8, help="DALI batch (default: %(default)s)")
    p.add_argument("--repeat", type=number(int, 1), default=5, help="timed runs over all photos (default: %(default)s)")
    p.add_argument("--out", default="benchmarks/results/preprocess_dali", help="results folder (default: %(default)s)")
    return p


if __name__ == "__main__":
    import sys

    try:
        main(get_args_parser().parse_args())
    except (OSError, RuntimeError, ValueError) as exc:
        sys.exit(f"benchmarks.preprocess_dali: {exc}")
