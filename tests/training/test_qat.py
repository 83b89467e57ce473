"""Quantization-aware training: the QAT network (training.qat_model), its scales keyed by ONNX tensor names
(training.qat_cache), and `python -m training.qat` end to end on a small digits run, through build/."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from build.precision import calibrate, quantize, validate
from build.precision.imagesets import ImageSet
from build.precision.variants import VariantOptions, build_variants
from common.hashing import file_sha256
from common.preprocessing import PreprocessConfig
from training import qat_cache, qat_model, train
from training.checkpoint import load_checkpoint
from training.onnx_export import export_torch_to_onnx

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (3, 16, 16)


class Tiny(nn.Module):
    """Padded strided stem, a residual block, pooled features, dropout, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 8, 3, stride=2, bias=False),
                                  nn.BatchNorm2d(8), nn.ReLU6())
        self.block = Residual(8)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(8, 4))

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels)

    def forward(self, x):
        return x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    model = Tiny()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # statistics that folding has to get right
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _train_a_little(net: qat_model.QatNetwork, steps: int = 3) -> None:
    optimizer = torch.optim.SGD(net.model.parameters(), lr=0.01)
    for _ in range(steps):
        loss = net.model(torch.randn(4, *SHAPE)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_prepare_folds_norms_shares_the_residual_input_and_gives_back_the_float_network():
    model = _tiny()
    net = qat_model.prepare(model, SHAPE)
    assert net.folded == [("stem.1", "stem.2"), ("block.conv1", "block.bn1"), ("block.conv2", "block.bn2")]
    assert net.calls == ["stem.1", "block.conv1", "block.conv2", "head.3"]
    where = {tuple(q.modules): q.at for q in net.inputs}
    assert where[("block.conv1",)] == "block"  # the block's input, skip connection included, is rounded
    assert where[("stem.1",)] == "stem.1" and where[("head.3",)] == "head.3"
    x = torch.randn(5, *SHAPE)
    net.model.eval().apply(torch.ao.quantization.disable_fake_quant)
    with torch.no_grad():
        reference = model(x)
        assert torch.allclose(net.model(x), reference, atol=1e-5)
        assert torch.allclose(net.float_model()(x), reference, atol=1e-5)
    net.model.apply(torch.ao.quantization.enable_fake_quant)
    with torch.no_grad():
        assert not torch.allclose(net.model(x), reference, atol=1e-5)  # the fake quantization acts
    conv = net.model.get_submodule("block.conv1")
    weight = conv.parametrizations.weight.original
    expected = weight.abs().amax(dim=(1, 2, 3)) / 127  # per output channel, as ONNX Runtime computes it
    assert torch.allclose(conv.parametrizations.weight[0].scale, expected)
    assert set(net.float_model().state_dict()) == set(model.state_dict())


def test_fine_tuned_float_network_is_what_qat_trained(tmp_path):
    net = qat_model.prepare(_tiny(), SHAPE)
    _train_a_little(net)
    float_model = net.float_model()
    norm = float_model.block.bn1
    assert torch.all(norm.weight == 1) and torch.all(norm.running_mean == 0)  # an identity carrying the bias
    net.model.eval().apply(torch.ao.quantization.disable_fake_quant)
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(float_model(x), net.model(x), atol=1e-5)


def test_modules_map_to_the_exported_onnx_tensors_and_scales_spread_through_pad_and_flatten(tmp_path):
    net = qat_model.prepare(_tiny(), SHAPE)
    _train_a_little(net)
    path = tmp_path / "tiny.onnx"
    export_torch_to_onnx(net.float_model(), path, SHAPE, 17)
    model = onnx.load(str(path))
    tensors = qat_cache.input_tensors(model, net.weighted_modules())
    producer = {out: node.op_type for node in model.graph.node for out in node.output}
    assert producer[tensors["stem.1"]] == "Pad" and producer[tensors["head.3"]] == "Flatten"
    scales = qat_cache.learned_scales(net, model)
    for q in net.inputs:
        assert scales[tensors[q.modules[0]]] == q.scale
    assert scales["images"] == scales[tensors["stem.1"]]  # through the Pad: the CPU file quantizes Pad's input
    pooled = [n for n in model.graph.node if n.op_type == "GlobalAveragePool"][0].output[0]
    assert scales[pooled] == scales[tensors["head.3"]]  # through the Flatten
    with pytest.raises(ValueError, match="does not match ONNX node"):
        qat_cache.input_tensors(model, list(reversed(net.weighted_modules())))
    with pytest.raises(ValueError, match="cannot be paired"):
        qat_cache.input_tensors(model, net.weighted_modules()[1:])


def _tiny_artifacts(tmp_path: Path) -> tuple[Path, qat_model.QatNetwork, ImageSet, PreprocessConfig]:
    net = qat_model.prepare(_tiny(), SHAPE)
    _train_a_little(net)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    export_torch_to_onnx(net.float_model(), artifacts / "model.onnx", SHAPE, 17)
    config = PreprocessConfig(resize=16, crop=16)
    config.save(artifacts / "preprocess.json")
    crops = np.random.default_rng(0).integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)
    return artifacts, net, ImageSet(crops, [f"{i}" for i in range(12)], "12 random crops"), config


