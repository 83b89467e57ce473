"""Export a classifier into the project's canonical ONNX artifact directory.

    python -m training.export                                  # bundled EfficientNet-Lite0
    python -m training.export --onnx other.onnx --labels other.txt --outputs logits \\
        --output-dir artifacts/other                           # import any ONNX classifier

The artifact directory holds:
    model.onnx       input `images` float32 [batch, 3, H, W] (or NHWC); outputs `logits` [batch, C]
                     (an import of a probabilities model: their log) and `probabilities` [batch, C]
                     (a Softmax in the graph); `batch` is a dynamic axis. One self-contained file, or
                     with its weights in model.onnx.data beside it (an import of a model that kept
                     them beside it, or past common.onnxfiles.EXTERNAL_DATA_THRESHOLD)
    labels.txt       line i = label of class i
    preprocess.json  common.preprocessing.PreprocessConfig for this model
    reference.npz    `images` (the preprocessed sample photos), `names`, `probabilities` and
                     `logits` from the source model (PyTorch for an export)
    export.json      source, sha256 of model.onnx (and its data file), opset, versions, IO, parity, date

model.onnx is written last, after its checks pass: a failed check leaves no new model.onnx
(training.artifacts). The work is done by training.onnx_export (PyTorch -> ONNX, parity-checked),
training.onnx_import (`--onnx`) and training.onnx_graph (canonical IO names, graph checks); this
module is the command line, and keeps their public names importable from `training.export`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.contract import EXPORT_JSON
from common.labels import read_labels
from common.preprocessing import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, LAYOUTS, PreprocessConfig
from training import models
from training.artifacts import ExportResult, file_sha256
from training.checkpoint import load_checkpoint, resolve_checkpoint_path
from serving.health import number
from training.onnx_export import (EXPORTERS, WithProbabilities, export_bundled, export_checkpoint, export_torch_to_onnx,
                                  export_with_parity, parity_images)
from training.onnx_graph import (BATCH_AXIS, CHECK_BATCH_SIZES, INPUT_NAME, LOGITS, PROBABILITIES,
                                 canonicalize_classifier, check_onnx_file, default_opset, fold_constants, io_summary,
                                 onnxruntime_session, run_onnxruntime)
from training.onnx_import import import_onnx
from training.parity import Parity, ParityError, compare_logits

# the opsets torch.onnx exports (torch.onnx._constants ONNX_MIN_OPSET, ONNX_MAX_OPSET; the dynamo exporter writes
# at least 18 whatever is asked)
OPSETS = (7, 23)

__all__ = [  # the library names other packages and tests import from here
    "BATCH_AXIS", "CHECK_BATCH_SIZES", "EXPORTERS", "INPUT_NAME", "LOGITS", "PROBABILITIES",
    "ExportResult", "Parity", "ParityError", "WithProbabilities",
    "canonicalize_classifier", "check_onnx_file", "compare_logits", "default_opset", "export_bundled",
    "export_checkpoint", "export_torch_to_onnx", "export_with_parity", "file_sha256", "fold_constants",
    "import_onnx", "io_summary", "onnxruntime_session", "parity_images", "run_onnxruntime",
    "get_args_parser", "main",
]


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export a classifier to canonical ONNX artifacts", add_help=add_help)
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model", default=models.BUNDLED_EFFICIENTNET_LITE0, choices=[models.BUNDLED_EFFICIENTNET_LITE0],
        help="bundled pretrained model to export (default: %(default)s)",
    )
    source.add_argument("--onnx", type=Path, help="import this ONNX classifier instead (needs --labels)")
    source.add_argument("--checkpoint", type=Path,
                        help="export a training.train checkpoint, or a run directory (its best.pt)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="artifact directory (default: artifacts/efficientnet_lite0; with --checkpoint, "
                             "artifacts/<run directory name>; --onnx needs one)")
    parser.add_argument("--force", action="store_true",
                        help="replace a non-empty --output-dir that holds something other than an export of this "
                             "same source")
    parser.add_argument("--atol", type=number(float, 0, above_low=True), default=1e-4,
                        help="max |logits diff| PyTorch vs ONNX Runtime (default: %(default)s)")
    parser.add_argument("--opset", type=number(int, *OPSETS), default=17,
                        help=f"ONNX opset for exports, {OPSETS[0]} to {OPSETS[1]} (default: %(default)s)")
    parser.add_argument("--exporter", default="auto", choices=EXPORTERS, help="torch ONNX exporter (default: %(default)s)")
    parser.add_argument("--parity-images", type=number(int, 1), default=16,
                        help="--checkpoint: validation images of the run used for the parity check (default: %(default)s)")
    imported = parser.add_argument_group("--onnx import options")
    imported.add_argument("--labels", type=Path, help="labels file, line i = class i")
    imported.add_argument("--outputs", default=LOGITS, choices=[LOGITS, PROBABILITIES],
                          help="what the model outputs: logits (a Softmax is added) or probabilities (a model that "
                               "ends in Softmax; its logits become their log) (default: %(default)s)")
    imported.add_argument("--layout", default="NCHW", choices=LAYOUTS,
                          help="the model's input layout, channels RGB (default: %(default)s)")
    imported.add_argument("--input-size", type=number(int, 1), default=224,
                          help="centre-crop size fed to the model (default: %(default)s)")
    imported.add_argument("--resize-size", type=number(int, 1), default=256,
                          help="shorter side before cropping (default: %(default)s)")
    imported.add_argument("--mean", type=number(float, 0, 1), nargs=3, default=IMAGENET_MEAN,
                          help="per-channel mean of pixels scaled to [0, 1] (default: %(default)s)")
    imported.add_argument("--std", type=number(float, 0, above_low=True), nargs=3, default=IMAGENET_STD,
                          help="per-channel std, above 0 (default: %(default)s)")
    imported.add_argument("--interpolation", default="bilinear", choices=sorted(INTERPOLATIONS), help="resize filter (default: %(default)s)")
    return parser


SOURCE_FILE = {"onnx": "path", "checkpoint": "checkpoint"}  # export.json "source" key of each kind's file


def _held_source(out_dir: Path) -> dict:
    """export.json's "source" in `out_dir` ({} if there is none)."""
    try:
        held = json.loads((out_dir / EXPORT_JSON).read_text())["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return held if isinstance(held, dict) else {}


def _describe(held: dict) -> str:
    if held.get("kind") == "bundled":
        return f"the bundled model ({held.get('model')})"
    if held.get("kind") in SOURCE_FILE:
        return f"an export of {held.get(SOURCE_FILE[held['kind']])}"
    return "files that training.export did not write"


def check_output_dir(out_dir: Path, kind: str, source: Path | None, force: bool) -> None:
    """Refuse (ValueError) to write into a non-empty `out_dir` unless `force`, or its export.json says it
    is an export of the same source: the same `kind` (bundled, checkpoint, onnx) and `source` file."""
    if force or not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    held = _held_source(out_dir)
    held_file = held.get(SOURCE_FILE.get(kind, ""))
    same_file = source is None or (held_file is not None and Path(held_file).resolve() == source.resolve())
    if held.get("kind") == kind and same_file:
        return
    raise ValueError(f"{out_dir} already holds {_describe(held)}: choose another --output-dir, "
                     "or pass --force to replace it")


def main(args: argparse.Namespace) -> ExportResult:
    if args.checkpoint is not None:
        return _main_checkpoint(args)
    if args.onnx is not None:
        return _main_onnx(args)
    if args.output_dir is None:
        args.output_dir = Path("artifacts/efficientnet_lite0")
    check_output_dir(args.output_dir, "bundled", None, args.force)
    try:
        result = export_bundled(args.output_dir, atol=args.atol, opset=args.opset, exporter=args.exporter)
    except ParityError as exc:
        print(exc.parity.report(models.imagenet_labels()))
        raise
    print(result.parity.report(models.imagenet_labels()))
    return _wrote(result)


def _main_onnx(args: argparse.Namespace) -> ExportResult:
    if args.labels is None or args.output_dir is None:
        raise ValueError("--onnx needs --labels and --output-dir (a new folder, e.g. --output-dir artifacts/mine)")
    check_output_dir(args.output_dir, "onnx", args.onnx, args.force)
    preprocess = PreprocessConfig(
        resize=args.resize_size, crop=args.input_size, mean=tuple(args.mean), std=tuple(args.std),
        interpolation=args.interpolation, layout=args.layout,
    )
    labels = read_labels(args.labels)
    result = import_onnx(args.onnx, args.output_dir, labels, preprocess, args.outputs, labels_name=str(args.labels))
    for name, index in result.metadata["sample_top1"].items():
        print(f"{name:14s} top-1 {labels[index]}")
    if result.metadata["source"]["input_channels"] == 1:
        print("grayscale model: model.onnx takes R, G, B and gives it their luma (ITU-R 601-2)")
    return _wrote(result)


def _wrote(result: ExportResult) -> ExportResult:
    onnx_meta = result.metadata["onnx"]
    print(f"wrote {result.out_dir}: model.onnx opset {onnx_meta['opset']} ({onnx_meta['exporter']}), sha256 {result.sha256[:16]}...")
    return result


def _main_checkpoint(args: argparse.Namespace) -> ExportResult:
    path = resolve_checkpoint_path(args.checkpoint)
    out_dir = args.output_dir or Path("artifacts") / (path.parent.name if path.parent.name else path.stem)
    check_output_dir(out_dir, "checkpoint", path, args.force)
    try:
        result = export_checkpoint(path, out_dir, args.atol, args.opset, args.exporter, args.parity_images)
    except ParityError as exc:
        print(exc.parity.report(load_checkpoint(path)["classes"]))
        raise
    labels = read_labels(result.out_dir / "labels.txt")
    print(result.parity.report(labels))
    source = result.metadata["source"]
    print(f"wrote {result.out_dir}: {len(labels)} classes, {source['architecture']['name']} epoch {source['epoch']} "
          f"({source['weights']} weights), model.onnx sha256 {result.sha256[:16]}...")
    return result


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (ValueError, NotImplementedError, FileNotFoundError, RuntimeError) as exc:
        raise SystemExit(f"error: {exc}")
