"""Importing a foreign ONNX classifier: `python -m training.export --onnx model.onnx --labels ...`.

There is no source model to compare with: the checks are the graph's own (onnx.checker, a dynamic
batch in ONNX Runtime, the class count) and sane outputs on the sample photos; export.json has
`"parity": null` and the sample photos' top-1 instead. The two mistakes people make most, a labels
file that does not match the model and a model exported with a fixed batch size, are checked first
and named in those words. A failed import leaves no folder it created behind.
"""
from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from common.contract import LABELS_TXT
from common.onnxfiles import EXTERNAL_DATA_THRESHOLD, model_sha256, save_model, weight_files
from common.preprocessing import PreprocessConfig, load_files
from common.samples import sample_photos
from training.artifacts import ExportResult, temp_model, write_artifacts
from training.onnx_graph import (CHECK_BATCH_SIZES, INPUT_NAME, LOGITS, PROBABILITIES, canonicalize_classifier,
                                 check_onnx_file, input_channels, onnxruntime_session, own_biases, run_onnxruntime,
                                 with_luma_input)

DYNAMIC_BATCH_HINT = ("export it again with a dynamic batch axis (torch.onnx.export(..., dynamic_axes={'<input>': "
                      "{0: 'batch'}, '<output>': {0: 'batch'}}), or dynamic_shapes with dynamo=True)")


