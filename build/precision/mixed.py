"""Accuracy-aware mixed precision for the INT8 CPU file: keep the layers whose quantisation costs most
in float, as few as it takes for the accuracy gate to hold.

    1. rank: for every weighted layer (Conv, Gemm, MatMul), quantize the model with that layer alone
       left in float and measure how far its probabilities move from FP32's on the *calibration*
       images (mean |dp|); the layers whose float version helps most come first
    2. keep the first k of that ranking in float, k = 0, 1, 2, ... up to `max_float`, and run the gate
       (held-out images, which the ranking never saw) on each; the first file that passes is the one
       deployed, and its ONNX metadata names the layers left in float (`int8_float_nodes`)

The tool is ONNX Runtime's own quantizer and its `nodes_to_exclude`; the ranking is cached beside the
calibration cache, keyed by everything it depends on, so a second `make engines` reuses it. This is
the search NNCF's accuracy-control quantisation runs (rank by the metric, give back layers to float
until a validation metric holds), on the same quantizer as the rest of build/.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from tqdm import tqdm

from build.precision import quantize
from build.precision.calibrate import Calibration
from build.precision.imagesets import ImageSet
from common.contract import ONNX_INPUT, ONNX_PROBABILITIES
from common.hashing import file_sha256
from common.onnxfiles import model_sha256, save_like
from common.onnxsession import cpu_session
from common.preprocessing import PreprocessConfig

FLOAT_NODES_KEY = "int8_float_nodes"  # ONNX metadata: the layers this INT8 file leaves in float, comma-separated
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
RANKING_VERSION = 3


@dataclasses.dataclass
class Ranking:
    nodes: list[str]  # most worth keeping in float first
    error: dict[str, float]  # node -> mean |dp| vs FP32 with that node alone in float
    baseline: float  # mean |dp| with every layer quantized
    reused: bool = False


def weighted_nodes(model_path: Path) -> list[str]:
    model = onnx.load(str(model_path), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in WEIGHTED_OPS and len(n.input) > 1 and n.input[1] in weights]


def probabilities(path: Path, images: ImageSet, config: PreprocessConfig, batch_size: int = 16) -> np.ndarray:
    session = cpu_session(path, 2)
    return np.concatenate([session.run([ONNX_PROBABILITIES], {ONNX_INPUT: batch})[0]
                           for batch in images.batches(config, batch_size)])


def _key(model_path: Path, calibration: Calibration, layout: str, images: ImageSet) -> str:
    parts = [model_sha256(model_path), file_sha256(calibration.cache), layout, images.fingerprint(), str(RANKING_VERSION)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def rank_layers(model_path: Path, calibration: Calibration, layout: str, images: ImageSet,
                config: PreprocessConfig) -> Ranking:
    """The weighted layers, most worth keeping in float first (cached in `<cache>.<layout>.ranking.json`)."""
    cache = calibration.cache.with_name(f"{calibration.cache.stem}.{layout}.ranking.json")
    key = _key(model_path, calibration, layout, images)
    if cache.exists():
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            return Ranking(stored["nodes"], stored["error"], stored["baseline"], reused=True)
    reference = probabilities(model_path, images, config)
    with tempfile.TemporaryDirectory(prefix="mixed.") as work:
        candidate = Path(work) / "candidate.int8.onnx"

        def error(excluded: list[str]) -> float:
            quantize.quantize(model_path, calibration, "cpu", candidate, exclude_nodes=excluded, cpu_layout=layout)
            return float(np.abs(probabilities(candidate, images, config) - reference).mean())

        baseline = error([])
        nodes = weighted_nodes(model_path)
        errors = {node: error([node]) for node in tqdm(nodes, desc="mixed precision: rank layers", unit="layer")}
    ranked = sorted(nodes, key=lambda n: (errors[n], nodes.index(n)))
    cache.write_text(json.dumps({"key": key, "layout": layout, "images": images.description, "baseline": baseline,
                                 "nodes": ranked, "error": errors}, indent=2) + "\n")
    return Ranking(ranked, errors, baseline)


def stamp_float_nodes(path: Path, nodes: list[str]) -> None:
    model = onnx.load(str(path))
    entries = {p.key: p.value for p in model.metadata_props}
    entries[FLOAT_NODES_KEY] = ",".join(nodes)
    onnx.helper.set_model_props(model, entries)
    save_like(model, path, path)


def float_nodes(path: Path) -> list[str]:
    model = onnx.load(str(path), load_external_data=False)
    value = next((p.value for p in model.metadata_props if p.key == FLOAT_NODES_KEY), "")
    return [n for n in value.split(",") if n]


def search(model_path: Path, calibration: Calibration, layout: str, out: Path, images: ImageSet,
           config: PreprocessConfig, passes: Callable[[Path], tuple[bool, str]], max_float: int,
           log: Callable[[str], None] = print) -> list[str] | None:
    """Write to `out` the INT8 CPU file with the fewest float layers (ranked on `images`) that `passes`
    (the gate, on other images: verdict and a few words on its figure); the float layers, or None (and
    `out` as with `max_float` layers) when none within `max_float` passes."""
    ranking = rank_layers(model_path, calibration, layout, images, config)
    log(("reusing the layer ranking" if ranking.reused else "ranked the layers") +
        f" ({len(ranking.nodes)} weighted layers on {images.description}; all quantized: mean |dp| "
        f"{ranking.baseline:.2e}; best single float layer: {ranking.nodes[0]} {ranking.error[ranking.nodes[0]]:.2e})")
    for count in range(1, min(max_float, len(ranking.nodes)) + 1):
        kept = ranking.nodes[:count]
        quantize.quantize(model_path, calibration, "cpu", out, exclude_nodes=kept, cpu_layout=layout)
        stamp_float_nodes(out, kept)
        ok, figure = passes(out)
        log(f"mixed precision: {count} layer(s) in float: gate {'PASS' if ok else 'FAIL'} ({figure}); "
            f"added {kept[-1]}")
        if ok:
            return kept
    return None
