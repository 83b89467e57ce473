"""Evaluate a trained model on an ImageFolder: accuracy, per-class report, confusion matrix, and
the most confidently misclassified images (the first place to look for label errors).

    python -m training.evaluate --checkpoint runs/digits                   # the run's own val images
    python -m training.evaluate --artifacts artifacts/digits --data-dir data/digits/val   # the ONNX model

Writes to --output-dir (default: <run>/eval or <artifacts>/eval): metrics.json (top-1, top-5, macro-F1,
per-class precision / recall / F1 / support), confusion_matrix.csv (rows: true class, columns: predicted,
in the model's class order; the first row and column name them), confused_pairs.csv (label, predicted,
count, share of the label's images; most frequent first), misclassified.csv (path, label, predicted,
confidence, probability of the label; most confident first), and last confusion_matrix.png: the labelled
matrix up to LABELLED_CLASSES classes, above that the matrix without names beside the most confused pairs.
Images go through the serving preprocess (decode_image + resize_and_crop + normalize). The class folders
of --data-dir must be the model's class names, in any order.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.labels import read_labels
from common.preprocessing import PreprocessConfig
from training import data, presets
from training.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_from_checkpoint
from serving.health import number
from training.engine import metrics_from_summary, summarize


def per_class_report(confusion: np.ndarray, classes: list[str]) -> list[dict]:
    tp = np.diag(confusion).astype(float)
    predicted, actual = confusion.sum(0), confusion.sum(1)
    rows = []
    for i, name in enumerate(classes):
        p = tp[i] / predicted[i] if predicted[i] else 0.0
        r = tp[i] / actual[i] if actual[i] else 0.0
        rows.append({"class": name, "precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
                     "support": int(actual[i])})
    return rows


LABELLED_CLASSES = 60  # more names than this overlap on a figure of MAX_INCHES
MAX_INCHES = 16.0  # at 100 dpi; the figure's memory grows with its area (1000 classes uncapped: ~70 GB)
PLOTTED_PAIRS = 20


def confused_pairs(confusion: np.ndarray, classes: list[str]) -> list[dict]:
    """Every (label, predicted) pair of distinct classes with a mistake, most frequent first."""
    mistakes = confusion.copy()
    np.fill_diagonal(mistakes, 0)
    true, predicted = np.nonzero(mistakes)
    counts = mistakes[true, predicted]
    support = confusion.sum(1)
    return [{"label": classes[t], "predicted": classes[p], "count": int(n), "share": float(n / support[t])}
            for t, p, n in sorted(zip(true, predicted, counts), key=lambda row: -row[2])]


def plot_confusion(confusion: np.ndarray, classes: list[str], path: Path, title: str,
                   pairs: list[dict] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(classes) > LABELLED_CLASSES:
        fig, (ax, bars) = plt.subplots(1, 2, figsize=(MAX_INCHES, MAX_INCHES / 2))
        mistakes = confusion.copy()
        np.fill_diagonal(mistakes, 0)  # the correct answers would set the colour scale
        ax.imshow(mistakes, cmap="Blues")
        ax.set(xticks=[], yticks=[], xlabel=f"predicted ({len(classes)} classes: confusion_matrix.csv)",
               ylabel="true", title=f"{title}\nmistakes (diagonal left out)")
        top = (pairs if pairs is not None else confused_pairs(confusion, classes))[:PLOTTED_PAIRS]
        bars.barh(range(len(top)), [p["count"] for p in top])
        bars.set_yticks(range(len(top)), [f"{p['label'][:30]} -> {p['predicted'][:30]}" for p in top])
        bars.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        bars.invert_yaxis()
        bars.set(xlabel="images", title="most confused pairs (all: confused_pairs.csv)")
    else:
        size = min(max(5.0, 0.45 * len(classes) + 2), MAX_INCHES)
        fig, ax = plt.subplots(figsize=(size, size))
        ax.imshow(confusion, cmap="Blues")
        ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true", title=title)
        ax.set_xticklabels(classes, rotation=90)
        ax.set_yticklabels(classes)
        if len(classes) <= 30:
            threshold = confusion.max() / 2 if confusion.size else 0
            for (i, j), value in np.ndenumerate(confusion):
                if value:
                    ax.text(j, i, int(value), ha="center", va="center", fontsize=8,
                            color="white" if value > threshold else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def misclassified(probabilities: np.ndarray, labels: np.ndarray, paths: list[str], classes: list[str],
                  limit: int) -> list[dict]:
    predicted = probabilities.argmax(1)
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")][:limit]
    return [{"path": paths[i], "label": classes[labels[i]], "predicted": classes[predicted[i]],
             "confidence": float(probabilities[i, predicted[i]]), "p_label": float(probabilities[i, labels[i]])}
            for i in wrong]


def _torch_runner(checkpoint: dict, weights: str | None):
    model = model_from_checkpoint(checkpoint, weights)

    def infer(images: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(model(images).float(), 1).numpy()
    return infer


def _onnx_runner(model_path: Path):
    from training.onnx_graph import INPUT_NAME, PROBABILITIES, onnxruntime_session  # ONNX Runtime: only here

    session = onnxruntime_session(model_path)
    return lambda images: session.run([PROBABILITIES], {INPUT_NAME: images.numpy()})[0]


def run_model(infer, split: data.Split, preprocess: PreprocessConfig, batch_size: int, workers: int,
              progress: bool = True):
    dataset = data.ImageFolderDataset(split, presets.EvalPreset(preprocess), draft_size=preprocess.resize)
    sampler = data.ShardedSampler(len(dataset), shuffle=False, pad=False)
    loader = data.make_loader(dataset, sampler, batch_size, workers, pin_memory=False)
    probabilities, labels, indices, bad = [], [], [], []
    for images, batch_labels, batch_indices, batch_bad in tqdm(loader, desc="evaluate", unit="batch", leave=False,
                                                               disable=not progress):
        bad += batch_bad.tolist()
        if images is not None:
            probabilities.append(infer(images))
            labels.append(batch_labels.numpy())
            indices.append(batch_indices.numpy())
    if not probabilities:
        raise ValueError(f"no readable images among {len(dataset)}")
    return np.concatenate(probabilities), np.concatenate(labels), np.concatenate(indices), bad


def _labels_from_paths(files: list[str], classes: list[str]) -> list[int]:
    """Checkpoints without val_labels: the class is the nearest enclosing folder named like a class."""
    index, labels = {name: i for i, name in enumerate(classes)}, []
    for f in files:
        label = next((index[p.name] for p in Path(f).parents if p.name in index), None)
        if label is None:
            raise ValueError(f"cannot tell the class of validation file {f}: pass --data-dir")
        labels.append(label)
    return labels


def scan_for_classes(root: str | Path, classes: list[str]) -> data.Split:
    """An ImageFolder whose class folders are `classes` in any order, labelled by their index in `classes`
    (an imported model's labels.txt is in the model's order, not alphabetical)."""
    twice = sorted(name for name, count in Counter(classes).items() if count > 1)
    if twice:
        raise ValueError(f"the model's labels name {twice[:10]} more than once: a class folder cannot tell which")
    found = data.scan_image_folder(root)
    if set(found.classes) != set(classes):
        missing, extra = sorted(set(classes) - set(found.classes)), sorted(set(found.classes) - set(classes))
        raise ValueError(f"{root} has class folders {found.classes[:10]}, the model's classes are {classes[:10]} "
                         f"(missing folders {missing[:10]}, folders not in the model {extra[:10]})")
    index = {name: i for i, name in enumerate(classes)}
    return data.Split(list(classes), [(path, index[found.classes[label]]) for path, label in found.samples])


def write_confusion_csv(confusion: np.ndarray, classes: list[str], path: Path) -> None:
    """Rows: true class, columns: predicted class; the first row and column name them (quoted where a name
    holds a comma), so any CSV reader gets a square table with its labels."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *classes])
        writer.writerows([name, *map(int, row)] for name, row in zip(classes, confusion))


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="training.train checkpoint or run directory (its best.pt)")
    source.add_argument("--artifacts", help="exported artifact directory (model.onnx, labels.txt, preprocess.json)")
    p.add_argument("--data-dir", default=None, help="ImageFolder to evaluate (default: the run's validation images)")
    p.add_argument("--weights", default=None, choices=["model", "model_ema"], help="checkpoint weights (default: the deployed ones)")
    p.add_argument("--output-dir", default=None, help="(default: <run or artifacts>/eval)")
    p.add_argument("--batch-size", type=number(int, 1), default=64, help="(default: %(default)s)")
    p.add_argument("--workers", type=number(int, 0), default=1, help="DataLoader workers (default: %(default)s)")
    p.add_argument("--top-misclassified", type=number(int, 0), default=50,
                   help="rows in misclassified.csv, 0 = none (default: %(default)s)")
    p.add_argument("--threads", type=number(int, 0), default=0,
                   help="torch threads, 0 = torch's choice (default: %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")
    return p


