"""The gate refuses held-out images that calibration saw (same bytes, whatever the name): `make engines`
before it builds anything, `build.precision.validate` against what the calibration cache records."""
import json
import shutil

import pytest

from build.precision import validate
from build.precision.imagesets import CALIBRATION_PHOTOS, OverlappingImages
from build.precision.variants import VariantOptions, build_variants, prepare, require_disjoint
from build.repository.spec import DeploymentSpec
from common.preprocessing import PreprocessConfig
from common.samples import sample_photos


def _folder(root, names):
    root.mkdir()
    photos = sample_photos(names)
    for name, path in photos.items():
        shutil.copy(path, root / f"{name}{path.suffix}")
    return root


@pytest.fixture
def calibration(tmp_path):
    return _folder(tmp_path / "calibration-images", ["astronaut", "rocket", "horse"])


@pytest.fixture
def held_out(tmp_path):
    return _folder(tmp_path / "held-out", ["chelsea", "coffee", "coins"])


def _int8(artifacts, calibration_images, held_out_images):
    spec = DeploymentSpec(artifacts=str(artifacts), precision="int8")
    options = VariantOptions(calibration_images=str(calibration_images), held_out=str(held_out_images),
                             thresholds={"int8": 0.0})
    return prepare(spec, "python-onnxruntime", "unused.json", options, lambda _: None)


def test_the_same_folder_for_both_is_refused_before_anything_is_built(artifacts, calibration):
    with pytest.raises(OverlappingImages) as refused:
        _int8(artifacts, calibration, calibration)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("3 of the 3 held-out images are calibration images "
                              f"(--calibration-images {calibration}), byte for byte: ")
    assert str(calibration / "astronaut.png") in message and message.endswith("disjoint folders")
    assert not (artifacts / "calibration").exists() and not list(artifacts.glob("model.int8*"))


def test_a_calibration_image_copied_under_another_name_is_refused(artifacts, calibration, held_out):
    shutil.copy(calibration / "rocket.jpg", held_out / "not-a-rocket.jpg")
    with pytest.raises(OverlappingImages, match=f"^1 of the 4 held-out images .*: {held_out / 'not-a-rocket.jpg'};"):
        _int8(artifacts, calibration, held_out)


def test_disjoint_folders_build_and_gate(artifacts, calibration, held_out):
    deployable = _int8(artifacts, calibration, held_out)
    assert deployable.variant == "int8-cpu" and deployable.reports[0].images == 3


def test_the_bundled_sets_are_disjoint_by_content(tmp_path):
    require_disjoint(VariantOptions())  # the default make engines: raises if they shared a file's bytes
    copies = _folder(tmp_path / "copies", list(CALIBRATION_PHOTOS))
    with pytest.raises(OverlappingImages, match="^8 of the 8 held-out images are calibration images "
                                                r"\(the bundled calibration photos\)"):
        require_disjoint(VariantOptions(held_out=str(copies)))


def _gate(artifacts, held_out_images):
    return validate.main(validate.get_args_parser().parse_args(
        ["--artifacts", str(artifacts), "--held-out", str(held_out_images), "--variants", "int8-cpu"]))


def test_the_gate_alone_checks_the_calibration_caches_record(artifacts, calibration, held_out, capsys):
    config = PreprocessConfig.load(artifacts / "preprocess.json")
    build_variants(artifacts, "int8", VariantOptions(calibration_images=str(calibration)), config, lambda _: None,
                   "python-onnxruntime")
    assert [r.name for r in _gate(artifacts, held_out)] == ["fp32", "int8-cpu"]
    assert "warning" not in capsys.readouterr().out
    shutil.copy(calibration / "horse.png", held_out / "copy.png")
    with pytest.raises(OverlappingImages, match=f"^1 of the 4 held-out images .*calibration/max.json\\), byte "
                                                f"for byte: {held_out / 'copy.png'};"):
        _gate(artifacts, held_out)
    (held_out / "copy.png").unlink()
    meta_path = artifacts / "calibration" / "max.json"
    meta = json.loads(meta_path.read_text())
    del meta["image_files"]  # as written before caches recorded their files
    meta_path.write_text(json.dumps(meta))
    _gate(artifacts, calibration)  # cannot be told: warned, not refused
    assert f"warning: {meta_path} records no calibration image files" in capsys.readouterr().out
