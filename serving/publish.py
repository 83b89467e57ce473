"""Publish a built model repository to S3-compatible object storage, where Triton can serve it.

    python -m serving.publish --model-repository model_repository --url s3://host:port/bucket/prefix
    tritonserver --model-repository=s3://host:port/bucket/prefix      (AWS_* variables: credentials)

The URL is Triton's own form: `s3://bucket/prefix` on AWS, `s3://host:port/bucket/prefix` for another
S3-compatible endpoint over plain HTTP, `s3://https://host:port/bucket/prefix` over TLS; a bucket root is
refused (the bucket's other objects are not the repository's). Every file is uploaded but what
serving.rollout keeps for one server (an A/B test's `*_candidate` models, `<classifier>/_retired/`); S3
has no empty folders, so an empty folder (an ensemble's version folder) gets a placeholder object, or
Triton finds no version there.
A prefix with BUILD.json holds a whole repository: a publish first deletes PUBLISHED.json, writes
.publishing (the model folders it owns) and deletes the old BUILD.json, uploads, writes BUILD.json, and
PUBLISHED.json last (every object's size and sha256, serving.publication: what serving.pull checks). Stale objects (the
repository no longer has them) are deleted only where the prefix already held a published repository
(BUILD.json or .publishing), only inside the model folders its old or new BUILD.json names, and never
under a folder that holds a BUILD.json of its own (another repository nested there); nothing else under
the prefix is touched.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path

from build.repository import placement
from build.repository.writer import MARKER, STAGING, read_manifest
from common.hashing import file_sha256
from serving.publication import EMPTY_SHA256, PLACEHOLDER, PUBLISHED, S3Location, manifest, s3_client
from serving.rollout import CANDIDATE, RETIRED
from serving.triton_admin import LOCK_FILE

PUBLISHING = ".publishing"  # at the prefix while a publish runs: {"models": [the model folders it owns]}
SKIP = {"__pycache__", STAGING, LOCK_FILE}


class PublishError(RuntimeError):
    pass


def rollout_only(relative: Path, models: list[str]) -> bool:
    """A path serving.rollout keeps beside the served models on one server: an A/B test's
    `<model>_candidate` folders (`--load-model=*` would load them on every pod serving the prefix) and the
    versions a rollback moved to `<model>/_retired/`."""
    parts = relative.parts
    return (parts[0].endswith(CANDIDATE) and parts[0] not in models) or (len(parts) > 1 and parts[1] == RETIRED)


def repository_objects(repository: Path) -> dict[str, Path | None]:
    """Object name (relative, '/'-separated) -> file to upload, None for an empty placeholder.
    BUILD.json last; no PUBLISHED.json (a folder serving.pull wrote has one: publish writes its own)."""
    models = read_manifest(repository).get("models", [])  # FileNotFoundError unless build.engines wrote it
    objects: dict[str, Path | None] = {}
    for path in sorted(repository.rglob("*")):
        relative = path.relative_to(repository)
        if SKIP & set(relative.parts) or relative.as_posix() in (MARKER, PUBLISHED) or rollout_only(relative, models):
            continue
        if path.is_file():
            objects[relative.as_posix()] = path
        elif path.is_dir() and not any(path.iterdir()):
            objects[f"{relative.as_posix()}/{PLACEHOLDER}"] = None
    objects[MARKER] = repository / MARKER
    return objects


def publish(repository: Path, location: S3Location, create_bucket: bool = False, progress: bool = True,
            client=None) -> dict:
    """Upload `repository` under `location`; returns what was done. Raises PublishError with the reason."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError
    from tqdm import tqdm

    if not location.prefix:
        raise PublishError(f"{location.url} is a bucket root: publish under a prefix (s3://bucket/prefix), "
                           "the bucket's other objects are not the repository's")
    objects = repository_objects(repository)
    models = read_manifest(repository).get("models", [])
    client = client or s3_client(location)
    try:
        if create_bucket:
            existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
            if location.bucket not in existing:
                client.create_bucket(Bucket=location.bucket)
        before = _list_keys(client, location)
        owned = _owned_models(client, location, before)
        publishing = json.dumps({"models": sorted(set(owned or ()) | set(models))}).encode()
        client.delete_object(Bucket=location.bucket, Key=location.key(PUBLISHED))  # first: readers wait from now
        client.put_object(Bucket=location.bucket, Key=location.key(PUBLISHING), Body=publishing)
        client.delete_object(Bucket=location.bucket, Key=location.key(MARKER))
        total = sum(p.stat().st_size for p in objects.values() if p)
        published = published_manifest(repository, location, objects)  # the files as this publish found them
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"publish {location.url}", disable=not progress) as bar:
            for name, path in objects.items():
                if name == MARKER:
                    continue
                if path is None:
                    client.put_object(Bucket=location.bucket, Key=location.key(name), Body=b"")
                else:
                    client.upload_file(str(path), location.bucket, location.key(name), Callback=bar.update)
            stale = stale_keys(before, objects, location, set(owned or ()) | set(models)) if owned is not None else []
            for start in range(0, len(stale), 1000):
                client.delete_objects(Bucket=location.bucket,
                                      Delete={"Objects": [{"Key": k} for k in stale[start:start + 1000]]})
            client.upload_file(str(objects[MARKER]), location.bucket, location.key(MARKER), Callback=bar.update)
        client.put_object(Bucket=location.bucket, Key=location.key(PUBLISHED), Body=published)  # last
        client.delete_object(Bucket=location.bucket, Key=location.key(PUBLISHING))
        after = _list_keys(client, location)
    except (BotoCoreError, ClientError, Boto3Error, OSError) as exc:
        raise PublishError(f"publishing to {location.url} failed (it holds no {MARKER} until a publish "
                           f"completes): {exc}") from exc
    missing = [n for n, p in objects.items() if after.get(location.key(n)) != (p.stat().st_size if p else 0)]
    missing += [PUBLISHED] if after.get(location.key(PUBLISHED)) != len(published) else []
    if missing:
        raise PublishError(f"after upload, {len(missing)} object(s) are missing or of the wrong size: {missing[:5]}")
    return {"url": location.url, "objects": len(objects), "bytes": total, "deleted": len(stale),
            "placeholders": sorted(n for n, p in objects.items() if p is None)}


