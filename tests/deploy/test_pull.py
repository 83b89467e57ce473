"""serving.pull and PUBLISHED.json: a repository published to a real S3 endpoint (moto's server on loopback) is
pulled back whole and checked, a publication in progress is waited for or refused, a changed object refused,
and an endpoint that does not answer is one line after --wait."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from build.repository.writer import MARKER
from common.hashing import file_sha256
from serving.publication import PLACEHOLDER, PUBLISHED, STORAGE_URI_SCHEME, S3Location
from serving.publish import SKIP, publish, s3_client
from serving.pull import PullError, get_args_parser, main, pull
from tests.deploy.test_publish import bucket_objects, moto, tiny_repository  # noqa: F401  (moto: fixture)

ROOT = Path(__file__).resolve().parents[2]


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every empty folder (None) under `folder`, by relative path."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if SKIP & set(path.relative_to(folder).parts):
            continue
        if path.is_file():
            found[path.relative_to(folder).as_posix()] = path.read_bytes()
        elif not any(path.iterdir()):
            found[path.relative_to(folder).as_posix()] = None
    return found


@pytest.fixture
def published(moto, tiny_artifacts, tmp_path, request):
    """A built repository whose ensemble version folder is empty (as S3 holds it: a placeholder), published
    to its own bucket; (repository, location)."""
    repo = tiny_repository(tiny_artifacts, tmp_path / "repo")
    for f in (repo / "image_classifier" / "1").iterdir():
        f.unlink()
    bucket = request.node.name.replace("_", "-")[:40].strip("-").lower()
    location = S3Location.parse(f"s3://{moto}/{bucket}/models/cpu")
    publish(repo, location, create_bucket=True, progress=False)
    return repo, location


def test_publish_writes_a_manifest_of_every_object_last(published):
    repo, location = published
    objects = bucket_objects(s3_client(location), location.bucket)
    manifest = json.loads(objects.pop(location.key(PUBLISHED)))
    assert manifest["url"] == location.url and manifest["source"] == str(repo.resolve()) and manifest["published_at"]
    assert {location.key(k) for k in manifest["objects"]} == set(objects)
    for key, entry in manifest["objects"].items():
        body = objects[location.key(key)]
        assert entry["size"] == len(body) and entry["sha256"] == hashlib.sha256(body).hexdigest()
    assert manifest["objects"][MARKER]["sha256"] == file_sha256(repo / MARKER)
    assert f"image_classifier/1/{PLACEHOLDER}" in manifest["objects"]

    # a republish removes the manifest before it changes anything and writes it after everything else
    order = []
    client = s3_client(location)
    for event in ("PutObject", "DeleteObject", "DeleteObjects"):
        client.meta.events.register(f"before-parameter-build.s3.{event}",
                                    lambda params, event_name, **_: order.append(
                                        (event_name.rsplit(".", 1)[1], params.get("Key"))))
    (repo / "preprocess" / "1" / "priority.py").unlink()
    publish(repo, location, progress=False, client=client)
    assert order[0] == ("DeleteObject", location.key(PUBLISHED))
    last_put = [key for event, key in order if event == "PutObject"][-1]
    assert last_put == location.key(PUBLISHED)
    assert order.index(("PutObject", location.key(PUBLISHED))) > order.index(("DeleteObjects", None))


def test_pull_copies_the_publication_whole(published, tmp_path):
    repo, location = published
    done = pull(location, tmp_path / "pulled", wait_s=0)
    pulled = tree(tmp_path / "pulled")
    assert json.loads(pulled.pop(PUBLISHED))["url"] == location.url
    assert pulled == tree(repo)  # every file, and the ensemble's empty version folder, as built
    assert done["objects"] == len(json.loads((tmp_path / "pulled" / PUBLISHED).read_text())["objects"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pulled", "repo"]  # no staging left

    # a new publication replaces an earlier pull whole
    (repo / "preprocess" / "1" / "priority.py").unlink()
    publish(repo, location, progress=False)
    pull(location, tmp_path / "pulled", wait_s=0)
    pulled = tree(tmp_path / "pulled")
    pulled.pop(PUBLISHED)
    assert pulled == tree(repo) and sorted(p.name for p in tmp_path.iterdir()) == ["pulled", "repo"]

    # a folder pull did not write is never replaced
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    with pytest.raises(PullError, match="theirs exists and was not written by serving.pull"):
        pull(location, tmp_path / "theirs", wait_s=0)
    assert tree(tmp_path / "theirs") == {"notes.txt": b"mine"}


def test_a_publication_in_progress_is_refused_in_one_line(published, tmp_path):
    """A publish deletes PUBLISHED.json first: until it writes the new one the prefix is a publication in
    progress, which pull waits for (--wait) and then refuses, leaving the folder as it was."""
    repo, location = published
    pull(location, tmp_path / "pulled", wait_s=0)
    before = tree(tmp_path / "pulled")
    s3_client(location).delete_object(Bucket=location.bucket, Key=location.key(PUBLISHED))
    refused = rf"holds no {PUBLISHED}: a publish is in progress there.*gave up after 1 attempt\(s\)"
    with pytest.raises(PullError, match=refused):
        pull(location, tmp_path / "pulled", wait_s=0)
    assert tree(tmp_path / "pulled") == before

    done = subprocess.run([sys.executable, "-m", "serving.pull", "--url", location.url, "--to",
                           str(tmp_path / "fresh"), "--wait", "0"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and not (tmp_path / "fresh").exists()
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"serving.pull: {location.url} holds no {PUBLISHED}")


def test_pull_waits_for_a_publish_in_progress_to_complete(published, tmp_path):
    repo, location = published
    s3_client(location).delete_object(Bucket=location.bucket, Key=location.key(PUBLISHED))
    waits = []

    def publish_meanwhile(seconds: float) -> None:  # the publish in progress completes while pull waits
        waits.append(seconds)
        publish(repo, location, progress=False)

    done = pull(location, tmp_path / "pulled", wait_s=3600, interval_s=7, sleep=publish_meanwhile)
    assert done["tries"] == 2 and waits == [7]
    pulled = tree(tmp_path / "pulled")
    pulled.pop(PUBLISHED)
    assert pulled == tree(repo)


def test_an_object_changed_after_publication_is_refused(published, tmp_path, capsys):
    repo, location = published
    s3_client(location).put_object(Bucket=location.bucket, Key=location.key("classifier/1/model.onnx"),
                                   Body=b"not the published model")
    with pytest.raises(PullError, match=r"1 object\(s\) differ from its PUBLISHED.json, e.g. classifier/1/model.onnx "
                                        r"\(23 bytes.*changed after publication"):
        main(get_args_parser().parse_args(["--url", location.url, "--to", str(tmp_path / "pulled"), "--wait", "3600",
                                           "--interval", "0"]))
    assert not (tmp_path / "pulled").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["repo"]

    s3_client(location).delete_object(Bucket=location.bucket, Key=location.key("preprocess/1/model.py"))
    with pytest.raises(PullError, match=r"2 object\(s\) differ.*"):
        pull(location, tmp_path / "pulled", wait_s=0)


def test_an_endpoint_that_does_not_answer_is_one_line_after_the_wait(tmp_path):
    """No S3 listening at the URL's host:port (a wrong endpoint, storage down): each try fails to connect, pull
    tries again while --wait lasts and then says so in one line, exit 1, nothing written."""
    from serving.server import free_port

    url = f"s3://127.0.0.1:{free_port()}/models/cpu"
    done = subprocess.run([sys.executable, "-m", "serving.pull", "--url", url, "--to", str(tmp_path / "pulled"),
                           "--wait", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                               "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"})
    assert done.returncode == 1 and not (tmp_path / "pulled").exists()
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"serving.pull: GET {url}/{PUBLISHED}: Could not connect") and "gave up after 1" in line


def run_as_kserve(storage_uri: str, volume: Path, endpoint: str) -> subprocess.CompletedProcess:
    """serving.pull as KServe runs a storage container: the ClusterStorageContainer's command, then the storageUri
    and the volume; the endpoint in AWS_ENDPOINT_URL, as KServe sets it from the service account's annotation."""
    return subprocess.run([sys.executable, "-m", "serving.pull", "--wait=0", "--interval=0", storage_uri, str(volume)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "AWS_ENDPOINT_URL": f"http://{endpoint}"})


