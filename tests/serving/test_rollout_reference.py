"""A rolled-out version's quality reference comes from the images the build's took (BUILD.json's held-out
folder), on a real server (serving.rollout, build.repository.quality)."""
import json

import pytest

from build.repository import quality
from build.repository.spec import DeploymentSpec
from build.repository.writer import write_repository
from common.samples import sample_photos
from serving import rollout
from serving.server import TritonServer
from tests.serving.test_rollout import EXPLICIT, _candidate

pytestmark = pytest.mark.slow
THRESHOLDS = {"agreement": 0.99, "accuracy_drop": 0.01}


def _reference(repo, version):
    return json.loads((repo.version_dir(version) / quality.REFERENCE_JSON).read_text())


def test_a_rollout_takes_its_reference_from_the_builds_held_out_folder(tiny_artifacts, tmp_path):
    held = tmp_path / "held-out"
    held.mkdir()
    for name, path in sample_photos(["chelsea", "coffee", "coins"]).items():
        (held / f"{name}{path.suffix}").write_bytes(path.read_bytes())
    path = tmp_path / "model_repository"
    write_repository(DeploymentSpec(artifacts=str(tiny_artifacts)), "python-onnxruntime", path, "tests",
                     held_out=str(held))
    repo = rollout.Repository.open(path)
    built = _reference(repo, 1)
    assert repo.manifest["held_out"] == built["held_out"]
    assert built["held_out"]["folder"] == str(held.resolve()) and built["images"] == 3

    lines = []
    with TritonServer(path, log_file=tmp_path / "tritonserver.log", extra_args=EXPLICIT) as server:
        api = rollout.Server(server.http_url)
        assert rollout.add(repo, api, _candidate(tiny_artifacts, tmp_path / "v2", 1.05), None, THRESHOLDS,
                           log=lines.append) == 2
        held.rename(tmp_path / "moved")  # the build's folder is gone: the bundled photos, and the log says so
        assert rollout.add(repo, api, _candidate(tiny_artifacts, tmp_path / "v3", 1.1), None, THRESHOLDS,
                           log=lines.append) == 3
    assert server.process.returncode == 0

    second = _reference(repo, 2)
    assert second["held_out"] == built["held_out"] and (second["images"], second["description"]) == (3, built["description"])
    assert f"held-out images: {held.resolve()}, as the build used" in lines
    third = _reference(repo, 3)
    assert third["held_out"] == {"folder": None} and third["images"] == 240
    assert f"held-out images: the bundled photos, since {held.resolve()}, the build's, is gone " \
           "(--held-out DIR to choose)" in lines
