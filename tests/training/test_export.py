"""training.export: real model, real photos, real ONNX Runtime; polygraphy compares the backends."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator, SimpleCompareFunc

from common.preprocessing import PreprocessConfig, load_files
from common.samples import CAT_CLASSES, ESPRESSO, sample_photos
from tests.training.tiny_torch import TinyNet, export_fixed_batch as _export_fixed_batch
from training import export, models

ARTIFACT_FILES = {"model.onnx", "labels.txt", "preprocess.json", "reference.npz", "export.json"}


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    return export.export_bundled(tmp_path_factory.mktemp("efficientnet_lite0"), atol=1e-4)


def _dim(value: onnx.ValueInfoProto, axis: int):
    d = value.type.tensor_type.shape.dim[axis]
    return d.dim_param or d.dim_value


# --- bundled EfficientNet-Lite0 ------------------------------------------------------------------


@pytest.mark.slow
def test_bundled_artifacts_and_canonical_io(bundled):
    out = bundled.out_dir
    assert {p.name for p in out.iterdir()} == ARTIFACT_FILES  # no temp or external-data files
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    onnx.checker.check_model(model, full_check=True)
    assert [v.name for v in model.graph.input] == ["images"]
    assert [v.name for v in model.graph.output] == ["logits", "probabilities"]
    assert [_dim(model.graph.input[0], a) for a in range(4)] == ["batch", 3, 224, 224]
    for output in model.graph.output:
        assert [_dim(output, a) for a in range(2)] == ["batch", 1000]
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert export.default_opset(model) == 17
    # constants folded: no Constant/Identity/Shape arithmetic left, TF-"SAME" padding as 5 plain Pads
    assert {n.op_type for n in model.graph.node} == {"Conv", "Clip", "Add", "Pad", "GlobalAveragePool", "Flatten", "Gemm", "Softmax"}

    meta = json.loads((out / "export.json").read_text())
    assert meta["onnx"]["sha256"] == export.file_sha256(out / "model.onnx")
    assert meta["num_classes"] == 1000 and meta["parity"]["passed"]
    assert meta["parity"]["max_abs_diff"] <= 1e-4 and meta["parity"]["top1_agreement"] == 1.0
    labels = (out / "labels.txt").read_text().splitlines()
    assert len(labels) == 1000 and labels[281].startswith("tabby") and labels[ESPRESSO] == "espresso"
    assert PreprocessConfig.load(out / "preprocess.json") == models.EFFICIENTNET_LITE0_PREPROCESS
    reference = np.load(out / "reference.npz")
    assert list(reference["names"]) == list(sample_photos())
    assert reference["images"].shape == (len(sample_photos()), 3, 224, 224)
    assert reference["logits"].shape == (len(sample_photos()), 1000)


@pytest.mark.slow
def test_bundled_onnxruntime_recognises_photos(bundled):
    config = PreprocessConfig.load(bundled.out_dir / "preprocess.json")
    photos = sample_photos(["chelsea", "coffee", "rocket", "astronaut", "horse"])  # batch of 5
    images = load_files(photos.values(), config)
    session = export.onnxruntime_session(bundled.model_path)
    logits, probabilities = session.run(["logits", "probabilities"], {"images": images})
    top1 = dict(zip(photos, probabilities.argmax(1)))
    assert top1["chelsea"] in CAT_CLASSES
    assert top1["coffee"] == ESPRESSO and probabilities[1, ESPRESSO] > 0.5
    assert top1["rocket"] in (657, 744)  # missile, projectile
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    (single,) = session.run(["logits"], {"images": images[:1]})  # batch 1 gives the same answer
    np.testing.assert_allclose(single, logits[:1], atol=1e-4)


class TorchRunner(BaseRunner):
    """Polygraphy runner for a PyTorch classifier (polygraphy 0.53.6's PytRunner calls .cuda())."""

    def __init__(self, model: torch.nn.Module, input_shape: tuple[int, int, int]):
        super().__init__(prefix="pytorch-runner")
        self.model = export.WithProbabilities(model).eval()
        self.input_shape = input_shape

    def activate_impl(self):
        pass

    def get_input_metadata_impl(self):
        return TensorMetadata().add("images", np.float32, (None, *self.input_shape))

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        with torch.no_grad():
            logits, probabilities = self.model(torch.from_numpy(feed_dict["images"]))
        self.inference_time = time.perf_counter() - start
        return OrderedDict(logits=logits.numpy(), probabilities=probabilities.numpy())

    def deactivate_impl(self):
        pass


@pytest.mark.slow
def test_polygraphy_onnxruntime_matches_pytorch(bundled):
    images = np.load(bundled.out_dir / "reference.npz")["images"]
    runners = [
        TorchRunner(models.load_bundled_efficientnet_lite0(), (3, 224, 224)),
        OnnxrtRunner(SessionFromOnnx(str(bundled.model_path), providers=["cpu"])),
    ]
    feeds = [{"images": images[:8]}, {"images": images[8:]}]  # two batches of different sizes
    results = Comparator.run(runners, data_loader=feeds)
    assert all(len(outputs) == 2 for _, outputs in results)  # both runners ran both batches
    # CompareFunc.simple is deprecated in polygraphy 0.53 in favour of SimpleCompareFunc
    assert bool(Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=1e-4, rtol=0.0)))
    # ... and the comparison is not vacuous: the backends differ in the last bits
    assert not bool(Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=1e-12, rtol=0.0)))


