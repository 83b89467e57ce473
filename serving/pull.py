"""Download a published model repository into a local folder, every file checked against PUBLISHED.json.

    python -m serving.pull --url s3://host:port/bucket/prefix --to /models/repository [--wait 300]

What `make publish` uploaded (serving.publish) is read back only once the prefix holds PUBLISHED.json, the
manifest a publish writes last; every object it lists must have its size and sha256. While a publish is in
progress (no manifest, or the manifest changed while the objects were read) it waits and tries again, up to
--wait seconds; an object that differs from an unchanged manifest (changed after publication) is refused at
once. The files go into a staging folder beside --to and are renamed into place whole, so --to is either
absent, the previous pull, or this one, never a part. The Kubernetes Deployment runs it as its
initContainer (deploy/k8s/base/deployment.yaml), so tritonserver serves a complete local copy.

Standard library only (it runs in the server images, deploy/images/, which have no boto3): S3 GETs signed
with AWS Signature Version 4 from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN and
AWS_DEFAULT_REGION (unsigned where no key is set), the URL in Triton's form as for serving.publish.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import hmac
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

from serving.publication import PLACEHOLDER, PUBLISHED, ManifestError, S3Location, read_manifest

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class PullError(RuntimeError):
    """The publication cannot be pulled (refused, or still in progress when the wait ran out)."""


class InProgress(RuntimeError):
    """A publish is running over the prefix: worth trying again."""


def aws_region(env: dict[str, str]) -> str:
    return env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1"


def signed_headers(method: str, url: str, env: dict[str, str], amz_date: str) -> dict[str, str]:
    """The headers of an S3 request signed with AWS Signature Version 4 (empty payload), as botocore signs
    one; only x-amz-content-sha256 where `env` holds no AWS_ACCESS_KEY_ID."""
    parts = urllib.parse.urlsplit(url)
    headers = {"host": parts.netloc, "x-amz-content-sha256": EMPTY_SHA256, "x-amz-date": amz_date}
    if env.get("AWS_SESSION_TOKEN"):
        headers["x-amz-security-token"] = env["AWS_SESSION_TOKEN"]
    if not env.get("AWS_ACCESS_KEY_ID"):
        return {k: v for k, v in headers.items() if k == "x-amz-content-sha256"}
    # the URL comes encoded (object_url): its path and query are canonical as they are, as botocore has it for S3
    canonical_query = "&".join(f"{k}={v}" for k, _, v in sorted(p.partition("=") for p in parts.query.split("&") if p))
    names = sorted(headers)
    canonical = "\n".join([method, parts.path or "/", canonical_query,
                           "".join(f"{n}:{headers[n].strip()}\n" for n in names), ";".join(names), EMPTY_SHA256])
    region = aws_region(env)
    scope = f"{amz_date[:8]}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + env.get("AWS_SECRET_ACCESS_KEY", "")).encode()
    for part in (amz_date[:8], region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={env['AWS_ACCESS_KEY_ID']}/{scope}, "
                                f"SignedHeaders={';'.join(names)}, Signature={signature}")
    return headers


def object_url(location: S3Location, relative: str, env: dict[str, str]) -> str:
    """Path-style on an endpoint of its own (as Triton and MinIO address it), virtual-hosted on AWS."""
    key = urllib.parse.quote(location.key(relative), safe="/-_.~")
    if location.endpoint:
        return f"{location.endpoint}/{location.bucket}/{key}"
    region = aws_region(env)
    return f"https://{location.bucket}.s3.{region}.amazonaws.com/{key}"


def open_object(location: S3Location, relative: str, env: dict[str, str], timeout_s: float = 60.0):
    """The response of a signed GET (a file-like object); None where the object does not exist."""
    url = object_url(location, relative, env)
    amz_date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    headers = {k: v for k, v in signed_headers("GET", url, env, amz_date).items() if k != "host"}
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        if exc.code >= 500:  # the endpoint's trouble, perhaps passing
            raise InProgress(f"GET {location.url}/{relative}: HTTP {exc.code} {exc.reason}") from None
        raise PullError(f"GET {location.url}/{relative}: HTTP {exc.code} {exc.reason}") from None
    except OSError as exc:
        raise InProgress(f"GET {location.url}/{relative}: {exc}") from None


def read_published(location: S3Location, env: dict[str, str]) -> bytes:
    answer = open_object(location, PUBLISHED, env)
    if answer is None:
        raise InProgress(f"{location.url} holds no {PUBLISHED}: a publish is in progress there, or none completed")
    with answer:
        return answer.read()


def download(location: S3Location, relative: str, target: Path, env: dict[str, str]) -> tuple[int, str] | None:
    """Write one object to `target`; its (size, sha256), None where it is missing."""
    answer = open_object(location, relative, env)
    if answer is None:
        return None
    digest, size = hashlib.sha256(), 0
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with answer, open(target, "wb") as out:
            for block in iter(lambda: answer.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
                out.write(block)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise InProgress(f"GET {location.url}/{relative}: {exc}") from None
    return size, digest.hexdigest()


def pull_once(location: S3Location, staging: Path, env: dict[str, str]) -> int:
    """One complete, checked copy of the publication into `staging`; the number of objects. InProgress where a
    publish runs meanwhile, PullError where an object differs from a manifest that did not change."""
    body = read_published(location, env)
    try:
        objects = read_manifest(body, location.url)
    except ManifestError as exc:
        raise PullError(str(exc)) from None
    wrong = []
    for relative, expected in objects.items():
        if relative.endswith(f"/{PLACEHOLDER}") and expected == (0, EMPTY_SHA256):
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)  # an empty folder, as built
            continue
        found = download(location, relative, staging / relative, env)
        if found != expected:
            wrong.append(f"{relative} ({'missing' if found is None else f'{found[0]} bytes, sha256 {found[1][:12]}'}; "
                         f"{PUBLISHED} says {expected[0]} bytes, sha256 {expected[1][:12]})")
    if wrong:
        if read_published(location, env) != body:
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


def pull(location: S3Location, dest: Path, wait_s: float, interval_s: float = 10.0, env: dict[str, str] | None = None,
         sleep: Callable[[float], None] = time.sleep) -> dict:
    """Pull the publication at `location` into `dest`, trying again every `interval_s` for `wait_s` while a
    publish is in progress there. Raises PullError with the reason."""
    env = dict(os.environ) if env is None else env
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
            count = pull_once(location, staging, env)
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
    p.add_argument("--url", required=True, help="what make publish printed: s3://bucket/prefix, "
                                                "s3://host:port/bucket/prefix or s3://https://host:port/bucket/prefix")
    p.add_argument("--to", type=Path, required=True,
                   help="the folder to write, replaced whole by a rename: not a mount point (a volume's subfolder)")
    p.add_argument("--wait", type=float, default=300.0,
                   help="seconds to keep trying while a publish is in progress there (default: %(default)s)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between tries (default: %(default)s)")
    return p


def main(args: argparse.Namespace) -> None:
    done = pull(S3Location.parse(args.url), args.to, args.wait, args.interval)
    print(f"pulled {done['objects']} objects of {done['url']} into {done['to']} (checked against {PUBLISHED})")


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (PullError, ValueError, OSError) as exc:
        sys.exit(f"serving.pull: {exc}")
