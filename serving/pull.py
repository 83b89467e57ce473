"""Download a published model repository into a local folder, every file checked against PUBLISHED.json.

    python -m serving.pull --url s3://host:port/bucket/prefix --to /models/repository [--wait 300]
    python -m serving.pull [--wait 300] published-s3://bucket/prefix /mnt/models      # as KServe calls it

What `make publish` uploaded (serving.publish) is read back only once the prefix holds PUBLISHED.json, the
manifest a publish writes last; every object it lists must have its size and sha256. While a publish is in
progress (no manifest, or the manifest changed while the objects were read) it waits and tries again, up to
--wait seconds; an object that differs from an unchanged manifest (changed after publication) is refused at
once. The files go into a staging folder beside --to and are renamed into place whole, so --to is either
absent, the previous pull, or this one, never a part. The Kubernetes Deployment runs it as its
initContainer (deploy/k8s/base/deployment.yaml), so tritonserver serves a complete local copy.

KServe runs it as the storage container of deploy/kserve/storage-container (a ClusterStorageContainer), which
passes two arguments after the command: the InferenceService's storageUri and the volume it mounts at
/mnt/models. A mount point cannot be renamed, so the repository goes into its folder `repository`
(KSERVE_FOLDER), the ServingRuntime's --model-repository.

boto3, as serving.publish (the server images carry it: requirements/image.txt), so credentials come from
boto3's own chain: AWS_* variables, a web identity token (EKS IRSA), an instance or pod role; the URL in
Triton's form as for serving.publish. A URL that names no host:port goes to AWS_ENDPOINT_URL where that is set
(boto3 reads it; KServe sets it from the service account's s3-endpoint annotation), else to AWS.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from serving.publication import EMPTY_SHA256, PLACEHOLDER, PUBLISHED, ManifestError, S3Location, read_manifest, s3_client

KSERVE_FOLDER = "repository"  # in the volume KServe mounts: the ServingRuntime's --model-repository


class PullError(RuntimeError):
    """The publication cannot be pulled (refused, or still in progress when the wait ran out)."""


class InProgress(RuntimeError):
    """A publish is running over the prefix: worth trying again."""


def open_object(client, location: S3Location, relative: str):
    """The body of the object (a stream to read and close); None where it does not exist."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return client.get_object(Bucket=location.bucket, Key=location.key(relative))["Body"]
    except ClientError as exc:
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if error.get("Code") in ("NoSuchKey", "404"):
            return None
        if status >= 500 or error.get("Code") in ("SlowDown", "RequestTimeout"):  # the endpoint's trouble, perhaps passing
            raise InProgress(f"GET {location.url}/{relative}: {error.get('Code')} {error.get('Message', '')}") from None
        raise PullError(f"GET {location.url}/{relative}: {error.get('Code')} {error.get('Message', '')}".strip()) from None
    except BotoCoreError as exc:  # no connection, a timeout: try again while --wait lasts
        raise InProgress(f"GET {location.url}/{relative}: {exc}") from None


def read_published(client, location: S3Location) -> bytes:
    answer = open_object(client, location, PUBLISHED)
    if answer is None:
        raise InProgress(f"{location.url} holds no {PUBLISHED}: a publish is in progress there, or none completed")
    try:
        return answer.read()
    finally:
        answer.close()


def download(client, location: S3Location, relative: str, target: Path) -> tuple[int, str] | None:
    """Write one object to `target`; its (size, sha256), None where it is missing."""
    from botocore.exceptions import BotoCoreError

    answer = open_object(client, location, relative)
    if answer is None:
        return None
    digest, size = hashlib.sha256(), 0
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(target, "wb") as out:
            for block in answer.iter_chunks(1 << 20):
                digest.update(block)
                size += len(block)
                out.write(block)
    except (BotoCoreError, ConnectionError, TimeoutError) as exc:
        raise InProgress(f"GET {location.url}/{relative}: {exc}") from None
    finally:
        answer.close()
    return size, digest.hexdigest()


