"""Per-epoch records of a run: metrics.csv, metrics.jsonl, TensorBoard events, one summary line.

Only rank 0 writes. TensorBoard event files go to `<run>/tensorboard/` (`tensorboard --logdir runs`).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

SCALARS = ("train_loss", "train_acc", "train_images_per_s", "val_top1", "val_top5", "val_loss", "val_macro_f1",
           "ema_val_top1", "model_val_top1", "lr_head", "lr_backbone", "trainable_tensors", "epoch_seconds")


class RunLog:
    """`resume`: keep the records of the epochs before `first_epoch` (a resumed run repeats none; rows of
    later epochs, e.g. after --resume best.pt or a crash between log and checkpoint, are dropped)."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, resume: bool = False, first_epoch: int = 0):
        self.out_dir, self.enabled = out_dir, enabled
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

            self.writer = SummaryWriter(str(out_dir / "tensorboard"))
        if enabled and not resume:
            for name in ("metrics.csv", "metrics.jsonl"):
                (out_dir / name).unlink(missing_ok=True)
        elif enabled:
            self._keep_before(first_epoch)

    def _keep_before(self, first_epoch: int) -> None:
        csv_path, jsonl_path = self.out_dir / "metrics.csv", self.out_dir / "metrics.jsonl"
        if csv_path.exists():
            with open(csv_path, newline="") as f:
                reader = csv.DictReader(f)
                fields = reader.fieldnames or []
                rows = [r for r in reader if int(r["epoch"]) < first_epoch] if "epoch" in fields else []
            if not fields:
                csv_path.unlink()
            else:
                with open(csv_path, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=fields)
                    writer.writeheader()
                    writer.writerows(rows)
        if jsonl_path.exists():
            lines = [line for line in jsonl_path.read_text().splitlines()
                     if line.strip() and json.loads(line)["epoch"] < first_epoch]
            jsonl_path.write_text("".join(f"{line}\n" for line in lines))

    def epoch(self, epoch: int, metrics: dict) -> str:
        """Record one epoch; returns its summary line."""
        line = summary_line(epoch, metrics)
        if not self.enabled:
            return line
        row = {"epoch": epoch, **{k: metrics[k] for k in SCALARS if k in metrics}}
        csv_path = self.out_dir / "metrics.csv"
        new = not csv_path.exists()
        fields = ["epoch", *SCALARS]
        if not new:  # appending (a resumed run): keep the file's own columns
            with open(csv_path, newline="") as f:
                fields = next(csv.reader(f), None) or fields
        with open(csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"epoch": epoch, **metrics}) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key.replace("_", "/", 1), value, epoch)
            self.writer.flush()
        return line

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def summary_line(epoch: int, m: dict) -> str:
    # with --model-ema the val numbers are the EMA's (the deployed weights); the raw weights' top-1 follows
    ema = f" | without EMA top1 {m['model_val_top1']:.2%}" if "model_val_top1" in m else ""
    return (f"epoch {epoch:3d} | train loss {m['train_loss']:.4f} acc {m['train_acc']:.2%} "
            f"{m['train_images_per_s']:.0f} img/s | val loss {m['val_loss']:.4f} top1 {m['val_top1']:.2%} "
            f"top5 {m['val_top5']:.2%}{ema} | lr {m['lr_head']:.2e} | {m['epoch_seconds']:.0f} s")


def class_table(classes: list[str], train_counts, val_counts, weights=None, recall=None) -> str:
    """Per-class report: train/val images, loss or sampling weight, validation recall."""
    header = f"{'class':20s} {'train':>6s} {'val':>5s}" + (" weight" if weights is not None else "") + (
        "  recall" if recall is not None else "")
    lines = [header]
    for i, name in enumerate(classes):
        line = f"{name[:20]:20s} {int(train_counts[i]):6d} {int(val_counts[i]):5d}"
        if weights is not None:
            line += f" {weights[i]:6.3f}"
        if recall is not None:
            line += f"  {recall[i]:6.2%}"
        lines.append(line)
    return "\n".join(lines)