@pytest.mark.slow
def test_parity_failure_raises_and_leaves_no_model(tmp_path):
    with pytest.raises(export.ParityError) as info:
        export.export_bundled(tmp_path, atol=0.0)  # CPU kernels differ in the last bits: never exact
    assert info.value.parity.max_abs_diff > 0 and not info.value.parity.passed
    assert list(tmp_path.iterdir()) == []


# --- building blocks (fast) ----------------------------------------------------------------------


def test_remap_checks_shapes_and_kinds():
    target = OrderedDict(
        [("conv.weight", torch.zeros(4, 3, 3, 3)), ("bn.weight", torch.zeros(4)), ("bn.bias", torch.zeros(4)),
         ("bn.running_mean", torch.zeros(4)), ("bn.running_var", torch.ones(4)),
         ("bn.num_batches_tracked", torch.tensor(0))]
    )
    source = OrderedDict((f"_old.{k}", torch.full_like(v, i)) for i, (k, v) in enumerate(target.items()))
    remapped = models.remap_state_dict_by_position(source, target)
    assert list(remapped) == list(target) and remapped["bn.running_var"][0] == 4

    old_style = OrderedDict((k, v) for k, v in source.items() if not k.endswith("num_batches_tracked"))
    assert "bn.num_batches_tracked" not in models.remap_state_dict_by_position(old_style, target)

    swapped = OrderedDict(list(source.items())[:2] + [list(source.items())[3], list(source.items())[2]] + list(source.items())[4:])
    with pytest.raises(ValueError, match="tensor 2"):  # same shape, wrong kind (running_mean vs bias)
        models.remap_state_dict_by_position(swapped, target)
    source["_old.conv.weight"] = torch.zeros(4, 3, 5, 5)
    with pytest.raises(ValueError, match=r"tensor 0: checkpoint '_old.conv.weight' \(4, 3, 5, 5\)"):
        models.remap_state_dict_by_position(source, target)


def test_checkpoint_export_names_a_missing_checkpoint(tmp_path):
    # (the export of a real training run is tested in tests/training/test_train.py)
    args = export.get_args_parser().parse_args(["--checkpoint", str(tmp_path / "best.pth")])
    with pytest.raises(FileNotFoundError, match="best.pth"):
        export.main(args)


# --- importing an ONNX classifier (fast: a tiny random conv net) ---------------------------------


TINY = PreprocessConfig(resize=72, crop=64)


def test_import_onnx_renames_and_adds_softmax(tmp_path):
    net = TinyNet()
    source = _export_fixed_batch(net, tmp_path / "tiny.onnx")
    labels = [f"class {i}" for i in range(7)]
    result = export.import_onnx(source, tmp_path / "out", labels, TINY, outputs="logits")

    assert {p.name for p in result.out_dir.iterdir()} == ARTIFACT_FILES
    model = onnx.load(str(result.model_path))
    assert [v.name for v in model.graph.input] == ["images"]
    assert [v.name for v in model.graph.output] == ["logits", "probabilities"]
    assert _dim(model.graph.input[0], 0) == "batch" and all(_dim(v, 0) == "batch" for v in model.graph.output)
    assert model.graph.node[-1].op_type == "Softmax"

    images = load_files(sample_photos(["chelsea", "coffee", "rocket"]).values(), TINY)
    logits, probabilities = export.onnxruntime_session(result.model_path).run(None, {"images": images})
    with torch.no_grad():
        expected = net(torch.from_numpy(images))
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(probabilities, torch.softmax(expected, 1).numpy(), atol=1e-6)
    assert (result.out_dir / "labels.txt").read_text().splitlines() == labels
    assert PreprocessConfig.load(result.out_dir / "preprocess.json") == TINY


