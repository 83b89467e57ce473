"""`make train-demo`: the whole training path on a real labeled dataset, on a CPU.

    python -m training.demo        # digits -> fine-tune Lite0 -> ONNX -> Triton repository -> served answers

1. scikit-learn's handwritten digits written as an ImageFolder (common.digits)
2. fine-tune the bundled ImageNet EfficientNet-Lite0 on them (training.train)
3. export the best checkpoint with its labels and preprocessing, parity-checked (training.export)
4. build a model repository for it (build.engines)
5. start a real tritonserver, send every held-out digit through the ensemble (gRPC, batches of
   --request-batch), compare the served labels with the truth
Exits non-zero if the served accuracy is below --target.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from clients.client import ImageClassifierClient
from common.digits import write_digits_imagefolder
from serving.health import SEEDS, number
from serving.server import TritonServer
from training import train
from training.loop import RUN_RECORDS
from training.onnx_export import export_checkpoint


def train_arguments(args: argparse.Namespace, train_dir: Path, val_dir: Path) -> argparse.Namespace:
    """The training.train arguments of the demo recipe (digits: no flips, mild crops)."""
    argv = [
        "--data-dir", str(train_dir), "--val-dir", str(val_dir), "--output-dir", str(args.run_dir),
        "--crop-size", str(args.crop_size), "--resize-size", str(args.crop_size),
        "--epochs", str(args.epochs), "--steps-per-epoch", str(args.steps_per_epoch),
        "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--lr-warmup-epochs", "0.2",
        "--hflip-prob", "0", "--auto-augment", "none", "--scale-min", "0.6", "--random-erase", "0",
        "--color-jitter", "0.2", "--label-smoothing", "0.1", "--workers", str(args.workers),
        "--threads", str(args.threads), "--seed", str(args.seed),
    ]
    return train.get_args_parser().parse_args(argv + ([] if args.progress else ["--no-progress"]))


def clear_previous_run(run_dir: Path, train_dir: Path) -> bool:
    """The demo trains afresh each time: the records of an earlier run in `run_dir` on these very digits go
    (training.train refuses a new run in a run's folder); a run on other data stays, and training refuses it."""
    try:
        trained_on = Path(json.loads((run_dir / "args.json").read_text())["data_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if trained_on.resolve() != Path(train_dir).resolve():
        return False
    for name in RUN_RECORDS:
        (run_dir / name).unlink(missing_ok=True)
    return True


def classify_served(repository: Path, files: list[tuple[str, str]], batch: int, log_file: Path) -> tuple[float, list]:
    """(accuracy, wrong answers) of the real server on (path, true label) pairs."""
    wrong, correct = [], 0
    with TritonServer(repository, log_file=log_file) as server:
        with ImageClassifierClient(server.grpc_url, protocol="grpc") as client:
            start = time.perf_counter()
            for i in range(0, len(files), batch):
                chunk = files[i:i + batch]
                answers = client.classify([Path(p).read_bytes() for p, _ in chunk], top_k=1)
                for (path, truth), top in zip(chunk, answers):
                    if top[0].label == truth:
                        correct += 1
                    else:
                        wrong.append((path, truth, top[0].label, top[0].score))
            elapsed = time.perf_counter() - start
            print(f"served {len(files)} images over gRPC in {elapsed:.1f} s ({len(files) / elapsed:.0f} img/s)")
            for path, truth, label, score in wrong[:5]:
                print(f"    {path}: true {truth}, served {label} ({score:.2f})")
    return correct / len(files), wrong


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=Path("data/digits"), help="(default: %(default)s)")
    p.add_argument("--run-dir", type=Path, default=Path("runs/digits"), help="(default: %(default)s)")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts/digits"), help="(default: %(default)s)")
    p.add_argument("--repository", type=Path, default=Path("runs/digits/model_repository"), help="(default: %(default)s)")
    p.add_argument("--image-size", type=number(int, 16), default=32, help="side of the written digit PNGs, at least 16 (the serving preprocess refuses smaller) (default: %(default)s)")
    p.add_argument("--crop-size", type=number(int, 1), default=64, help="model input side (default: %(default)s)")
    p.add_argument("--epochs", type=number(int, 1), default=4, help="(default: %(default)s)")
    p.add_argument("--steps-per-epoch", type=number(int, 0), default=0, help="0 = all (default: %(default)s)")
    p.add_argument("--batch-size", type=number(int, 1), default=64, help="(default: %(default)s)")
    p.add_argument("--lr", type=number(float, 0, above_low=True), default=2e-3, help="(default: %(default)s)")
    p.add_argument("--workers", type=number(int, 0), default=1, help="(default: %(default)s)")
    p.add_argument("--threads", type=number(int, 0), default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--seed", type=number(int, *SEEDS), default=0, help="a 64-bit signed integer (default: %(default)s)")
    p.add_argument("--request-batch", type=number(int, 1), default=32, help="images per request (default: %(default)s)")
    p.add_argument("--target", type=number(float, 0, 1), default=0.95, help="minimum served top-1 accuracy (default: %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    return p


def main(args: argparse.Namespace) -> dict:
    from build import engines  # polygraphy, ONNX Runtime quantisation: only for the demo run

    started = time.perf_counter()
    train_dir, val_dir = write_digits_imagefolder(args.data_root, size=args.image_size)
    print(f"== 1. data: {train_dir} and {val_dir}")
    if clear_previous_run(args.run_dir, train_dir):
        print(f"   (cleared the earlier demo run's checkpoints and metrics in {args.run_dir})")
    print(f"== 2. training -> {args.run_dir}")
    summary = train.main(train_arguments(args, train_dir, val_dir))
    trained_s = time.perf_counter() - started
    print(f"== 3. export -> {args.artifacts}")
    exported = export_checkpoint(args.run_dir, args.artifacts)
    print(exported.parity.report(summary["classes"]).splitlines()[-1])
    print(f"== 4. model repository -> {args.repository}")
    engines.main(engines.get_args_parser().parse_args(["--artifacts", str(args.artifacts), "--out", str(args.repository)]))
    print("== 5. serving the held-out digits")
    val_files = [(p, Path(p).parent.name) for p in sorted(map(str, val_dir.rglob("*.png")))]
    accuracy, wrong = classify_served(args.repository, val_files, args.request_batch, args.run_dir / "tritonserver.log")
    result = {"val_top1_pytorch": summary["best"]["val_top1"], "served_top1": accuracy, "served_images": len(val_files),
              "served_wrong": len(wrong), "train_seconds": trained_s, "total_seconds": time.perf_counter() - started,
              "target": args.target, "passed": accuracy >= args.target,
              "train_images_per_s": summary["best"]["train_images_per_s"]}
    (args.run_dir / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"served top-1 {accuracy:.2%} on {len(val_files)} held-out digits (PyTorch eval {result['val_top1_pytorch']:.2%}); "
          f"training {trained_s:.0f} s, total {result['total_seconds']:.0f} s; target {args.target:.0%}: "
          + ("PASS" if result["passed"] else "FAIL"))
    return result


if __name__ == "__main__":
    try:
        outcome = main(get_args_parser().parse_args())
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        sys.exit(f"error: {exc}")
    sys.exit(0 if outcome["passed"] else 1)
