"""The compression table (`make bench-precision`, benchmarks.compression) on small real models: each row
measures the file it names, with the gate `make engines` applies, and says how to make a missing row."""
import json
import shutil

import numpy as np
import onnx
from onnx import numpy_helper

from benchmarks import compression
from build.precision import validate
from build.precision.imagesets import held_out_set
from common.digits import write_digits_imagefolder
from common.onnxsession import cpu_session
from common.preprocessing import PreprocessConfig
from tests.tiny_model import write_tiny_classifier


def _perturbed(source, target, scale):
    """A copy of `source` whose classifier weights are changed: a model that answers differently."""
    shutil.copytree(source, target)
    model = onnx.load(target / "model.onnx")
    weight = next(t for t in model.graph.initializer if t.name == "W")
    changed = numpy_helper.to_array(weight) * np.array(scale, dtype=np.float32)
    weight.CopyFrom(numpy_helper.from_array(changed.astype(np.float32), "W"))
    onnx.save(model, target / "model.onnx")


def _top1(path, images, config):
    session = cpu_session(path, 1)
    return np.concatenate([session.run(["probabilities"], {"images": b})[0] for b in images.batches(config, 16)]).argmax(1)


def test_rows_measure_their_own_files_and_name_what_is_missing(tmp_path):
    base = write_tiny_classifier(tmp_path / "tiny")
    _perturbed(base, tmp_path / "tiny-pruned", [[1.0, -1.0, 1.0]])  # one class's weights flipped
    args = compression.get_args_parser().parse_args(
        ["--artifacts", str(base), "--rounds", "1", "--seconds", "0.05", "--views", "4", "--out", str(tmp_path / "out")])
    rows = {r["row"]: r for r in compression.main(args)}

    assert list(rows) == list(compression.ROWS)
    assert "training.distill" in rows["student"]["note"] and "accuracy" not in rows["student"]
    assert "make qat" in rows["int8 qat"]["note"]
    # Without labels: agreement with the fp32 row on the views where it is decided, computed here independently.
    config = PreprocessConfig.load(base / "preprocess.json")
    images = held_out_set(config, None, views=4)
    reference = np.concatenate([cpu_session(base / "model.onnx", 1).run(["probabilities"], {"images": b})[0]
                                for b in images.batches(config, 16)])
    ordered = np.sort(reference, axis=1)
    decided = (ordered[:, -1] - ordered[:, -2]) > validate.CONFIDENT_MARGIN
    pruned = _top1(tmp_path / "tiny-pruned" / "model.onnx", images, config)
    expected = float((pruned == reference.argmax(1))[decided].mean())
    assert rows["pruned"]["accuracy"] == expected < 1.0
    assert rows["fp32"]["accuracy"] == 1.0 and rows["fp32"]["x_fp32_b8"] == 1.0
    for row in ("int8 ptq", "pruned + int8"):
        assert rows[row]["file"].endswith("model.int8.cpu.onnx") and rows[row]["gate"].startswith(("PASS", "FAIL"))
        assert rows[row]["layout"] in ("vnni", "avx2") and rows[row]["img_s_b8"] > 0
    written = json.loads((tmp_path / "out" / "compression.json").read_text())
    assert [r["row"] for r in written] == list(compression.ROWS)
    assert (tmp_path / "out" / "compression.png").stat().st_size > 0


def test_labelled_held_out_gives_true_top1(tmp_path):
    train, val = write_digits_imagefolder(tmp_path / "digits", size=16)
    base = write_tiny_classifier(tmp_path / "tiny", num_classes=10, crop=16)
    (base / "labels.txt").write_text("".join(f"{d}\n" for d in range(10)))
    args = compression.get_args_parser().parse_args(
        ["--artifacts", str(base), "--held-out", str(val), "--calibration-images", str(train), "--rounds", "1",
         "--seconds", "0.05", "--out", str(tmp_path / "out")])
    rows = {r["row"]: r for r in compression.main(args)}

    config = PreprocessConfig.load(base / "preprocess.json")
    images = held_out_set(config, str(val))
    labels = validate.folder_labels(images, val, base / "labels.txt")
    expected = float((_top1(base / "model.onnx", images, config) == labels).mean())
    assert rows["fp32"]["metric"] == "true top-1" and rows["fp32"]["accuracy"] == expected
    assert rows["int8 ptq"]["metric"] == "true top-1"
    assert "true top-1" in rows["int8 ptq"]["gate"] or rows["int8 ptq"]["gate"].startswith("FAIL")
