"""training.evaluate: an imported model whose labels are not in alphabetical order, many classes (a capped
figure, the data files written before it)."""
from __future__ import annotations

import csv
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image

from tests.tiny_model import write_tiny_classifier
from training import evaluate

RED, GREEN = (255, 0, 0), (0, 255, 0)


def _image_folder(root, colours: dict[str, tuple], per_class: int = 2):
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (16, 16), colour).save(root / name / f"{i}.png")
    return root


def _evaluate(artifacts, data_dir, out) -> dict:
    return evaluate.main(evaluate.get_args_parser().parse_args(
        ["--artifacts", str(artifacts), "--data-dir", str(data_dir), "--output-dir", str(out), "--workers", "0",
         "--no-progress"]))


@pytest.fixture
def red_green_model(tmp_path):
    """An ONNX classifier with labels.txt "b", "a" (not alphabetical): red images are class 0 ("b"),
    green ones class 1 ("a")."""
    out = write_tiny_classifier(tmp_path / "artifacts", num_classes=2, crop=8)
    model = onnx.load(out / "model.onnx")
    weight = next(t for t in model.graph.initializer if t.name == "W")
    weight.CopyFrom(numpy_helper.from_array(np.array([[1, -1], [-1, 1], [0, 0]], np.float32), "W"))
    onnx.save(model, out / "model.onnx")
    (out / "labels.txt").write_text("b\na\n")
    return out


def test_artifacts_with_labels_in_the_models_order(red_green_model, tmp_path):
    data_dir = _image_folder(tmp_path / "val", {"a": GREEN, "b": RED})
    report = _evaluate(red_green_model, data_dir, tmp_path / "eval")  # was "has classes ['a', 'b']; expected ['b', 'a']"
    assert report["eval_top1"] == 1.0
    assert [(row["class"], row["recall"], row["support"]) for row in report["per_class"]] == [("b", 1.0, 2), ("a", 1.0, 2)]

    (data_dir / "c").mkdir()
    Image.new("RGB", (16, 16)).save(data_dir / "c" / "0.png")
    with pytest.raises(ValueError, match=r"model's classes are \['b', 'a'\] \(missing folders \[\], folders not in "
                                         r"the model \['c'\]\)"):
        _evaluate(red_green_model, data_dir, tmp_path / "eval")
    (red_green_model / "labels.txt").write_text("b\nb\n")
    with pytest.raises(ValueError, match=r"labels name \['b'\] more than once"):
        _evaluate(red_green_model, data_dir, tmp_path / "eval")


def test_data_files_are_written_before_the_figure(red_green_model, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(evaluate, "plot_confusion", out_of_memory)
    (red_green_model / "labels.txt").write_text("a\nb\n")
    data_dir = _image_folder(tmp_path / "val", {"a": RED, "b": RED})  # every "b" image is taken for "a"
    with pytest.raises(MemoryError):
        _evaluate(red_green_model, data_dir, tmp_path / "eval")
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["eval_top1"] == 0.5
    with open(tmp_path / "eval" / "misclassified.csv") as f:
        assert [(r["label"], r["predicted"]) for r in csv.DictReader(f)] == [("b", "a"), ("b", "a")]
    with open(tmp_path / "eval" / "confused_pairs.csv") as f:
        assert list(csv.DictReader(f)) == [{"label": "b", "predicted": "a", "count": "2", "share": "1.0"}]


def test_the_confusion_figure_stays_small_with_many_classes(tmp_path):
    rng = np.random.default_rng(0)
    for count in (50, 300):  # uncapped: 2450 px square; 13700 px square and 6.5 GB of memory
        confusion = rng.integers(0, 3, (count, count)) + np.diag(np.full(count, 20))
        confusion[7, 3] = 50
        classes = [f"class {i}" for i in range(count)]
        evaluate.plot_confusion(confusion, classes, tmp_path / f"{count}.png", "title")
        width, height = Image.open(tmp_path / f"{count}.png").size
        assert max(width, height) <= 1600, count  # MAX_INCHES at 100 dpi
        pairs = evaluate.confused_pairs(confusion, classes)
        assert pairs[0] == {"label": "class 7", "predicted": "class 3", "count": 50, "share": 50 / confusion[7].sum()}
        assert len(pairs) == np.count_nonzero(confusion) - count
    assert (width, height) == (1600, 800)  # the matrix beside the pairs