def test_qat_cache_drives_both_int8_files_and_calibrate_reuses_it(tmp_path):
    artifacts, net, images, config = _tiny_artifacts(tmp_path)
    model_path = artifacts / "model.onnx"
    learned = qat_cache.learned_scales(net, onnx.load(str(model_path)))
    written = qat_cache.write_qat_cache(model_path, artifacts / "calibration", learned, images, config, {"checkpoint": "x"})
    header, scales = calibrate.read_cache(artifacts / "calibration" / "qat.cache")
    assert header.endswith("-MinMaxCalibration") and scales == written.scales
    assert all(scales[name] == np.float32(scale) for name, scale in learned.items())
    assert set(scales) == set(calibrate.activation_tensors(onnx.load(str(model_path))))
    meta = written.meta
    assert meta["method"] == "qat" and meta["onnx_sha256"] == file_sha256(model_path)
    assert meta["algorithm_version"] == calibrate.ALGORITHM_VERSION and sorted(meta["qat"]["learned_tensors"]) == sorted(learned)

    reused = calibrate.calibrate(model_path, artifacts / "calibration", "qat", images, config)
    assert reused.reused and reused.scales == scales and "reusing" in reused.message
    other_images = ImageSet(images.crops[::-1].copy(), images.names, "other")  # a qat cache does not depend on them
    assert calibrate.calibrate(model_path, artifacts / "calibration", "qat", other_images, config).reused
    for target in quantize.TARGETS:
        quantize.quantize(model_path, reused, target, artifacts / quantize.output_name(target))
    trt = onnx.load(str(artifacts / quantize.output_name("trt")))
    initializers = {i.name: numpy_helper.to_array(i) for i in trt.graph.initializer}
    q_scales = {n.input[0]: initializers[n.input[1]] for n in trt.graph.node if n.op_type == "QuantizeLinear"}
    for name in qat_cache.input_tensors(onnx.load(str(model_path)), net.weighted_modules()).values():
        assert q_scales[name] == np.float32(scales[name])  # QAT's scale, bit for bit

    stale = onnx.load(str(model_path))
    onnx.helper.set_model_props(stale, {"changed": "yes"})
    onnx.save(stale, str(model_path))
    with pytest.raises(ValueError, match="written by python -m training.qat"):
        calibrate.calibrate(model_path, artifacts / "calibration", "qat", images, config)


def test_methods_calibrate_computes_are_unchanged_and_quantize_accepts_qat():
    assert calibrate.METHODS == ("max", "percentile", "entropy")
    assert calibrate.get_args_parser().parse_args(["--method", "entropy"]).method == "entropy"
    with pytest.raises(SystemExit):
        calibrate.get_args_parser().parse_args(["--method", "qat"])  # nothing to compute it from
    assert quantize.get_args_parser().parse_args(["--method", "qat"]).method == "qat"


