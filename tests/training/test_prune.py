"""Structured pruning: `python -m training.prune` on a tiny trained Lite0 run halves its MACs, fine-tunes,
reports parameters / MACs / top-1 before and after, and writes a checkpoint that rebuilds, evaluates,
prunes again and exports to ONNX (dynamic batch in ONNX Runtime) like any other run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from common.preprocessing import load_files
from training import evaluate, networks, prune, train
from training.checkpoint import FORMAT, load_checkpoint, model_from_checkpoint, preprocess_from_checkpoint
from training.onnx_graph import LOGITS, PROBABILITIES, run_onnxruntime
from training.pruning import model_size, prune_channels

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (3, 32, 32)


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _prune(checkpoint: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return _run("training.prune", "--checkpoint", str(checkpoint), "--output-dir", str(out), "--workers", "0",
                "--threads", "2", "--no-progress", *extra)


@pytest.fixture(scope="module")
def source_run(small_digits, tmp_path_factory) -> tuple[Path, dict]:
    """The bundled Lite0 fine-tuned for 4 steps on 120 digits at 32 px: a real training.train run."""
    train_dir, val_dir = small_digits
    out = tmp_path_factory.mktemp("prune") / "digits"
    summary = train.main(train.get_args_parser().parse_args([
        "--data-dir", str(train_dir), "--val-dir", str(val_dir), "--output-dir", str(out),
        "--crop-size", "32", "--resize-size", "32", "--batch-size", "16", "--epochs", "1", "--steps-per-epoch", "4",
        "--lr", "3e-3", "--workers", "0", "--threads", "2", "--no-progress", "--no-tensorboard",
    ]))
    return out, summary


@pytest.fixture(scope="module")
def pruned_run(source_run) -> tuple[Path, dict, str]:
    """Half the MACs in steps of 5 % of the channels, then one 2-step fine-tuning epoch."""
    source, _ = source_run
    out = source.with_name("digits-pruned")
    done = _prune(source, out, "--target-flops-reduction", "0.5", "--ratio-step", "0.05", "--fine-tune-epochs", "1",
                  "--steps-per-epoch", "2")
    return out, json.loads((out / prune.REPORT).read_text()), done.stdout


@pytest.mark.slow
def test_pruning_halves_the_macs_and_reports_accuracy_at_each_stage(source_run, pruned_run):
    _, summary = source_run
    out, report, stdout = pruned_run
    before, after = report["before"], report["after"]
    assert after["macs"] <= 0.5 * before["macs"] and report["flops_reduction"] >= 0.5
    assert after["params"] < before["params"] and after["conv_channels"] < before["conv_channels"]
    assert 0.0 < report["channel_ratio"] <= 0.9 and report["val_images"] == 40
    top1 = report["val_top1"]
    assert all(0.0 <= top1[k] <= 1.0 for k in ("before", "pruned", "fine_tuned"))
    # the same weights on the same validation images as training measured them
    assert top1["before"] == pytest.approx(summary["best"]["val_top1"])
    lines = stdout.splitlines()
    assert any(line.startswith("before pruning") for line in lines) and any(line.startswith("pruned ") for line in lines)
    assert lines[-1].startswith(f"next: make export-run RUN={out}")
    assert json.loads((out / prune.REPORT).read_text()) == report


@pytest.mark.slow
def test_pruned_checkpoint_rebuilds_the_pruned_network(pruned_run):
    out, report, _ = pruned_run
    checkpoint = load_checkpoint(out)
    assert checkpoint["format"] == FORMAT and checkpoint["pruning"]["history"]
    assert checkpoint["pruning"]["library"].startswith("torch-pruning ")
    model = model_from_checkpoint(checkpoint)
    assert model_size(model, torch.zeros((1, *SHAPE))) == report["after"]
    assert model.get_submodule(networks.head_name(model)).out_features == 10  # the head keeps every class
    assert (out / "labels.txt").read_text().splitlines() == [str(d) for d in range(10)]
    # evaluation reads the checkpoint like any other: the fine-tuned top-1 the report gives
    metrics = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--checkpoint", str(out), "--output-dir", str(out / "eval"), "--workers", "0", "--no-progress"]))
    assert metrics["eval_top1"] == pytest.approx(report["val_top1"]["fine_tuned"])


@pytest.mark.slow
def test_pruned_run_exports_to_onnx_with_a_dynamic_batch(pruned_run, small_digits, tmp_path):
    out, _, _ = pruned_run
    artifacts = tmp_path / "artifacts"
    _run("training.export", "--checkpoint", str(out), "--output-dir", str(artifacts))
    graph = onnx.load(str(artifacts / "model.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    checkpoint = load_checkpoint(out)
    model = model_from_checkpoint(checkpoint)
    files = sorted(small_digits[1].glob("*/*.png"))[:5]
    images = load_files(files, preprocess_from_checkpoint(checkpoint))
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    for batch in (1, 5):
        results = run_onnxruntime(artifacts / "model.onnx", images[:batch])
        assert results[LOGITS].shape == (batch, 10)
        np.testing.assert_allclose(results[LOGITS], expected[:batch], atol=1e-4)
        np.testing.assert_allclose(results[PROBABILITIES].sum(1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_a_pruned_run_prunes_again_by_ratio(pruned_run):
    out, first, _ = pruned_run
    again = out.with_name("digits-pruned-again")
    _prune(out, again, "--ratio", "0.25", "--round-to", "1", "--criterion", "taylor", "--importance-batches", "1",
           "--fine-tune-epochs", "0")
    report = json.loads((again / prune.REPORT).read_text())
    assert report["before"] == first["after"] and report["channel_ratio"] == pytest.approx(0.25)
    assert report["after"]["conv_channels"] == pytest.approx(0.75 * first["after"]["conv_channels"], rel=0.05)
    assert report["val_top1"]["fine_tuned"] is None
    checkpoint = load_checkpoint(again)
    assert len(checkpoint["pruning"]["history"]) > len(load_checkpoint(out)["pruning"]["history"])
    assert model_size(model_from_checkpoint(checkpoint), torch.zeros((1, *SHAPE))) == report["after"]


def test_the_pruning_history_rebuilds_a_network_and_spares_the_head():
    """No data: prune a random network, rebuild it from a checkpoint holding the history, same outputs."""
    torch.manual_seed(0)
    name, example = "timm/mobilenetv3_small_050", torch.zeros((1, *SHAPE))  # squeeze-excite blocks, hard-swish
    model = networks.build_network(name, 7).eval()
    before = model_size(model, example)
    ratio, history = prune_channels(model, example, "l1", ratio=0.5)
    assert ratio == 0.5 and model_size(model, example)["macs"] < 0.5 * before["macs"]
    assert model.get_submodule(networks.head_name(model)).out_features == 7
    checkpoint = {"model": model.state_dict(), "deploy": "model", "architecture": {"name": name, "num_classes": 7},
                  "pruning": {"input_shape": list(SHAPE), "history": history}}
    images = torch.randn((3, *SHAPE))
    with torch.no_grad():
        torch.testing.assert_close(model_from_checkpoint(checkpoint)(images), model(images))
    with pytest.raises(ValueError, match="out of reach"):
        prune_channels(networks.build_network(name, 7), example, "l1", target_reduction=0.99, ratio_step=0.45)


@pytest.mark.parametrize("argv, message", [  # a bad --ratio: tests/training/test_cli_ranges.py
    (["--checkpoint", "no/such.pt"], "training.prune: checkpoint no/such.pt does not exist"),
])
def test_bad_arguments_fail_in_one_line(argv, message):
    done = subprocess.run([sys.executable, "-m", "training.prune", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1 and done.stderr.splitlines() == [message]
