"""A distillation teacher sees the student's batches: refused when it normalises images otherwise,
resized to its own crop size when the student's differs."""
from __future__ import annotations

import pytest
import torch

from common.preprocessing import PreprocessConfig
from training import distill, models, train
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.distillation import load_teacher

CLASSES = [str(i) for i in range(10)]


def _argv(small_digits, out, *extra: str) -> list[str]:
    return ["--data-dir", str(small_digits[0]), "--val-dir", str(small_digits[1]), "--output-dir", str(out),
            "--model", "timm/mobilenetv3_small_050", "--batch-size", "16", "--epochs", "1", "--steps-per-epoch", "1",
            "--workers", "0", "--threads", "2", "--no-progress", "--no-tensorboard", *extra]


@pytest.fixture(scope="module")
def teacher(small_digits, tmp_path_factory):
    """A run at 32 px with ImageNet mean and std."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    train.main(train.get_args_parser().parse_args(_argv(small_digits, out, "--crop-size", "32", "--resize-size", "32")))
    return out


def test_a_teacher_normalising_otherwise_is_refused(teacher):
    halves = PreprocessConfig(resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match=r"teacher .*run expects mean \(0.485, 0.456, 0.406\), std \(0.229, 0.224, "
                                         r"0.225\), layout NCHW; the student's images have mean \(0.5, 0.5, 0.5\)"):
        load_teacher(str(teacher), CLASSES, halves)
    with pytest.raises(ValueError, match="teacher bundled-efficientnet-lite0 expects mean"):
        load_teacher(models.BUNDLED_EFFICIENTNET_LITE0, ["tabby"], halves)
    load_teacher(str(teacher), CLASSES, PreprocessConfig(resize=64, crop=48))  # only the size differs


def test_the_teacher_sees_batches_at_its_own_crop_size(teacher):
    model, _ = load_teacher(str(teacher), CLASSES)
    plain = model_from_checkpoint(load_checkpoint(teacher))
    small, large = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(small), plain(small))
        resized = torch.nn.functional.interpolate(large, size=(32, 32), mode="bilinear", antialias=True)
        assert torch.allclose(model(large), plain(resized), atol=1e-6)  # was plain(large)


def test_distill_refuses_before_training_and_takes_another_crop_size(teacher, small_digits, tmp_path):
    refused = tmp_path / "refused"
    args = distill.get_args_parser().parse_args(_argv(small_digits, refused, "--teacher", str(teacher),
                                                      "--crop-size", "32", "--mean", "0.5", "0.5", "0.5"))
    with pytest.raises(ValueError, match="expects mean"):
        distill.main(args)
    assert not refused.exists()  # the student alone did not train first

    args = distill.get_args_parser().parse_args(_argv(small_digits, tmp_path / "larger", "--teacher", str(teacher),
                                                      "--crop-size", "48", "--resize-size", "48"))
    report = distill.main(args)
    assert report["finished"] and 0.0 <= report["teacher_val_top1"] <= 1.0


def test_train_with_a_teacher_normalising_otherwise_is_refused(teacher, small_digits, tmp_path):
    args = train.get_args_parser().parse_args(_argv(small_digits, tmp_path / "run", "--teacher", str(teacher),
                                                    "--crop-size", "32", "--std", "0.5", "0.5", "0.5"))
    with pytest.raises(ValueError, match="expects mean .*std \\(0.229, 0.224, 0.225\\).*the student's images"):
        train.main(args)
