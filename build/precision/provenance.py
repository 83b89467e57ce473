"""Which model.onnx a precision variant was built from: its sha256, in the variant's ONNX metadata.

quantize and fp16 stamp every file they write; validate and plans refuse a variant whose stamp is not the
sha256 of the model.onnx beside it, so that after a re-export into the same folder the old model's files
are rebuilt rather than gated, timed or built into plans (docs/precision.md). A TensorRT plan names the ONNX
file it was built from and its sha256 in `<plan>.json`; `plan_mismatch` follows that record to model.onnx.
"""
from __future__ import annotations

import json
from pathlib import Path

import onnx

from common.contract import MODEL_ONNX
from common.onnxfiles import model_sha256

SOURCE_KEY = "source_onnx_sha256"
# variant file -> the make target that writes it again from the current model.onnx
REBUILD = {"model.fp16.onnx": "make fp16", "model.int8.cpu.onnx": "make quantize", "model.int8.trt.onnx": "make quantize",
           "model.int8.cpu.avx2.onnx": "make bench-precision", "model.int8.cpu.mixed.onnx": "make bench-precision"}


def stamp(model: onnx.ModelProto, source: Path) -> None:
    """Record `source`'s sha256 in `model`'s metadata (kept beside the entries it has)."""
    entries = {p.key: p.value for p in model.metadata_props}
    entries[SOURCE_KEY] = model_sha256(source)
    onnx.helper.set_model_props(model, entries)


def recorded(path: Path) -> str | None:
    """The source sha256 an ONNX variant records, or None for a file without the stamp."""
    model = onnx.load(str(path), load_external_data=False)
    return next((p.value for p in model.metadata_props if p.key == SOURCE_KEY), None)


def mismatch(variant: Path, current: str | None = None) -> str | None:
    """Why the ONNX `variant` cannot stand for the model.onnx beside it (one line), or None: it records that
    model's sha256 (`current`, computed when not given), it is that model, or no model.onnx is beside it
    (a file built elsewhere, e.g. `plans --onnx`). A file without the stamp is refused too: it predates the
    stamp or came from elsewhere, nothing says which model it is, and rebuilding it is one command."""
    model = variant.parent / MODEL_ONNX
    if variant.name == MODEL_ONNX or not model.is_file():
        return None
    current = current or model_sha256(model)
    source = recorded(variant)
    if source == current:
        return None
    rebuild = f"`{REBUILD.get(variant.name, 'make engines')} ARTIFACTS={variant.parent}`"
    if source is None:
        return (f"{variant} records no source model (written before variants were stamped, or elsewhere): "
                f"rebuild it from {model} (sha256 {current[:12]}) with {rebuild}")
    return (f"{variant} was built from another {MODEL_ONNX} (sha256 {source[:12]}, now {current[:12]}): "
            f"rebuild it with {rebuild}")


def plan_mismatch(plan: Path, current: str | None = None) -> str | None:
    """Why the TensorRT `plan` cannot stand for the model.onnx beside it (one line), or None: the ONNX file its
    `<plan>.json` names must lie beside it with the sha256 recorded there, and be that model.onnx or a variant
    built from it. None where no model.onnx is beside the plan (nothing to compare)."""
    model = plan.parent / MODEL_ONNX
    if not model.is_file():
        return None
    precision = plan.name.removeprefix("model.").removesuffix(".plan")
    rebuild = f"`make plans PRECISION={precision} ARTIFACTS={plan.parent}`"
    try:
        record = json.loads(plan.with_name(plan.name + ".json").read_text())["onnx"]
        name, built_from = Path(record["path"]).name, str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{plan} records no source ONNX (no readable {plan.name}.json beside it): rebuild it with {rebuild}"
    source = plan.parent / name
    now = model_sha256(source) if source.is_file() else None
    if now != built_from:
        where = f"now {now[:12]}" if now else "no longer beside it"
        return f"{plan} was built from {name} (sha256 {built_from[:12]}, {where}): rebuild it with {rebuild}"
    stale = mismatch(source, current)
    return f"{plan} was built from a stale {name} ({stale})" if stale else None
