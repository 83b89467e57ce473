"""serving.publish: a built repository uploaded to a real S3 endpoint (moto's server on loopback), then
served from s3:// by a real tritonserver that classifies the bundled photos."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from build.repository import placement
from build.repository.spec import DeploymentSpec
from build.repository.writer import MARKER, write_repository
from common.samples import CAT_CLASSES, ESPRESSO
from serving.publish import (PLACEHOLDER, PUBLISHING, PublishError, S3Location, get_args_parser, main, publish,
                             repository_objects, s3_client)
from serving.publication import PUBLISHED
from serving.server import TritonServer, free_port

ROOT = Path(__file__).resolve().parents[2]


def test_urls_read_as_triton_reads_them():
    local = S3Location.parse("s3://127.0.0.1:9000/models/lite0/cpu")
    assert (local.endpoint, local.bucket, local.prefix) == ("http://127.0.0.1:9000", "models", "lite0/cpu")
    assert local.url == "s3://127.0.0.1:9000/models/lite0/cpu" and local.key("a/b") == "lite0/cpu/a/b"
    aws = S3Location.parse("s3://bucket")
    assert (aws.endpoint, aws.bucket, aws.prefix, aws.url) == (None, "bucket", "", "s3://bucket")
    for bad in ("http://x/y", "s3://", "s3://host:port/b", "s3://127.0.0.1:9000/"):
        with pytest.raises(ValueError):
            S3Location.parse(bad)


def test_tls_urls_read_as_triton_reads_them():
    """Triton reads `s3://https://host:port/bucket/path` as an endpoint over TLS (and `s3://http://...` as
    plain HTTP, the same as no scheme); its port is required there, as in Triton's own pattern."""
    tls = S3Location.parse("s3://https://s3.example.internal:443/models/lite0/cpu")
    assert (tls.endpoint, tls.bucket, tls.prefix) == ("https://s3.example.internal:443", "models", "lite0/cpu")
    assert tls.url == "s3://https://s3.example.internal:443/models/lite0/cpu"
    plain = S3Location.parse("s3://http://127.0.0.1:9000/models/lite0")
    assert (plain.endpoint, plain.url) == ("http://127.0.0.1:9000", "s3://127.0.0.1:9000/models/lite0")
    for bad in ("s3://https://host/b/p", "s3://https://", "s3://https://host:443/"):
        with pytest.raises(ValueError):
            S3Location.parse(bad)


def test_only_a_built_repository_is_published(tmp_path):
    (tmp_path / "model" / "1").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="make engines"):
        repository_objects(tmp_path)