def pull_once(client, location: S3Location, staging: Path) -> int:
    """One complete, checked copy of the publication into `staging`; the number of objects. InProgress where a
    publish runs meanwhile, PullError where an object differs from a manifest that did not change."""
    body = read_published(client, location)
    try:
        objects = read_manifest(body, location.url)
    except ManifestError as exc:
        raise PullError(str(exc)) from None
    wrong = []
    for relative, expected in objects.items():
        if relative.endswith(f"/{PLACEHOLDER}") and expected == (0, EMPTY_SHA256):
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)  # an empty folder, as built
            continue
        found = download(client, location, relative, staging / relative)
        if found != expected:
            wrong.append(f"{relative} ({'missing' if found is None else f'{found[0]} bytes, sha256 {found[1][:12]}'}; "
                         f"{PUBLISHED} says {expected[0]} bytes, sha256 {expected[1][:12]})")
    if wrong:
        if read_published(client, location) != body:
            raise InProgress(f"{location.url} was republished while it was read")
        raise PullError(f"{location.url}: {len(wrong)} object(s) differ from its {PUBLISHED}, e.g. {wrong[0]}: "
                        "changed after publication; publish again (make publish)")
    (staging / PUBLISHED).write_bytes(body)
    return len(objects)


def check_replaceable(dest: Path) -> None:
    """PullError unless `dest` is absent, empty, or an earlier pull (it holds PUBLISHED.json)."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not (dest / PUBLISHED).is_file():
        raise PullError(f"{dest} exists and was not written by serving.pull; refusing to replace it")


def swap_in(staging: Path, dest: Path) -> None:
    """Rename `staging` to `dest` (checked by check_replaceable): an earlier pull is moved aside first and
    deleted after, so `dest` holds one whole repository or, for the moment between two renames, none."""
    if dest.exists() and any(dest.iterdir()):
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        dest.rename(old)
        staging.rename(dest)
        shutil.rmtree(old)
        return
    if dest.exists():
        dest.rmdir()
    staging.rename(dest)


def pull(location: S3Location, dest: Path, wait_s: float, interval_s: float = 10.0, client=None,
         sleep: Callable[[float], None] = time.sleep) -> dict:
    """Pull the publication at `location` into `dest`, trying again every `interval_s` for `wait_s` while a
    publish is in progress there. Raises PullError with the reason."""
    client = s3_client(location) if client is None else client
    dest = dest.absolute()
    check_replaceable(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.pulling-{os.getpid()}")
    deadline, tries = time.monotonic() + wait_s, 0
    while True:
        tries += 1
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            count = pull_once(client, location, staging)
            swap_in(staging, dest)
            return {"url": location.url, "to": str(dest), "objects": count, "tries": tries}
        except InProgress as exc:
            if time.monotonic() >= deadline:
                raise PullError(f"{exc} (gave up after {tries} attempt(s) in {wait_s:.0f} s, --wait)") from None
            sleep(interval_s)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Download a published model repository, checked against its "
                                            f"{PUBLISHED}, into a local folder.")
    p.add_argument("--url", help="what make publish printed: s3://bucket/prefix, "
                                 "s3://host:port/bucket/prefix or s3://https://host:port/bucket/prefix")
    p.add_argument("--to", type=Path,
                   help="the folder to write, replaced whole by a rename: not a mount point (a volume's subfolder)")
    p.add_argument("storage_uri", nargs="?", metavar="STORAGE_URI",
                   help="instead of --url and --to, as KServe calls a storage container: the storageUri "
                        "(published-s3://bucket/prefix or any --url form) ...")
    p.add_argument("volume", nargs="?", type=Path, metavar="VOLUME",
                   help=f"... and the volume it mounts (/mnt/models); the repository goes into VOLUME/{KSERVE_FOLDER}")
    p.add_argument("--wait", type=float, default=300.0,
                   help="seconds to keep trying while a publish is in progress there (default: %(default)s)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between tries (default: %(default)s)")
    return p


def source_and_destination(args: argparse.Namespace) -> tuple[S3Location, Path]:
    """--url and --to, or KServe's STORAGE_URI VOLUME (into VOLUME/KSERVE_FOLDER); ValueError for anything else."""
    if args.url and args.to and args.storage_uri is None:
        return S3Location.parse(args.url), args.to
    if args.storage_uri and args.volume and args.url is None and args.to is None:
        return S3Location.parse(args.storage_uri), args.volume / KSERVE_FOLDER
    raise ValueError("give --url and --to, or the two arguments KServe passes: STORAGE_URI VOLUME")


def main(args: argparse.Namespace) -> None:
    location, dest = source_and_destination(args)
    done = pull(location, dest, args.wait, args.interval)
    print(f"pulled {done['objects']} objects of {done['url']} into {done['to']} (checked against {PUBLISHED})")


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (PullError, ValueError, OSError) as exc:
        sys.exit(f"serving.pull: {exc}")
