"""What serving.publish writes to S3 and serving.pull reads back: the URL form, the placeholder of an empty
folder, and PUBLISHED.json, the manifest a publish writes last.

    s3://[http(s)://host:port/]bucket/prefix     Triton's form, the one make publish prints
    published-s3://[host:port/]bucket/prefix     the same location as a KServe storageUri: the scheme that
                                                 deploy/kserve/storage-container claims for serving.pull

    PUBLISHED.json  {"format": 1, "url": ..., "source": ..., "published_at": ...,
                     "objects": {"<key under the prefix>": {"size": <bytes>, "sha256": "<hex>"}, ...}}

A prefix holding PUBLISHED.json holds a complete publication: a publish deletes it before it changes
anything and writes it after every object (BUILD.json included), so a reader that finds it and finds every
object it lists with that size and sha256 has read one whole publication, never a mix of two.
boto3 is imported only where a client is made (s3_client), so the URL and manifest parts load without it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

PUBLISHED = "PUBLISHED.json"
PLACEHOLDER = ".placeholder"  # an empty folder's object (S3 has no empty folders)
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()  # a placeholder's, as PUBLISHED.json lists it
FORMAT = 1
STORAGE_URI_SCHEME = "published-s3://"  # KServe's default storage initializer claims s3://, so ours is its own


class ManifestError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # no leading or trailing slash; may be ""
    endpoint: str | None  # http://host:port or https://host:port, or None for AWS

    @classmethod
    def parse(cls, url: str) -> "S3Location":
        if url.startswith(STORAGE_URI_SCHEME):  # a KServe storageUri naming the same location
            url = "s3://" + url[len(STORAGE_URI_SCHEME):]
        if not url.startswith("s3://"):
            raise ValueError(f"{url!r} is not an s3:// URL (s3://bucket/prefix or s3://host:port/bucket/prefix)")
        rest = url[len("s3://"):]
        scheme = next((s for s in ("http", "https") if rest.startswith(f"{s}://")), None)
        parts = [p for p in rest.removeprefix(f"{scheme}://").split("/") if p]
        endpoint = None
        if scheme or (parts and ":" in parts[0]):  # [http(s)://]host:port first, as Triton reads it
            host, _, port = parts[0].rpartition(":") if parts else ("", "", "")
            if not host or not port.isdigit():
                raise ValueError(f"{url!r}: {parts[0] if parts else ''!r} is not host:port")
            endpoint = f"{scheme or 'http'}://{parts.pop(0)}"
        if not parts:
            raise ValueError(f"{url!r} names no bucket")
        return cls(parts[0], "/".join(parts[1:]), endpoint)

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    @property
    def url(self) -> str:
        """The URL to give tritonserver --model-repository (Triton's `s3://https://host:port/...` for TLS)."""
        host = self.endpoint.removeprefix("http://") + "/" if self.endpoint else ""
        return f"s3://{host}{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")


def manifest(url: str, source: str, published_at: str, objects: dict[str, tuple[int, str]]) -> bytes:
    """PUBLISHED.json's bytes: `objects` maps each key relative to the prefix to (size, sha256)."""
    listed = {name: {"size": size, "sha256": digest} for name, (size, digest) in sorted(objects.items())}
    return json.dumps({"format": FORMAT, "url": url, "source": source, "published_at": published_at,
                       "objects": listed}, indent=1).encode()


def read_manifest(body: bytes, url: str) -> dict[str, tuple[int, str]]:
    """The objects PUBLISHED.json lists, as (size, sha256) by relative key; ManifestError naming what is wrong
    (not JSON, another format, a key that would leave the folder it is pulled into)."""
    try:
        found = json.loads(body)
        if found.get("format") != FORMAT:
            raise ManifestError(f"{url}/{PUBLISHED} has format {found.get('format')!r}; this reader knows {FORMAT}")
        objects = {name: (int(o["size"]), str(o["sha256"])) for name, o in found["objects"].items()}
    except (ValueError, AttributeError, KeyError, TypeError) as exc:
        if isinstance(exc, ManifestError):
            raise
        raise ManifestError(f"{url}/{PUBLISHED} is not a publication manifest ({exc})") from None
    for name in objects:
        parts = name.split("/")
        if name.startswith("/") or any(p in ("", ".", "..") for p in parts) or name == PUBLISHED:
            raise ManifestError(f"{url}/{PUBLISHED} lists {name!r}, which is not a path inside the repository")
    return objects


def s3_client(location: S3Location):
    """A boto3 S3 client for `location`'s endpoint (AWS where it names none); credentials from boto3's chain."""
    import boto3

    return boto3.client("s3", endpoint_url=location.endpoint)
