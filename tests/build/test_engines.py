"""`python -m build.engines` end to end: precision chain, gate, fallback, and serving the INT8 variant."""
import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from build.engines import get_args_parser, main
from build.precision.variants import GateFailed
from clients.client import ImageClassifierClient
from common.preprocessing import PreprocessConfig, load_batch
from common.samples import ESPRESSO
from serving.server import TritonServer
from tests.tiny_model import write_near_tie_classifier


def engines(*argv):
    return main(get_args_parser().parse_args(list(argv)))


def test_int8_chain_on_a_small_model(tiny_artifacts, tmp_path, capsys):
    out = tmp_path / "repo"
    manifest = engines("--artifacts", str(tiny_artifacts), "--out", str(out), "--precision", "int8",
                       "--min-agreement-int8", "0")
    printed = capsys.readouterr().out
    assert "TensorRT plan not built: the python-onnxruntime backend serves an ONNX file, not a plan" in printed
    assert manifest["variant"] == "int8-cpu" and manifest["precision"] == "int8"
    assert manifest["classifier_model"]["source"].endswith("model.int8.cpu.onnx")
    assert json.loads((out / "BUILD.json").read_text())["validation"][1]["name"] == "int8-cpu"
    engines("--artifacts", str(tiny_artifacts), "--out", str(out), "--precision", "int8", "--min-agreement-int8", "0")
    assert "reusing calibration cache" in capsys.readouterr().out


def test_gate_failure_deploys_nothing_unless_fallback_is_asked(tmp_path):
    """A model whose FP16 file genuinely disagrees with it (tests/tiny_model.py: two logits 0.5 apart at 2048),
    gated at the default thresholds: nothing deployed, or FP32 with --allow-fallback. Its INT8 CPU file, whose
    logits stay float (int32 biases keep the 0.5), passes with every layer quantized: before, its 8-bit logits
    tied the two classes and it failed at 0.00 %."""
    artifacts = write_near_tie_classifier(tmp_path / "near-tie")
    out = tmp_path / "repo"
    with pytest.raises(GateFailed, match="fp16 failed the accuracy gate and is not deployed: top-1 agreement 0.00%"):
        engines("--artifacts", str(artifacts), "--out", str(out), "--precision", "fp16")
    assert not out.exists()
    manifest = engines("--artifacts", str(artifacts), "--out", str(out), "--precision", "fp16", "--allow-fallback")
    assert manifest["variant"] == "fp32" and manifest["classifier_model"]["source"].endswith("model.onnx")
    config = text_format.Parse((out / "classifier" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    built = json.loads((out / "BUILD.json").read_text())
    assert config.parameters["precision"].string_value == built["precision"] == built["spec"]["precision"] == "fp32"
    cli = subprocess.run([sys.executable, "-m", "build.engines", "--artifacts", str(artifacts), "--out",
                          str(tmp_path / "other"), "--precision", "fp16"], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 1 and "build.engines: fp16 failed the accuracy gate" in cli.stderr
    assert not (tmp_path / "other").exists()
    int8 = engines("--artifacts", str(artifacts), "--out", str(tmp_path / "int8"), "--precision", "int8",
                   "--int8-max-float-layers", "0")
    report = next(r for r in int8["validation"] if r["name"] == "int8-cpu")
    assert int8["variant"] == "int8-cpu" and report["passed"] and report["top1_agreement"] == 1.0, report
    assert not report["float_layers"]


@pytest.mark.slow
def test_int8_cpu_variant_served_through_the_ensemble(lite0_artifacts, tmp_path, photos):
    """Lite0's INT8 CPU file in the portable avx2 layout (the same answers on every CI machine's CPU)
    fails a 99 % gate with every layer quantized (bias-corrected: 97 % of the decided views); mixed precision gives its costliest layers back to
    float until it passes, the file says which, and the deployed file answers through a real server
    exactly as it does in process."""
    import shutil

    from build.precision.mixed import float_nodes

    artifacts = tmp_path / "lite0"
    shutil.copytree(lite0_artifacts, artifacts)
    repo = tmp_path / "repo"
    manifest = engines("--artifacts", str(artifacts), "--out", str(repo), "--precision", "int8",
                       "--int8-cpu-layout", "avx2", "--min-agreement-int8", "0.99")
    int8 = artifacts / "model.int8.cpu.onnx"
    assert (repo / "classifier" / "1" / "model.onnx").read_bytes() == int8.read_bytes()
    report = next(r for r in manifest["validation"] if r["name"] == "int8-cpu")
    assert report["passed"] and report["layout"] == "avx2" and report["confident_agreement"] >= 0.99
    assert 1 <= len(report["float_layers"]) <= 8 and float_nodes(int8) == report["float_layers"]
    ranking = json.loads((artifacts / "calibration" / "max.avx2.ranking.json").read_text())
    assert ranking["nodes"][:len(report["float_layers"])] == report["float_layers"]
    images = [photos[n] for n in ("coffee", "chelsea", "rocket")]
    config = PreprocessConfig.load(artifacts / "preprocess.json")
    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    (expected,) = session.run(["probabilities"], {"images": load_batch(images, config)})
    with TritonServer(repo, log_file=tmp_path / "server.log") as server:
        for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
            with ImageClassifierClient(url, protocol) as client:
                np.testing.assert_allclose(client.probabilities(images), expected, atol=1e-6)
                assert client.classify(images, top_k=1)[0][0].index == ESPRESSO


def test_served_classifier_refuses_an_int8_layout_its_cpu_cannot_run(tiny_artifacts, tmp_path):
    """The classifier checks the INT8 file's layout against its CPU when it loads: a file that needs a
    CPU flag this machine lacks is refused in one log line, the model is not ready and neither is the
    server (never wrong answers). Today's CPU may have every VNNI flag, so the file asks for one no CPU has."""
    import shutil

    import onnx

    from common import cpu
    from serving.server import ServerError

    artifacts = tmp_path / "tiny"
    shutil.copytree(tiny_artifacts, artifacts)
    repo = tmp_path / "repo"
    engines("--artifacts", str(artifacts), "--out", str(repo), "--precision", "int8", "--min-agreement-int8", "0")
    served = repo / "classifier" / "1" / "model.onnx"
    model = onnx.load(str(served))
    assert {p.key: p.value for p in model.metadata_props}[cpu.LAYOUT_KEY] == cpu.integer_path()
    with TritonServer(repo, log_file=tmp_path / "accepted.log") as server:  # as built: served
        with ImageClassifierClient(server.http_url, "http") as client:
            assert client.probabilities([_png()]).shape == (1, 3)
    onnx.helper.set_model_props(model, {cpu.LAYOUT_KEY: "vnni", cpu.REQUIRES_KEY: "no_cpu_has_this_flag"})
    onnx.save(model, str(served))

    log = tmp_path / "refused.log"
    with pytest.raises(ServerError, match="exited with code") as exited:  # the default: the server refuses to start
        TritonServer(repo, log_file=log).start(timeout=120)
    assert "refusing the INT8 CPU model" in str(exited.value) and "no_cpu_has_this_flag" in str(exited.value)
    lenient = TritonServer(repo, log_file=tmp_path / "lenient.log", extra_args=["--exit-on-error=false"])
    with pytest.raises(ServerError, match="not ready after"):  # up, but never reports itself ready
        lenient.start(timeout=20)
    lines = [ln for ln in (tmp_path / "lenient.log").read_text().splitlines() if "failed to load 'classifier' version 1" in ln]
    assert len(lines) == 1 and "refusing the INT8 CPU model" in lines[0] and "INT8_CPU_LAYOUT=avx2" in lines[0], lines


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()