# --- python -m training.qat on a small digits run --------------------------------------------------------------


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def qat_run(small_digits, tmp_path_factory):
    """A small digits run (Lite0 at 32 px, one short epoch), then `python -m training.qat` on it."""
    train_dir, val_dir = small_digits
    work = tmp_path_factory.mktemp("qat")
    train.main(train.get_args_parser().parse_args([
        "--data-dir", str(train_dir), "--val-dir", str(val_dir), "--output-dir", str(work / "run"),
        "--crop-size", "32", "--resize-size", "32", "--batch-size", "16", "--epochs", "1", "--lr", "3e-3",
        "--workers", "0", "--threads", "2", "--no-progress", "--no-tensorboard"]))
    done = _run("-m", "training.qat", "--checkpoint", str(work / "run"), "--output-dir", str(work / "run-qat"),
                "--artifacts", str(work / "qat"), "--baseline-artifacts", str(work / "ptq"), "--epochs", "1",
                "--batch-size", "16", "--workers", "0", "--threads", "2", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    return work, done


@pytest.mark.slow
def test_cli_writes_a_float_run_that_exports_like_any_run(qat_run, tmp_path):
    work, done = qat_run
    assert done.stdout.strip().splitlines()[-1].startswith(f"next: make engines ARTIFACTS={work / 'qat'} PRECISION=int8 METHOD=qat")
    checkpoint = load_checkpoint(work / "run-qat")
    assert checkpoint["qat"]["source"] == str(work / "run" / "best.pt") and checkpoint["model_ema"] is None
    exported = _run("-m", "training.export", "--checkpoint", str(work / "run-qat"), "--output-dir", str(tmp_path / "again"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    # the export is deterministic: re-exporting the run gives the ONNX the qat cache was written for
    assert file_sha256(tmp_path / "again" / "model.onnx") == file_sha256(work / "qat" / "model.onnx")


@pytest.mark.slow
def test_cache_covers_every_quantized_tensor_with_the_scales_qat_learned(qat_run):
    work, _ = qat_run
    artifacts = work / "qat"
    header, scales = calibrate.read_cache(artifacts / "calibration" / "qat.cache")
    meta = json.loads((artifacts / "calibration" / "qat.json").read_text())
    ptq_meta = json.loads((work / "ptq" / "calibration" / "max.json").read_text())
    assert header.startswith("TRT-") and set(ptq_meta) <= set(meta)  # calibrate's keys, and one more: qat
    assert meta["method"] == "qat" and meta["onnx_sha256"] == file_sha256(artifacts / "model.onnx")
    assert meta["preprocess"] == json.loads((artifacts / "preprocess.json").read_text())
    model = onnx.load(str(artifacts / "model.onnx"))
    inputs = [node.input[0] for node, _ in qat_cache.weighted_nodes(model)]
    assert len(inputs) == 50 and set(inputs) <= set(meta["qat"]["learned_tensors"]) <= set(scales)
    learned = {float(np.float32(s)) for s in load_checkpoint(work / "run-qat")["qat"]["input_scales"].values()}
    assert {scales[name] for name in inputs} == learned


@pytest.mark.slow
def test_quantize_and_the_engines_chain_accept_the_qat_cache(qat_run, tmp_path):
    work, _ = qat_run
    artifacts = work / "qat"
    done = _run("-m", "build.precision.quantize", "--artifacts", str(artifacts), "--method", "qat")
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(f"wrote {artifacts / quantize.output_name(t)} from {artifacts / 'calibration' / 'qat.cache'}" in done.stdout
               for t in quantize.TARGETS)
    config = PreprocessConfig.load(artifacts / "preprocess.json")
    lines = []
    build_variants(artifacts, "int8", VariantOptions(calibration_method="qat"), config, lines.append)  # make engines' path
    assert any(line.startswith("reusing calibration cache") and "qat.cache" in line for line in lines), lines
    missing = _run("-m", "build.precision.quantize", "--artifacts", str(work / "ptq"), "--method", "qat")
    assert missing.returncode == 1 and "run python -m training.qat first" in missing.stderr


@pytest.mark.slow
def test_gate_reports_true_accuracy_before_and_after(qat_run, small_digits):
    work, done = qat_run
    report = json.loads((work / "run-qat" / "qat.json").read_text())
    for kind in ("ptq", "qat"):
        assert set(report["top1"][kind]) == {"fp32", "int8-cpu", "int8-trt"}
        assert all(0.0 <= value <= 1.0 for value in report["top1"][kind].values())
    assert "after QAT" in done.stdout and "before QAT (PTQ)" in done.stdout
    held_out = str(small_digits[1])
    gated = _run("-m", "build.precision.validate", "--artifacts", str(work / "qat"), "--held-out", held_out,
                 "--variants", "int8-cpu", "int8-trt", "--report", str(work / "gate.json"))
    assert gated.returncode in (0, 2), gated.stderr[-2000:]  # 2: a variant failed its gate, which it may
    variants = {v["name"]: v for v in json.loads((work / "gate.json").read_text())["variants"]}
    assert {name: variants[name]["accuracy"] for name in ("fp32", "int8-cpu", "int8-trt")} == report["top1"]["qat"]
    assert all(validate.VARIANTS[name][0] == variants[name]["file"] for name in ("int8-cpu", "int8-trt"))