def published_manifest(repository: Path, location: S3Location, objects: dict[str, Path | None]) -> bytes:
    """PUBLISHED.json for `objects` as uploaded: each one's size and sha256 (placeholders: empty)."""
    listed = {name: (path.stat().st_size, file_sha256(path)) if path else (0, EMPTY_SHA256)
              for name, path in objects.items()}
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return manifest(location.url, str(repository.resolve()), now, listed)


def _owned_models(client, location: S3Location, keys: dict[str, int]) -> list[str] | None:
    """The model folders of the repository published at `location` (its BUILD.json, or the .publishing of an
    interrupted publish); None where the prefix holds no published repository."""
    for name in (MARKER, PUBLISHING):
        if location.key(name) in keys:
            body = client.get_object(Bucket=location.bucket, Key=location.key(name))["Body"].read()
            try:
                models = json.loads(body).get("models", [])
            except (ValueError, AttributeError):
                raise PublishError(f"{location.url}/{name} is not a repository's JSON: move it aside, or publish "
                                   "under another prefix") from None
            return [m for m in models if isinstance(m, str) and m not in ("", ".", "..") and "/" not in m]
    return None


def stale_keys(before: dict[str, int], objects: dict, location: S3Location, models: set[str]) -> list[str]:
    """Keys in `before` to delete: inside one of `models`' folders or their A/B candidates' (an earlier
    publish shipped them), not among `objects`, and not under a folder holding a BUILD.json or .publishing
    of its own (another repository nested there)."""
    models = models | {m + CANDIDATE for m in models}
    relative = {k[len(location.key("")):] for k in before}
    nested = {r.rpartition("/")[0] + "/" for r in relative if "/" in r and r.rpartition("/")[2] in (MARKER, PUBLISHING)}
    return sorted(location.key(r) for r in relative
                  if r not in objects and r.partition("/")[0] in models and "/" in r
                  and not any(r.startswith(n) for n in nested))


def _list_keys(client, location: S3Location) -> dict[str, int]:
    keys: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=location.key("")):
        keys.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return keys


def copy_to_folder(repository: Path, folder: Path) -> int:
    """What publish would upload, copied into `folder` (a new one) instead: the repository for an image
    (`make image`), without an A/B test's candidates, retired versions or a model-control lock. The number
    of files."""
    if folder.exists():
        raise PublishError(f"{folder} exists: give a new folder")
    objects = repository_objects(repository)
    for name, path in objects.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)  # for a placeholder (path None): the empty folder itself
        if path is not None:
            shutil.copy2(path, target)
    return sum(path is not None for path in objects.values())


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Upload a built model repository to S3-compatible storage.")
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"), help="(default: %(default)s)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url",
                       help="s3://bucket/prefix (AWS), s3://host:port/bucket/prefix (other S3 endpoints, HTTP) or "
                            "s3://https://host:port/bucket/prefix (TLS)")
    where.add_argument("--folder", type=Path,
                       help="copy what would be uploaded into this new folder instead (make image's build context)")
    p.add_argument("--create-bucket", action="store_true", help="create the bucket if it does not exist")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(args: argparse.Namespace) -> None:
    if args.folder:
        files = copy_to_folder(args.model_repository, args.folder)
        print(f"copied {files} files of {args.model_repository} into {args.folder} (what a publish would upload)")
        return
    done = publish(args.model_repository, S3Location.parse(args.url), args.create_bucket, args.progress)
    print(f"published {done['objects']} objects ({done['bytes']} bytes; {len(done['placeholders'])} placeholder(s), "
          f"{done['deleted']} stale object(s) deleted)")
    print(f"serve it with: tritonserver --model-repository={done['url']}   (AWS_ACCESS_KEY_ID, "
          "AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION set)")
    print(f"or a checked local copy (the k8s pods' initContainer): python -m serving.pull --url {done['url']} --to DIR")
    print(placement.advice(args.model_repository))


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (PublishError, ValueError, FileNotFoundError) as exc:
        sys.exit(f"serving.publish: {exc}")