def test_kserve_s_call_pulls_the_publication_whole_into_its_volume(published, moto, tmp_path):
    """KServe passes `<storageUri> /mnt/models`, a mount point that cannot be renamed: the checked publication is
    renamed into place whole as its folder `repository`, where the ServingRuntime's --model-repository points.
    published-s3:// names the location s3:// does (a scheme KServe's default storage initializer leaves alone)."""
    from serving.pull import KSERVE_FOLDER

    repo, location = published
    storage_uri = f"{STORAGE_URI_SCHEME}{location.bucket}/{location.prefix}"
    assert S3Location.parse(f"{STORAGE_URI_SCHEME}{moto}/b/p") == S3Location.parse(f"s3://{moto}/b/p")
    volume = tmp_path / "mnt-models"
    volume.mkdir()  # KServe's emptyDir, there before its storage container starts
    done = run_as_kserve(storage_uri, volume, moto)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pulled ") and f"into {volume / KSERVE_FOLDER} (checked against" in done.stdout
    assert [p.name for p in volume.iterdir()] == [KSERVE_FOLDER]  # no staging left
    pulled = tree(volume / KSERVE_FOLDER)
    assert json.loads(pulled.pop(PUBLISHED))["url"] == location.url
    assert pulled == tree(repo)


def test_kserve_s_call_refuses_a_changed_object_and_a_publish_in_progress_in_one_line(published, moto, tmp_path):
    repo, location = published
    storage_uri = f"{STORAGE_URI_SCHEME}{location.bucket}/{location.prefix}"
    volume = tmp_path / "mnt-models"
    volume.mkdir()
    client = s3_client(location)
    client.put_object(Bucket=location.bucket, Key=location.key("classifier/1/model.onnx"), Body=b"not published")
    done = run_as_kserve(storage_uri, volume, moto)
    (line,) = done.stderr.splitlines()
    assert done.returncode == 1 and "1 object(s) differ from its PUBLISHED.json" in line
    assert "changed after publication" in line and not any(volume.iterdir())

    client.delete_object(Bucket=location.bucket, Key=location.key(PUBLISHED))
    done = run_as_kserve(storage_uri, volume, moto)
    (line,) = done.stderr.splitlines()
    assert done.returncode == 1 and not any(volume.iterdir())
    assert line.startswith(f"serving.pull: s3://{location.bucket}/{location.prefix} holds no {PUBLISHED}")

    # one form or the other: --url with --to, or KServe's two arguments
    for argv in (["--url", location.url], [storage_uri], ["--url", location.url, "--to", "x", storage_uri, "y"]):
        with pytest.raises(ValueError, match="give --url and --to, or the two arguments KServe passes"):
            main(get_args_parser().parse_args(argv))
