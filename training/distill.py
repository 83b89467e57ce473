"""Knowledge distillation: a (smaller) student learns from a teacher's softened outputs plus labels.

    python -m training.distill --teacher runs/lite0/best.pt --model timm/mobilenetv3_small_050 \\
        --data-dir data/digits/train --val-dir data/digits/val --output-dir runs/distill

trains the student twice with identical settings and seeds, without and with the teacher, and
writes `distill_report.json` with teacher, student-alone and distilled-student accuracy.
`--teacher` in `training.train` does the distilled run only. `--resume runs/distill` continues each
student from its own checkpoint (`--session-epochs` stops at the first student that has epochs left).

Loss (Hinton et al.): alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE.
The teacher is a checkpoint with the same classes, or the bundled ImageNet Lite0 when every class
name is an ImageNet class (its description, or the part before the first comma): its logits are
restricted to those classes.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from training import models


def imagenet_columns(classes: list[str]) -> list[int]:
    """Index in ImageNet-1k of each class name; ValueError naming the names that are not ImageNet classes."""
    labels = models.imagenet_labels()
    lookup = {}
    for index, label in enumerate(labels):
        lookup.setdefault(label.lower(), index)
        lookup.setdefault(label.split(",")[0].strip().lower(), index)
    missing = [c for c in classes if c.lower().replace("_", " ") not in lookup]
    if missing:
        raise ValueError(f"the bundled ImageNet teacher does not know classes {missing[:10]}: use a teacher "
                         "checkpoint trained on these classes")
    return [lookup[c.lower().replace("_", " ")] for c in classes]


def load_teacher(source: str, classes: list[str]) -> tuple[torch.nn.Module, list[int] | None]:
    """(teacher in eval mode, ImageNet columns or None). `source`: a checkpoint path or the bundled name."""
    if source == models.BUNDLED_EFFICIENTNET_LITE0:
        return models.load_bundled_efficientnet_lite0(), imagenet_columns(classes)
    from training.checkpoint import load_checkpoint, model_from_checkpoint

    checkpoint = load_checkpoint(source)
    if checkpoint["classes"] != list(classes):
        raise ValueError(f"teacher {source} was trained on classes {checkpoint['classes'][:10]}, "
                         f"the data has {list(classes)[:10]}")
    return model_from_checkpoint(checkpoint).eval(), None


class Distiller:
    """Holds the frozen teacher; `loss(student_logits, targets, images)` is the combined loss."""

    def __init__(self, teacher: torch.nn.Module, criterion: torch.nn.Module, alpha: float, temperature: float,
                 columns: list[int] | None = None):
        if not 0.0 <= alpha <= 1.0 or temperature <= 0:
            raise ValueError(f"need 0 <= alpha <= 1 and temperature > 0, got {alpha}, {temperature}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.criterion, self.alpha, self.temperature = criterion, alpha, temperature
        self.columns = None if columns is None else torch.tensor(columns)

    def to(self, device: torch.device) -> "Distiller":
        self.teacher.to(device)
        self.columns = None if self.columns is None else self.columns.to(device)
        return self

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.teacher(images).float()
        return logits if self.columns is None else logits[:, self.columns]

    def loss(self, student_logits: torch.Tensor, targets: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return distillation_loss(student_logits, self.teacher_logits(images), targets, self.criterion,
                                 self.alpha, self.temperature)


def distillation_loss(student_logits, teacher_logits, targets, criterion, alpha: float, temperature: float):
    t = temperature
    soft = torch.nn.functional.kl_div(
        torch.log_softmax(student_logits.float() / t, 1), torch.log_softmax(teacher_logits.float() / t, 1),
        reduction="batchmean", log_target=True) * (t * t)
    return alpha * soft + (1.0 - alpha) * criterion(student_logits, targets)


# --- the comparison stage ------------------------------------------------------------------------


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    from training.train import get_args_parser as train_parser

    parser = train_parser(add_help=add_help)
    parser.description = "Train a student with and without a teacher and compare (" + __doc__.split("\n")[0] + ")"
    return parser


RUNS = ("student_alone", "student_distilled")


def resume_points(resume: str | None) -> dict[str, str | None]:
    """Each student's own run directory under a distill output directory, or None where that student
    has no checkpoint yet (the session stopped before it started)."""
    from training.checkpoint import LAST

    if resume is None:
        return dict.fromkeys(RUNS)
    root = Path(resume)
    if not any((root / name).is_dir() for name in RUNS):
        raise ValueError(f"training.distill --resume takes the --output-dir of an earlier training.distill run "
                         f"(holding {RUNS[0]}/ and {RUNS[1]}/); {resume} is not one")
    return {name: str(root / name) if (root / name / LAST).is_file() else None for name in RUNS}


def main(args: argparse.Namespace) -> dict:
    from training.train import main as train_main

    if args.teacher is None:
        raise ValueError("training.distill needs --teacher (a checkpoint or bundled-efficientnet-lite0)")
    out = Path(args.output_dir)
    resume = resume_points(args.resume)
    runs = {}
    for name, teacher in zip(RUNS, (None, args.teacher)):
        run_args = copy.deepcopy(args)
        run_args.teacher, run_args.output_dir, run_args.resume = teacher, str(out / name), resume[name]
        runs[name] = train_main(run_args)
        if not runs[name]["finished"]:
            if runs[name]["rank"] == 0:
                print(f"{name} has epochs left: --resume {out} to continue (no report until both are done)")
            return {"finished": False, "runs": {n: str(out / n) for n in runs}}
    report = {
        "finished": True,
        "teacher": args.teacher,
        "teacher_val_top1": runs["student_distilled"].get("teacher_val_top1"),
        "student": args.model,
        **{f"{name}_val_top1": result["best"]["val_top1"] for name, result in runs.items()},
        "runs": {name: str(out / name) for name in runs},
    }
    if runs["student_distilled"]["rank"] == 0:
        (out / "distill_report.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"teacher {report['teacher_val_top1']:.2%} | student alone {report['student_alone_val_top1']:.2%} | "
              f"student + teacher {report['student_distilled_val_top1']:.2%}")
    return report


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}")
