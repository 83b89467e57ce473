"""training.recipe, training.networks and the distillation loss (fast, real modules)."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training import distill, networks, recipe, train

ROOT = Path(__file__).resolve().parents[2]


def test_schedule_warmup_cosine_and_restarts():
    s = recipe.Schedule("cosine", total_steps=110, warmup_steps=10, warmup_start=0.1)
    assert s(0) == pytest.approx(0.1) and s(5) == pytest.approx(0.55) and s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.5) and s(110) == pytest.approx(0.0)
    assert all(s(i) >= s(i + 1) for i in range(10, 110))
    r = recipe.Schedule("cosine-restarts", total_steps=100, warmup_steps=0, restart_steps=10, restart_mult=2)
    assert r(0) == 1.0 and r(9) < 0.05 and r(10) == 1.0 and r(30) == 1.0 and r(20) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="cosine-restarts"):
        recipe.Schedule("cosine-restarts", total_steps=10, warmup_steps=0)
    with pytest.raises(ValueError, match="'linear' is not one of"):
        recipe.Schedule("linear", total_steps=10, warmup_steps=0)
    with pytest.raises(ValueError, match=r"cycle growth must be at least 1 \(--restart-mult\), got 0"):
        recipe.Schedule("cosine-restarts", total_steps=100, warmup_steps=0, restart_steps=10, restart_mult=0)  # looped forever


@pytest.mark.parametrize("argv, message", [
    (["--restart-mult", "0"], "argument --restart-mult: must be at least 1, got 0"),  # looped forever
    (["--label-smoothing", "1.5"], r"argument --label-smoothing: must be in \[0, 1\), got 1.5"),  # a traceback at step 1
    (["--steps-per-epoch", "-1"], "argument --steps-per-epoch: must be at least 0, got -1"),  # __len__() should return >= 0
    (["--lr", "nan"], "argument --lr: must be at least 0, got nan"),
    (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
])
def test_recipe_options_are_range_checked_at_parsing(argv, message, parse_error):
    assert re.search(message, parse_error(train.get_args_parser(), ["--data-dir", "d", *argv]))


@pytest.mark.parametrize("argv, message", [
    (["--distill-alpha", "1.5"], r"argument --distill-alpha: must be in \[0, 1\], got 1.5"),  # a negative CE weight
    (["--distill-alpha", "-0.1"], r"argument --distill-alpha: must be in \[0, 1\], got -0.1"),
    (["--distill-temperature", "0"], "argument --distill-temperature: must be above 0, got 0"),  # division by zero
    (["--distill-temperature", "-2"], "argument --distill-temperature: must be above 0, got -2"),
    (["--std", "0.2", "0", "0.2"], "argument --std: must be above 0, got 0"),
    (["--mean", "0.5", "nan", "0.5"], r"argument --mean: must be in \[0, 1\], got nan"),
    (["--val-fraction", "1"], r"argument --val-fraction: must be in \(0, 1\), got 1"),
    (["--split-seed", "-1"], "argument --split-seed: must be at least 0, got -1"),  # numpy: 'expected non-negative'
    (["--model-ema-decay", "1.5"], r"argument --model-ema-decay: must be in \(0, 1\), got 1.5"),
    (["--lr", "inf"], "argument --lr: must be a finite number, got inf"),
    (["--early-stop-min-delta", "inf"], "argument --early-stop-min-delta: must be a finite number, got inf"),
])
def test_distillation_data_and_other_options_are_range_checked_at_parsing(argv, message, parse_error):
    """Before, --distill-alpha 1.5 trained with a negative label term and --distill-temperature 0 divided by
    zero, each found only once data and teacher were loaded (or never, without --teacher)."""
    assert re.search(message, parse_error(train.get_args_parser(), ["--data-dir", "d", *argv]))


def test_a_bad_distill_alpha_ends_the_command_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "training.train", "--data-dir", "d", "--distill-alpha", "1.5"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == "train.py: error: argument --distill-alpha: must be in [0, 1], got 1.5"
    assert not list(tmp_path.iterdir())  # no runs/train/ begun


def test_loss_soft_targets_weights_and_smoothing():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    one_hot = torch.nn.functional.one_hot(labels, 4).float()
    weights = torch.tensor([1.0, 2.0, 0.5, 1.0])
    for smoothing in (0.0, 0.1):
        loss = recipe.ClassificationLoss(smoothing)
        assert loss(logits, one_hot) == pytest.approx(loss(logits, labels).item(), rel=1e-6)
    weighted = recipe.ClassificationLoss(0.0, weights)
    assert weighted(logits, one_hot) == pytest.approx(weighted(logits, labels).item(), rel=1e-6)
    assert weighted(logits, labels) != pytest.approx(recipe.ClassificationLoss(0.0)(logits, labels).item())


def test_early_stopping():
    stop = recipe.EarlyStopping("val_loss", patience=2)
    assert stop.update({"val_loss": 1.0}) and stop.update({"val_loss": 0.9})
    assert not stop.update({"val_loss": 0.95}) and not stop.should_stop
    assert not stop.update({"val_loss": 0.91}) and stop.should_stop and stop.best == 0.9
    with pytest.raises(ValueError, match="val_top1"):
        recipe.EarlyStopping("accuracy", 1)


def test_networks_by_name_heads_and_freezing(tmp_path):
    resnet = networks.build_network("torchvision/resnet18", 3)
    assert networks.head_name(resnet) == "fc" and resnet.fc.out_features == 3
    timm_net = networks.build_network("timm/mobilenetv3_small_050", 5)
    assert networks.head_name(timm_net) == "classifier"
    with pytest.raises(ValueError, match="timm/resnet18"):
        networks.build_network("timm/resnet_18", 3)
    with pytest.raises(ValueError, match="bundled-efficientnet-lite0, timm/<name> or torchvision/<name>"):
        networks.build_network("resnet18", 3)

    torch.save(resnet.state_dict(), tmp_path / "r18.pt")
    same = networks.create_model("torchvision/resnet18", 3, weights=tmp_path / "r18.pt")
    assert torch.equal(same.fc.weight, resnet.fc.weight) and torch.equal(same.conv1.weight, resnet.conv1.weight)
    other = networks.create_model("torchvision/resnet18", 7, weights=tmp_path / "r18.pt")  # new head, same body
    assert other.fc.out_features == 7 and torch.equal(other.layer4[1].conv2.weight, resnet.layer4[1].conv2.weight)

    assert [networks.trainable_stages(e, 2, 3) for e in range(6)] == [0, 0, 1, 2, -1, -1]
    assert networks.trainable_stages(2, 2, 0) == -1
    head = sum(1 for _ in resnet.fc.parameters())
    counts = [networks.apply_freezing(resnet, n, 3) for n in (0, 1, 2, -1)]
    assert counts[0] == head and counts[0] < counts[1] < counts[2] < counts[3]
    assert counts[3] == len(list(resnet.parameters()))
    assert resnet.fc.weight.requires_grad and resnet.layer4[1].conv2.weight.requires_grad
    networks.apply_freezing(resnet, 1, 3)
    assert not resnet.conv1.weight.requires_grad and resnet.layer4[1].conv2.weight.requires_grad


def test_optimizer_groups_have_separate_learning_rates():
    net = networks.build_network("torchvision/resnet18", 3)
    opt = recipe.make_optimizer(net, "sgd", lr=0.1, backbone_lr=0.01, weight_decay=1e-4, momentum=0.9)
    lrs = {(g["role"], g["weight_decay"]): g["lr"] for g in opt.param_groups}
    assert lrs == {("backbone", 1e-4): 0.01, ("backbone", 0.0): 0.01, ("head", 1e-4): 0.1, ("head", 0.0): 0.1}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))


def test_distillation_loss_and_imagenet_teacher_classes():
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    ce = recipe.ClassificationLoss(0.0)
    assert distill.distillation_loss(student, teacher, labels, ce, 0.0, 4.0) == pytest.approx(ce(student, labels).item())
    assert distill.distillation_loss(student, student, labels, ce, 1.0, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    kl = distill.distillation_loss(student, teacher, labels, ce, 1.0, 2.0)
    p_t = torch.softmax(teacher / 2, 1)
    expected = (p_t * (torch.log(p_t) - torch.log_softmax(student / 2, 1))).sum(1).mean() * 4
    assert kl.item() == pytest.approx(expected.item(), rel=1e-5) and not math.isclose(kl.item(), 0.0)
    assert distill.imagenet_columns(["tabby", "espresso", "Egyptian_cat"]) == [281, 967, 285]
    with pytest.raises(ValueError, match=r"\['3'\]"):
        distill.imagenet_columns(["tabby", "3"])


def test_best_is_the_best_even_within_min_delta():
    # best.pt follows every new best; min_delta only decides what counts for patience
    stop = recipe.EarlyStopping("val_top1", patience=2, min_delta=0.05)
    assert stop.update({"val_top1": 0.80})
    assert stop.update({"val_top1": 0.82})  # the best so far, though not by min_delta
    assert stop.bad_epochs == 1 and stop.best == 0.80 and stop.best_seen == 0.82
    assert not stop.update({"val_top1": 0.81}) and stop.should_stop
    restored = recipe.EarlyStopping("val_top1", 2, 0.05, **stop.state_dict())  # --resume
    assert not restored.update({"val_top1": 0.815}) and restored.update({"val_top1": 0.9})
    assert restored.bad_epochs == 0 and restored.best == restored.best_seen == 0.9
    older = recipe.EarlyStopping("val_loss", 2, 0.0, best=0.5, bad_epochs=1)  # a checkpoint without best_seen
    assert older.best_seen == 0.5 and not older.update({"val_loss": 0.6}) and older.update({"val_loss": 0.4})
    first_nan = recipe.EarlyStopping("val_loss", 0)
    assert not first_nan.update({"val_loss": float("nan")}) and first_nan.update({"val_loss": 3.0})


def test_create_model_keeps_the_callers_rng_and_names_foreign_weights(tmp_path):
    from training.checkpoint import load_checkpoint

    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = networks.create_model("timm/mobilenetv3_small_050", 3, seed=7)
    assert torch.equal(torch.get_rng_state(), before)  # the per-rank RNG (MixUp, dropout) survives (torchrun)
    torch.manual_seed(999)
    b = networks.create_model("timm/mobilenetv3_small_050", 3, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    torch.save(networks.build_network("torchvision/resnet18", 3).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(ValueError, match=r"r18.pt does not fit this architecture: .*layer1.0.conv1.weight"):
        networks.create_model("torchvision/resnet50", 3, weights=tmp_path / "r18.pt")  # was a RuntimeError
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt is not a readable PyTorch file"):
        networks.create_model("torchvision/resnet18", 3, weights=tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="junk.pt is not a readable training.train checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="holds a Tensor"):
        networks.create_model("torchvision/resnet18", 3, weights=tmp_path / "tensor.pt")