def main(args: argparse.Namespace) -> dict:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        checkpoint = load_checkpoint(args.checkpoint)
        classes, preprocess = checkpoint["classes"], preprocess_from_checkpoint(checkpoint)
        infer, source, home = _torch_runner(checkpoint, args.weights), checkpoint["path"], Path(checkpoint["path"]).parent
        val_files = (checkpoint.get("data") or {}).get("val_files")
        val_labels = (checkpoint.get("data") or {}).get("val_labels")
    else:
        home = Path(args.artifacts)
        classes, preprocess = read_labels(home / "labels.txt"), PreprocessConfig.load(home / "preprocess.json")
        infer, source, val_files, val_labels = _onnx_runner(home / "model.onnx"), str(home / "model.onnx"), None, None
    if args.data_dir:
        split = scan_for_classes(args.data_dir, classes)
    elif val_files:
        split = data.Split(classes, list(zip(val_files, val_labels or _labels_from_paths(val_files, classes))))
    else:
        raise ValueError("--artifacts needs --data-dir (an ImageFolder with the model's classes)")
    out = Path(args.output_dir) if args.output_dir else home / "eval"
    out.mkdir(parents=True, exist_ok=True)

    probabilities, labels, indices, bad = run_model(infer, split, preprocess, args.batch_size, args.workers,
                                                   args.progress)
    paths = [split.samples[i][0] for i in indices]
    summary = metrics_from_summary(summarize(probabilities, labels, len(classes)), len(classes), prefix="eval")
    confusion = np.array(summary.pop("confusion"))
    summary.pop("eval_per_class_recall")
    report = {"source": source, "data": args.data_dir or "validation images of the run", **summary,
              "per_class": per_class_report(confusion, classes), "unreadable": [split.samples[i][0] for i in bad]}
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    write_confusion_csv(confusion, classes, out / "confusion_matrix.csv")
    pairs = confused_pairs(confusion, classes)
    rows = misclassified(probabilities, labels, paths, classes, args.top_misclassified)
    for name, fields, table in (("confused_pairs.csv", ["label", "predicted", "count", "share"], pairs),
                                ("misclassified.csv", ["path", "label", "predicted", "confidence", "p_label"], rows)):
        with open(out / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(table)
    print(f"{'class':20s} precision recall     f1 support")
    for row in report["per_class"]:
        print(f"{row['class'][:20]:20s} {row['precision']:9.2%} {row['recall']:6.2%} {row['f1']:6.2%} {row['support']:7d}")
    print(f"top-1 {summary['eval_top1']:.2%}  top-5 {summary['eval_top5']:.2%}  macro-F1 {summary['eval_macro_f1']:.2%}"
          f"  on {summary['eval_images']} images ({len(bad)} unreadable, {len(rows)} listed in misclassified.csv)")
    plot_confusion(confusion, classes, out / "confusion_matrix.png", f"{Path(source).parent.name}: top-1 "
                   f"{summary['eval_top1']:.2%} on {summary['eval_images']} images", pairs)
    print(f"wrote {out}/: metrics.json, confusion_matrix.csv, confused_pairs.csv, misclassified.csv, "
          "confusion_matrix.png")
    return report


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
