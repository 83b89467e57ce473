"""Knowledge distillation as a loss: a student learns from a frozen teacher's softened outputs plus labels.

Loss (Hinton et al.): alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE.
The teacher is a checkpoint with the same classes, or the bundled ImageNet Lite0 when every class
name is an ImageNet class (its description, or the part before the first comma): its logits are
restricted to those classes. It sees the student's batches, so it must normalise images as the student
does (mean, std, layout: `load_teacher` given the student's preprocessing and `training.distill` refuse
another); a batch of another crop size is resized to the teacher's own.

`training.train --teacher` trains with it; `python -m training.distill` compares a student trained
with and without it.
"""
from __future__ import annotations

import torch

from common.preprocessing import PreprocessConfig
from training import models
from training.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_from_checkpoint


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


def teacher_preprocess(source: str, checkpoint: dict | None = None) -> PreprocessConfig:
    """The preprocessing the teacher was trained with (`checkpoint`: `source`, already loaded)."""
    if source == models.BUNDLED_EFFICIENTNET_LITE0:
        return models.EFFICIENTNET_LITE0_PREPROCESS
    return preprocess_from_checkpoint(checkpoint or load_checkpoint(source))


def check_preprocess(source: str, teacher: PreprocessConfig, student: PreprocessConfig) -> None:
    """ValueError unless the student's images are normalised as the teacher's were (sizes may differ)."""
    fields = ("mean", "std", "layout")
    if any(getattr(teacher, f) != getattr(student, f) for f in fields):
        raise ValueError(f"teacher {source} expects {', '.join(f'{f} {getattr(teacher, f)}' for f in fields)}; the "
                         f"student's images have {', '.join(f'{f} {getattr(student, f)}' for f in fields)}: train "
                         "the student with the teacher's --mean and --std")


def load_teacher(source: str, classes: list[str], preprocess: PreprocessConfig | None = None
                 ) -> tuple[torch.nn.Module, list[int] | None]:
    """(teacher in eval mode, ImageNet columns or None). `source`: a checkpoint path or the bundled name;
    `preprocess`: the student's, checked against the teacher's. The teacher resizes batches to its crop size."""
    checkpoint = None if source == models.BUNDLED_EFFICIENTNET_LITE0 else load_checkpoint(source)
    if checkpoint is not None and checkpoint["classes"] != list(classes):
        raise ValueError(f"teacher {source} was trained on classes {checkpoint['classes'][:10]}, "
                         f"the data has {list(classes)[:10]}")
    own = teacher_preprocess(source, checkpoint)
    if preprocess is not None:
        check_preprocess(source, own, preprocess)
    if checkpoint is None:
        columns = imagenet_columns(classes)
        return _AtCropSize(models.load_bundled_efficientnet_lite0(), own.crop), columns
    return _AtCropSize(model_from_checkpoint(checkpoint), own.crop), None


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

    def teacher_on_classes(self) -> torch.nn.Module:
        """The teacher as a classifier of the dataset's classes (to measure its accuracy)."""
        return self.teacher if self.columns is None else _Columns(self.teacher, self.columns)


class _AtCropSize(torch.nn.Module):
    """A model fed at the crop size it was trained on: a batch of another size is resized (bilinear,
    antialiased; the same as resizing before normalising, which is linear)."""

    def __init__(self, model, size: int):
        super().__init__()
        self.model, self.size = model, size

    def forward(self, x):
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        return self.model(x)


class _Columns(torch.nn.Module):
    """A 1000-class ImageNet model seen through the dataset's classes."""

    def __init__(self, model, columns):
        super().__init__()
        self.model, self.columns = model, columns

    def forward(self, x):
        return self.model(x)[:, self.columns]


def distillation_loss(student_logits, teacher_logits, targets, criterion, alpha: float, temperature: float):
    t = temperature
    soft = torch.nn.functional.kl_div(
        torch.log_softmax(student_logits.float() / t, 1), torch.log_softmax(teacher_logits.float() / t, 1),
        reduction="batchmean", log_target=True) * (t * t)
    return alpha * soft + (1.0 - alpha) * criterion(student_logits, targets)