def test_import_onnx_refuses_fixed_batch_graph_and_wrong_labels(tmp_path):
    source = _export_fixed_batch(TinyNet(head="fixed-reshape"), tmp_path / "fixed.onnx")
    with pytest.raises(ValueError, match="fixed batch size"):
        export.import_onnx(source, tmp_path / "out", [str(i) for i in range(7)], TINY)
    assert not (tmp_path / "out").exists()  # the folder it created is gone again

    source = _export_fixed_batch(TinyNet(), tmp_path / "tiny.onnx")
    with pytest.raises(ValueError, match="the model has 7 classes but labels.txt has 5 lines"):
        export.import_onnx(source, tmp_path / "out", [str(i) for i in range(5)], TINY)
    (tmp_path / "kept").mkdir()
    with pytest.raises(ValueError, match="7 classes"):
        export.import_onnx(source, tmp_path / "kept", [str(i) for i in range(5)], TINY)
    assert list((tmp_path / "kept").iterdir()) == []  # a folder it did not create stays


# --- the import command line: nothing overwritten, errors in the user's words ---------------------

LABELS = [f"label-{i}" for i in range(7)]
TINY_ARGS = ["--input-size", "64", "--resize-size", "72"]


def _import_cli(tmp_path: Path, source: Path, labels: list[str], *args: str) -> subprocess.CompletedProcess:
    labels_file = tmp_path / f"labels{len(labels)}.txt"
    labels_file.write_text("".join(f"{label}\n" for label in labels))
    command = [sys.executable, "-m", "training.export", "--onnx", str(source), "--labels", str(labels_file),
               *TINY_ARGS, *args]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def _one_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode != 0 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    return done.stderr


def test_import_cli_overwrites_nothing_it_did_not_make(tmp_path):
    source = _export_fixed_batch(TinyNet(), tmp_path / "tiny.onnx")
    assert "--output-dir" in _one_line(_import_cli(tmp_path, source, LABELS))
    assert not (tmp_path / "artifacts").exists()

    bundled = tmp_path / "artifacts" / "efficientnet_lite0"  # what the bundled export leaves
    bundled.mkdir(parents=True)
    (bundled / "model.onnx").write_bytes(b"the bundled model")
    (bundled / "export.json").write_text(json.dumps({"source": {"kind": "bundled", "model": "bundled"}}))
    refused = _one_line(_import_cli(tmp_path, source, LABELS, "--output-dir", str(bundled)))
    assert "already holds the bundled model" in refused and "--force" in refused
    assert (bundled / "model.onnx").read_bytes() == b"the bundled model"

    mine = tmp_path / "artifacts" / "mine"
    done = _import_cli(tmp_path, source, LABELS, "--output-dir", str(mine))
    assert done.returncode == 0, done.stderr
    assert _import_cli(tmp_path, source, LABELS, "--output-dir", str(mine)).returncode == 0  # same source: refreshed
    other = _export_fixed_batch(TinyNet(), tmp_path / "other.onnx")
    assert "already holds an export of" in _one_line(_import_cli(tmp_path, other, LABELS, "--output-dir", str(mine)))
    forced = _import_cli(tmp_path, other, LABELS, "--output-dir", str(mine), "--force")
    assert forced.returncode == 0 and json.loads((mine / "export.json").read_text())["source"]["path"] == str(other)


def test_import_cli_errors_in_the_users_words(tmp_path):
    source = _export_fixed_batch(TinyNet(), tmp_path / "tiny.onnx")
    done = _import_cli(tmp_path, source, LABELS, "--output-dir", "artifacts/ok")
    assert done.returncode == 0, done.stderr
    printed = [line.split() for line in done.stdout.splitlines() if " top-1 " in line]
    assert len(printed) == len(sample_photos()) and all(words[2] in LABELS for words in printed)  # labels, not indices

    short = _one_line(_import_cli(tmp_path, source, LABELS[:3], "--output-dir", "artifacts/short"))
    assert f"the model has 7 classes but {tmp_path / 'labels3.txt'} has 3 lines" in short
    fixed = _export_fixed_batch(TinyNet(head="fixed-reshape"), tmp_path / "fixed.onnx")
    message = _one_line(_import_cli(tmp_path, fixed, LABELS, "--output-dir", "artifacts/fixed"))
    assert "exported with a fixed batch size" in message and "dynamic batch axis" in message
    assert message.count("Gemm node") == 1  # ONNX Runtime's error once, not its log line too
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["ok"]  # failed imports left nothing