def import_onnx(
    onnx_path: str | Path,
    out_dir: str | Path,
    labels: list[str],
    preprocess: PreprocessConfig,
    outputs: str = LOGITS,
    labels_name: str = LABELS_TXT,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> ExportResult:
    """Any single-input, single-output ONNX image classifier -> canonical artifact directory.

    Checks: the class count against `labels` (read from `labels_name`, for the message), a dynamic
    batch, onnx.checker, ONNX Runtime at each of CHECK_BATCH_SIZES, and on the sample photos outputs
    of shape [N, len(labels)] with finite values (probabilities summing to 1). Raises ValueError
    naming the problem; a folder this call created is removed again. model.onnx keeps its weights in
    model.onnx.data beside it when the source kept them outside (in files beside it or below its folder) or it
    would pass `external_data_threshold` bytes (common.onnxfiles).
    """
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if len(labels) < 2:
        raise ValueError(f"{labels_name} names {len(labels)} class(es): a classifier needs 2 or more (a one-column "
                         "sigmoid model: 2 lines, the negative class first)")
    external = bool(weight_files(onnx_path, nested=True))  # WeightsFileError (a ValueError): missing, outside
    source = onnx.load(str(onnx_path), load_external_data=False)  # the graph; the weights when it is written
    channels = _served_channels(source, onnx_path, preprocess)
    if channels == 1:
        source = with_luma_input(source, preprocess.layout)
    model = canonicalize_classifier(source, outputs, preprocess.input_shape, preprocess.layout)
    onnx.load_external_data_for_model(model, str(onnx_path.parent))
    model = own_biases(model)
    with _new_folder(out_dir), temp_model(out_dir) as tmp_model:
        save_model(model, tmp_model, external, external_data_threshold)
        check_classes_and_batch(tmp_model, onnx_path, preprocess.input_shape, len(labels), labels_name)
        try:
            check_onnx_file(tmp_model, preprocess.input_shape, len(labels))
        except ValueError as exc:
            raise ValueError(f"{onnx_path} cannot be made canonical: {exc}") from exc
        return _write(tmp_model, onnx_path, out_dir, labels, preprocess, outputs, channels == 1)


def _served_channels(model: onnx.ModelProto, onnx_path: Path, preprocess: PreprocessConfig) -> int | str | None:
    """The channels the model's input declares: 3 (R, G, B, as served), 1 (grayscale: the import puts the luma of
    R, G, B in front, for which the three channels must share one mean and one std), else a ValueError that says
    what is supported. A dynamic or odd count is left to the shape checks (a layout mistake is named there)."""
    channels = input_channels(model, preprocess.layout)
    other = input_channels(model, "NHWC" if preprocess.layout == "NCHW" else "NCHW")
    if channels == 1:
        if len(set(preprocess.mean)) > 1 or len(set(preprocess.std)) > 1:
            raise ValueError(f"{onnx_path} takes 1 channel (grayscale): it is given the luma of R, G and B, which "
                             "needs one mean and one std for all three; give its own normalisation three times "
                             "(e.g. --mean 0.5 0.5 0.5 --std 0.5 0.5 0.5), not "
                             f"--mean {' '.join(map(str, preprocess.mean))} --std {' '.join(map(str, preprocess.std))}")
    elif isinstance(channels, int) and channels != 3 and other not in (1, 3):
        raise ValueError(f"{onnx_path} takes {channels} channels ({preprocess.layout}): the serving pipeline feeds "
                         "3 (R, G, B), or 1 (grayscale, the luma of R, G, B added at import); export it for either")
    return channels


def _look_like_probabilities(rows: np.ndarray) -> bool:
    return bool(((rows >= 0) & (rows <= 1)).all() and np.allclose(rows.sum(axis=1), 1.0, atol=1e-3))


@contextlib.contextmanager
def _new_folder(out_dir: Path):
    """mkdir -p `out_dir`; if the block fails, remove the topmost folder this created (if any)."""
    created = next((p for p in reversed([out_dir, *out_dir.parents]) if not p.exists()), None)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield out_dir
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def check_classes_and_batch(model_path: Path, onnx_path: Path, input_shape: tuple[int, int, int],
                            num_classes: int, labels_name: str) -> None:
    """Run the canonical model at each of CHECK_BATCH_SIZES; ValueError in the user's words if its class
    count differs from the labels' or it only runs at its export batch size. ONNX Runtime's own log
    is silenced here: its message is in the exception, once."""
    session = onnxruntime_session(model_path)
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # fatal only
    for batch in CHECK_BATCH_SIZES:
        try:
            (first, *_) = session.run(None, {INPUT_NAME: np.zeros((batch, *input_shape), np.float32)}, quiet)
        except Exception as exc:  # ORT raises its own exception types
            raise ValueError(_batch_failure(onnx_path, batch, input_shape, exc)) from None
        if first.shape[0] != batch:
            raise ValueError(f"{onnx_path} answers {first.shape[0]} rows for a batch of {batch}: it was exported "
                             f"with a fixed batch size; {DYNAMIC_BATCH_HINT}")
        if first.shape[-1] != num_classes:
            one = ("; a one-column (sigmoid) output is made two classes when the graph declares it [N, 1]"
                   if first.shape[-1] == 1 else "")
            raise ValueError(f"the model has {first.shape[-1]} classes but {labels_name} has {num_classes} lines{one}")


def _batch_failure(onnx_path: Path, batch: int, input_shape: tuple[int, int, int], exc: Exception) -> str:
    reason = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", str(exc).splitlines()[0])
    if batch == CHECK_BATCH_SIZES[0]:
        return f"ONNX Runtime cannot run {onnx_path} on a batch of shape {[batch, *input_shape]} ({reason})"
    return (f"{onnx_path} runs at batch {CHECK_BATCH_SIZES[0]} but not at batch {batch}: it was exported with a "
            f"fixed batch size; {DYNAMIC_BATCH_HINT} ({reason})")


def _write(tmp_model: Path, onnx_path: Path, out_dir: Path, labels: list[str], preprocess: PreprocessConfig,
           outputs: str, grayscale: bool) -> ExportResult:
    """Sane outputs on the sample photos, then the artifact files (model.onnx last)."""
    photos = sample_photos()
    names = list(photos)
    images = load_files(photos.values(), preprocess)
    results = run_onnxruntime(tmp_model, images)
    for name, value in results.items():
        if not np.isfinite(value).all():
            raise ValueError(f"{name} has non-finite values on the sample photos")
    sums = results[PROBABILITIES].sum(axis=1)
    if not np.allclose(sums, 1.0, atol=1e-3):
        raise ValueError(f"probabilities do not sum to 1 (sums {sums.min():.4f}..{sums.max():.4f})")
    if outputs == LOGITS and _look_like_probabilities(results[LOGITS]):
        raise ValueError(f"{onnx_path}'s outputs on the sample photos are all in [0, 1] and sum to 1: the model gives "
                         "probabilities; import it with --outputs probabilities")
    metadata = {
        "source": {"kind": "onnx", "path": str(onnx_path), "sha256": model_sha256(onnx_path), "outputs": outputs,
                   "input_channels": 1 if grayscale else 3},
        "onnx": {"exporter": "import"},
        "parity": None,
        "sample_top1": dict(zip(names, results[PROBABILITIES].argmax(1).tolist())),
    }
    reference = {"images": images, "names": np.array(names), **results}
    return write_artifacts(tmp_model, out_dir, labels, preprocess, reference, metadata)
