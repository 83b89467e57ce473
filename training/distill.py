"""Knowledge distillation: a (smaller) student learns from a teacher's softened outputs plus labels.

    python -m training.distill --teacher runs/lite0/best.pt --model timm/mobilenetv3_small_050 \\
        --data-dir data/digits/train --val-dir data/digits/val --output-dir runs/distill

trains the student twice with identical settings and seeds, without and with the teacher, and
writes `distill_report.json` with teacher, student-alone and distilled-student accuracy.
`--teacher` in `training.train` does the distilled run only. `--resume runs/distill` continues each
student from its own checkpoint (`--session-epochs` stops at the first student that has epochs left).
The loss and the teachers it accepts: training.distillation.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from training import train
from training.checkpoint import LAST
from training.loop import RUN_RECORDS
# the library's names stay importable as `training.distill.<name>`
from training.distillation import Distiller, distillation_loss, imagenet_columns, load_teacher  # noqa: F401
from training.distillation import check_preprocess, teacher_preprocess
from training.state import preprocess_from_args

RUNS = ("student_alone", "student_distilled")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = train.get_args_parser(add_help=add_help)
    parser.description = "Train a student with and without a teacher and compare (" + __doc__.split("\n")[0] + ")"
    return parser


def resume_points(resume: str | None) -> dict[str, str | None]:
    """Each student's own run directory under a distill output directory, or None where that student
    has no checkpoint yet (the session stopped before it started)."""
    if resume is None:
        return dict.fromkeys(RUNS)
    root = Path(resume)
    if not any((root / name).is_dir() for name in RUNS):
        raise ValueError(f"training.distill --resume takes the --output-dir of an earlier training.distill run "
                         f"(holding {RUNS[0]}/ and {RUNS[1]}/); {resume} is not one")
    return {name: str(root / name) if (root / name / LAST).is_file() else None for name in RUNS}


def main(args: argparse.Namespace) -> dict:
    if args.teacher is None:
        raise ValueError("training.distill needs --teacher (a checkpoint or bundled-efficientnet-lite0)")
    # before the student that trains alone, which would otherwise train in vain
    check_preprocess(args.teacher, teacher_preprocess(args.teacher), preprocess_from_args(args))
    out = Path(args.output_dir)
    if args.resume is None and any((out / name / record).exists() for name in RUNS for record in RUN_RECORDS):
        raise ValueError(f"{out} holds an earlier training.distill run: --resume {out} to continue it, or choose "
                         f"another --output-dir")
    resume = resume_points(args.resume)
    runs = {}
    for name, teacher in zip(RUNS, (None, args.teacher)):
        run_args = copy.deepcopy(args)
        run_args.teacher, run_args.output_dir, run_args.resume = teacher, str(out / name), resume[name]
        runs[name] = train.main(run_args)
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
