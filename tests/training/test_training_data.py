"""common.digits, training.data and training.presets on real files (fast)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from common.digits import MANIFEST, write_digits_imagefolder
from common.preprocessing import PreprocessConfig, load_files
from training import data, presets


def test_digits_imagefolder_is_stratified_and_idempotent(digits):
    train_dir, val_dir = digits
    root = train_dir.parent
    train, val = data.scan_image_folder(train_dir), data.scan_image_folder(val_dir)
    assert train.classes == val.classes == [str(d) for d in range(10)]
    assert len(train.samples) + len(val.samples) == 1797
    fractions = val.class_counts() / (val.class_counts() + train.class_counts())
    assert np.all(np.abs(fractions - 0.2) < 0.01)  # every class split 80/20
    names = {p.rsplit("/", 1)[-1] for p, _ in train.samples} | {p.rsplit("/", 1)[-1] for p, _ in val.samples}
    assert len(names) == 1797  # each load_digits() index exactly once
    image = Image.open(val.samples[0][0])
    assert image.size == (32, 32) and image.mode == "RGB"

    stamp = (root / MANIFEST).stat().st_mtime_ns
    assert write_digits_imagefolder(root, size=32) == (train_dir, val_dir)
    assert (root / MANIFEST).stat().st_mtime_ns == stamp  # complete: nothing rewritten
    assert json.loads((root / MANIFEST).read_text())["counts"] == {"train": 1438, "val": 359}
    with pytest.raises(ValueError, match=">= 16"):
        write_digits_imagefolder(root, size=8)


def test_digits_rewrites_an_incomplete_folder(tmp_path):
    train_dir, _ = write_digits_imagefolder(tmp_path, size=16, val_fraction=0.5, seed=3)
    victim = next(train_dir.rglob("*.png"))
    victim.unlink()
    write_digits_imagefolder(tmp_path, size=16, val_fraction=0.5, seed=3)
    assert victim.is_file()


def test_split_and_class_checks(digits, tmp_path):
    train_dir, val_dir = digits
    full = data.scan_image_folder(train_dir)
    a_train, a_val = data.stratified_split(full, 0.25, seed=1)
    b_train, b_val = data.stratified_split(full, 0.25, seed=1)
    assert a_val.samples == b_val.samples  # seeded
    assert not {p for p, _ in a_train.samples} & {p for p, _ in a_val.samples}
    assert (a_val.class_counts() > 0).all() and len(a_train.samples) + len(a_val.samples) == len(full.samples)

    odd = tmp_path / "odd"
    shutil.copytree(val_dir, odd)
    shutil.rmtree(odd / "7")
    with pytest.raises(ValueError, match=r"missing \['7'\]"):
        data.load_splits(train_dir, odd, 0.2, 0)


def test_unreadable_images_are_skipped_not_fatal(digits, tmp_path):
    train_dir, _ = digits
    folder = tmp_path / "set"
    for label in ("0", "1"):
        (folder / label).mkdir(parents=True)
        for src in sorted((train_dir / label).glob("*.png"))[:3]:
            shutil.copy(src, folder / label / src.name)
    (folder / "1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "0" / "truncated.png").write_bytes((train_dir / "0").glob("*.png").__next__().read_bytes()[:60])
    split = data.scan_image_folder(folder)
    dataset = data.ImageFolderDataset(split, presets.EvalPreset(PreprocessConfig(resize=32, crop=32)))
    loader = data.make_loader(dataset, data.ShardedSampler(len(dataset), shuffle=False, pad=False), 4, 0, False)
    good, bad = 0, []
    for images, labels, indices, bad_indices in loader:
        good += 0 if images is None else len(images)
        bad += [split.samples[i][0] for i in bad_indices]
    assert good == 6 and sorted(p.rsplit("/", 1)[-1] for p in bad) == ["broken.png", "truncated.png"]


def test_eval_preset_is_the_serving_preprocess(digits):
    _, val_dir = digits
    files = sorted(val_dir.rglob("*.png"))[:4]
    config = PreprocessConfig(resize=40, crop=36)
    split = data.Split(["x"], [(str(f), 0) for f in files])
    dataset = data.ImageFolderDataset(split, presets.EvalPreset(config), draft_size=config.resize)
    ours = torch.stack([dataset[i][0] for i in range(len(files))]).numpy()
    np.testing.assert_array_equal(ours, load_files(files, config))  # bit-identical to serving


def test_train_preset_and_batch_mixing(digits):
    _, val_dir = digits
    image = Image.open(next(val_dir.rglob("*.png"))).convert("RGB")
    config = PreprocessConfig(resize=48, crop=48)
    for auto in presets.AUTO_AUGMENTS:
        out = presets.TrainPreset(config, presets.TrainAugment(auto_augment=auto, random_erase=1.0))(image)
        assert out.shape == (3, 48, 48) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="trivialaugment"):
        presets.TrainAugment(auto_augment="autoaugment")
    mixer = presets.batch_mixer(10, presets.TrainAugment(mixup_alpha=0.2, cutmix_alpha=1.0))
    images, soft = mixer(torch.randn(8, 3, 48, 48), torch.arange(8))
    assert soft.shape == (8, 10) and torch.allclose(soft.sum(1), torch.ones(8))
    assert presets.batch_mixer(10, presets.TrainAugment()) is None


def test_sharded_sampler_covers_the_data():
    a, b = (data.ShardedSampler(10, rank, 2, shuffle=True, seed=5) for rank in (0, 1))
    assert len(a) == len(b) == 5 and sorted(list(a) + list(b)) == list(range(10))
    a.set_epoch(1)
    assert list(a) != list(data.ShardedSampler(10, 0, 2, shuffle=True, seed=5))
    odd = [list(data.ShardedSampler(7, r, 2, shuffle=False, pad=False)) for r in (0, 1)]
    assert sorted(odd[0] + odd[1]) == list(range(7))  # eval: every sample exactly once
    weights = np.array([0.0] * 9 + [1.0])
    assert set(data.ShardedSampler(10, weights=weights)) == {9}
    assert np.allclose(data.class_weights(np.array([10, 30])), [2.0, 2 / 3])


def test_an_all_unreadable_batch_does_not_stop_the_epoch(digits, tmp_path):
    from training import distributed, engine, networks, recipe

    train_dir, _ = digits
    for label, names in (("0", ["a.png", "b.png"]), ("1", ["x.png", "y.png"])):
        (tmp_path / label).mkdir()
        for name, src in zip(names, sorted((train_dir / label).glob("*.png"))):
            (tmp_path / label / name).write_bytes(src.read_bytes() if label == "0" else b"garbage")
    split = data.scan_image_folder(tmp_path)
    config = PreprocessConfig(resize=32, crop=32)
    loader = data.make_loader(data.ImageFolderDataset(split, presets.EvalPreset(config)),
                              data.ShardedSampler(4, shuffle=False), 2, 0, False)
    model = networks.build_network("timm/mobilenetv3_small_050", 2)
    optimizer = recipe.make_optimizer(model, "sgd", 0.1, 0.1, 0.0, 0.0)
    scheduler = recipe.make_scheduler(optimizer, recipe.Schedule("constant", 2, 0))
    bad: list[int] = []
    metrics = engine.train_one_epoch(model, loader, recipe.ClassificationLoss(), optimizer, scheduler,
                                     distributed.Context(), engine.StepConfig(progress=False, input_shape=(3, 32, 32)),
                                     0, on_bad=bad.extend)
    assert sorted(split.samples[i][0].rsplit("/", 1)[-1] for i in bad) == ["x.png", "y.png"]
    assert scheduler.last_epoch == 2 and metrics["train_acc"] in (0.0, 0.5, 1.0)