def test_objects_cover_the_repository_with_placeholders_and_marker_last(lite0_repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(lite0_repository, repo)
    (repo / "classifier" / "1" / "__pycache__").mkdir(exist_ok=True)
    (repo / "classifier" / "1" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    for f in (repo / "image_classifier" / "1").iterdir():
        f.unlink()
    objects = repository_objects(repo)
    assert list(objects)[-1] == MARKER
    assert objects["image_classifier/1/" + PLACEHOLDER] is None
    assert "classifier/config.pbtxt" in objects and "classifier/1/model.onnx" in objects
    assert not [n for n in objects if "__pycache__" in n]
    files = {p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert files == {n for n, p in objects.items() if p is not None}


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    """moto's S3 server on a free loopback port, with dummy credentials for every client."""
    server_bin = Path(sys.executable).parent / "moto_server"
    if not server_bin.exists():
        pytest.skip("moto[server] is not installed (make setup)")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(server_bin), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except OSError:
                if process.poll() is not None:
                    pytest.fail(f"moto_server exited; see {log}")
                time.sleep(0.1)
        with pytest.MonkeyPatch.context() as env:
            for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                                ("AWS_DEFAULT_REGION", "us-east-1")):
                env.setenv(name, value)
            yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


class ServerOnS3(TritonServer):
    """TritonServer with an s3:// repository (the launcher passes the URL through to tritonserver)."""

    def __init__(self, url: str, workdir: Path, **kwargs):
        super().__init__(workdir, **kwargs)
        self.url = url

    def command(self) -> list[str]:
        return [f"--model-repository={self.url}" if a.startswith("--model-repository=") else a
                for a in super().command()]


@pytest.mark.slow
def test_published_repository_serves_from_s3(moto, lite0_repository, tmp_path, photos, capsys):
    from clients.client import ImageClassifierClient

    repo = tmp_path / "repo"
    shutil.copytree(lite0_repository, repo)
    for f in (repo / "image_classifier" / "1").iterdir():  # an ensemble's version folder as S3 sees it: empty
        f.unlink()
    location = S3Location.parse(f"s3://{moto}/models/lite0/cpu")
    done = publish(repo, location, create_bucket=True, progress=False)
    assert done["placeholders"] == [f"image_classifier/1/{PLACEHOLDER}"] and done["deleted"] == 0

    with ServerOnS3(done["url"], tmp_path, log_file=tmp_path / "tritonserver.log") as server, \
            ImageClassifierClient(server.http_url, "http") as client:
        chelsea, coffee = client.classify([photos["chelsea"], photos["coffee"]], top_k=3)
    assert server.process.returncode == 0
    assert CAT_CLASSES & {p.index for p in chelsea}
    assert coffee[0].index == ESPRESSO

    # publishing again (`make publish`) mirrors the repository: a file gone from it is gone from the bucket;
    # the command says where the repository may run (build.repository.placement)
    (repo / "preprocess" / "1" / "preprocess.json").rename(repo / "preprocess" / "1" / "renamed.json")
    main(get_args_parser().parse_args(["--model-repository", str(repo), "--url", location.url, "--no-progress"]))
    printed = capsys.readouterr().out.splitlines()
    assert re.fullmatch(rf"published {done['objects']} objects \(\d+ bytes; 1 placeholder\(s\), 1 stale object\(s\) deleted\)",
                        printed[0]), printed
    assert printed[-1] == placement.advice(repo) and "any x86-64 CPU" in printed[-1]


@pytest.mark.slow
def test_publish_to_a_missing_bucket_says_so(moto, lite0_repository):
    with pytest.raises(PublishError, match="NoSuchBucket|does not exist"):
        publish(lite0_repository, S3Location.parse(f"s3://{moto}/no-such-bucket/x"), progress=False)


def tiny_repository(tiny_artifacts, out: Path) -> Path:
    write_repository(DeploymentSpec(artifacts=str(tiny_artifacts)), "python-onnxruntime", out, "tests")
    return out


def bucket_objects(client, bucket: str) -> dict[str, bytes]:
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def test_publish_deletes_nothing_that_is_not_the_repositorys(moto, tiny_artifacts, tmp_path):
    repo = tiny_repository(tiny_artifacts, tmp_path / "repo")
    root = S3Location.parse(f"s3://{moto}/shared")
    client = s3_client(root)
    client.create_bucket(Bucket="shared")
    theirs = {"other-team/model.onnx": b"theirs", "models/notes.txt": b"notes",
              "loose/classifier/theirs.txt": b"no BUILD.json at loose/: not a published repository"}
    for key, body in theirs.items():
        client.put_object(Bucket="shared", Key=key, Body=body)

    with pytest.raises(PublishError, match="is a bucket root: publish under a prefix"):
        publish(repo, root, progress=False)
    assert bucket_objects(client, "shared") == theirs

    sibling = S3Location.parse(f"s3://{moto}/shared/models/gpu")  # a repository beside the one at models/
    nested = S3Location.parse(f"s3://{moto}/shared/models/classifier/v2")  # and one nested inside its folder
    for location in (S3Location.parse(f"s3://{moto}/shared/loose"), S3Location.parse(f"s3://{moto}/shared/models"),
                     sibling, nested):
        assert publish(repo, location, progress=False)["deleted"] == 0
    kept = bucket_objects(client, "shared")

    (repo / "preprocess" / "1" / "priority.py").unlink()
    done = publish(repo, S3Location.parse(f"s3://{moto}/shared/models"), progress=False)
    after = bucket_objects(client, "shared")
    assert done["deleted"] == 1 and set(kept) - set(after) == {"models/preprocess/1/priority.py"}
    assert theirs.items() <= after.items()
    assert {sibling.key(MARKER), nested.key(MARKER), nested.key("classifier/1/model.onnx")} <= set(after)
    assert "models/" + PUBLISHING not in after


def test_an_interrupted_republish_leaves_no_build_json(moto, tiny_artifacts, tmp_path):
    from botocore.exceptions import EndpointConnectionError

    repo = tiny_repository(tiny_artifacts, tmp_path / "repo")
    location = S3Location.parse(f"s3://{moto}/republish/models")
    publish(repo, location, create_bucket=True, progress=False)

    failing = s3_client(location)  # a real client whose connection drops at one upload

    def drop(params, **_):
        if params["Key"] == location.key("preprocess/1/model.py"):
            raise EndpointConnectionError(endpoint_url=location.endpoint)
    failing.meta.events.register("before-parameter-build.s3.PutObject", drop)
    (repo / "classifier" / "1" / "model.onnx").write_bytes(b"a newer model")  # overwritten before the drop
    with pytest.raises(PublishError, match="holds no BUILD.json until a publish completes.*Could not connect"):
        publish(repo, location, progress=False, client=failing)
    keys = bucket_objects(s3_client(location), "republish")
    assert keys[location.key("classifier/1/model.onnx")] == b"a newer model"  # a mixed prefix...
    assert location.key(MARKER) not in keys  # ...that does not claim to be whole

    (repo / "preprocess" / "1" / "priority.py").unlink()
    done = publish(repo, location, progress=False)  # the retry still knows the folders it owns
    keys = bucket_objects(s3_client(location), "republish")
    assert location.key(MARKER) in keys and location.key(PUBLISHING) not in keys and done["deleted"] == 1


def test_publish_leaves_out_what_rollout_keeps_for_one_server(moto, tiny_artifacts, tmp_path):
    """An A/B test's `*_candidate` models (every pod serving the prefix would load them: `--load-model=*`) and
    the versions a rollback retired stay on the server that made them; an earlier publish's copies go."""
    from serving.rollout import RETIRED, Repository, candidate_names

    repo = tiny_repository(tiny_artifacts, tmp_path / "repo")
    location = S3Location.parse(f"s3://{moto}/rollout/models")
    publish(repo, location, create_bucket=True, progress=False)
    served = Repository.open(repo)
    candidate, candidate_ensemble = candidate_names(served)
    shutil.copytree(repo / served.classifier, repo / candidate)
    shutil.copytree(repo / served.ensemble, repo / candidate_ensemble)
    shutil.copytree(repo / served.classifier / "1", repo / served.classifier / RETIRED / "2")
    left_out = {p.relative_to(repo).as_posix() for name in (candidate, candidate_ensemble)
                for p in (repo / name).rglob("*") if p.is_file()}
    left_out |= {p.relative_to(repo).as_posix() for p in (repo / served.classifier / RETIRED).rglob("*")
                 if p.is_file()}
    client = s3_client(location)
    for name in left_out:  # as a publish before this rule shipped them
        client.put_object(Bucket="rollout", Key=location.key(name), Body=b"earlier")

    done = publish(repo, location, progress=False)
    keys = set(bucket_objects(client, "rollout"))
    assert not [k for k in keys if k.removeprefix(location.key("")) in left_out]
    assert done["deleted"] == len(left_out)
    assert location.key(f"{served.classifier}/1/model.onnx") in keys and location.key(MARKER) in keys

    # make image's build context is the same selection, copied into a folder (empty folders kept)
    copied = subprocess.run([sys.executable, "-m", "serving.publish", "--model-repository", str(repo), "--folder",
                             str(tmp_path / "context")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert copied.returncode == 0, copied.stderr
    files = {p.relative_to(tmp_path / "context").as_posix() for p in (tmp_path / "context").rglob("*") if p.is_file()}
    assert files == {k.removeprefix(location.key("")) for k in keys if not k.endswith((PLACEHOLDER, PUBLISHED))}
    assert not files & left_out and (tmp_path / "context" / served.ensemble / "1").is_dir()
    assert "serving.publish --model-repository \"$REPOSITORY\" --folder" in (ROOT / "deploy/images/build-cpu.sh").read_text()
