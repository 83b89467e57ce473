"""Transform presets: what a training image and an evaluation image go through.

Both start from `common.preprocessing.decode_image` (EXIF, colour modes, alpha: as served).
The eval preset IS the serving path: `resize_and_crop` + `normalize` from `common.preprocessing`
with the model's PreprocessConfig, so validation accuracy is what the Triton ensemble will give.
The train preset (torchvision's classification reference) works on the same RGB PIL image:
RandomResizedCrop -> flip -> auto-augment -> ColorJitter -> tensor -> normalise -> RandomErasing.
MixUp / CutMix act on whole batches (`batch_mixer`), after collation.
"""
from __future__ import annotations

import dataclasses

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from common.preprocessing import PreprocessConfig, normalize, resize_and_crop

AUTO_AUGMENTS = ("none", "trivialaugment", "randaugment")
_INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


@dataclasses.dataclass(frozen=True)
class TrainAugment:
    """The training augmentation recipe (all probabilities/strengths; 0 switches a step off)."""

    scale_min: float = 0.35  # RandomResizedCrop area range (scale_min, 1)
    hflip_prob: float = 0.5
    auto_augment: str = "trivialaugment"
    randaugment_magnitude: int = 9
    color_jitter: float = 0.2  # brightness = contrast = saturation
    random_erase: float = 0.1
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0

    def __post_init__(self):
        if self.auto_augment not in AUTO_AUGMENTS:
            raise ValueError(f"auto_augment {self.auto_augment!r} is not one of {AUTO_AUGMENTS}")
        if not 0.0 < self.scale_min <= 1.0:
            raise ValueError(f"scale_min must be in (0, 1], got {self.scale_min}")
        for name in ("hflip_prob", "random_erase"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


class EvalPreset:
    """RGB PIL image -> float32 tensor (3, crop, crop): exactly the serving preprocess."""

    def __init__(self, config: PreprocessConfig):
        if config.layout != "NCHW":
            raise ValueError(f"training uses NCHW tensors; preprocess layout is {config.layout!r}")
        self.config = config

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = resize_and_crop(image, self.config)
        return torch.from_numpy(normalize(pixels[None], self.config)[0])


class TrainPreset:
    """RGB PIL image -> augmented float32 tensor (3, crop, crop), normalised like EvalPreset."""

    def __init__(self, config: PreprocessConfig, augment: TrainAugment):
        interpolation = _INTERPOLATION[config.interpolation]
        steps: list = [T.RandomResizedCrop(config.crop, scale=(augment.scale_min, 1.0),
                                           interpolation=interpolation, antialias=True)]
        if augment.hflip_prob > 0:
            steps.append(T.RandomHorizontalFlip(augment.hflip_prob))
        if augment.auto_augment == "trivialaugment":
            steps.append(T.TrivialAugmentWide(interpolation=interpolation))
        elif augment.auto_augment == "randaugment":
            steps.append(T.RandAugment(magnitude=augment.randaugment_magnitude, interpolation=interpolation))
        if augment.color_jitter > 0:
            j = augment.color_jitter
            steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j))
        steps += [T.PILToTensor(), T.ToDtype(torch.float32, scale=True), T.Normalize(config.mean, config.std)]
        if augment.random_erase > 0:
            steps.append(T.RandomErasing(p=augment.random_erase, value=0))
        self.transform = T.Compose(steps)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)


class BatchMixer:
    """MixUp and/or CutMix on a collated batch: (images, int labels) -> (images, soft labels (N, C))."""

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float):
        choices = []
        if mixup_alpha > 0:
            choices.append(T.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            choices.append(T.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        if not choices:
            raise ValueError("BatchMixer needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.transform = choices[0] if len(choices) == 1 else T.RandomChoice(choices)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(images, labels)


def batch_mixer(num_classes: int, augment: TrainAugment) -> BatchMixer | None:
    if augment.mixup_alpha <= 0 and augment.cutmix_alpha <= 0:
        return None
    return BatchMixer(num_classes, augment.mixup_alpha, augment.cutmix_alpha)
