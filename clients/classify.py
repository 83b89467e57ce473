"""Classify image files with a running Triton server.

    python -m clients.classify cat.jpg dog.png --protocol grpc --top-k 5
    python -m clients.classify photos/*.jpg --batch          # requests of up to max_batch_size images
    python -m clients.classify photos/*.jpg --async          # one request per image, concurrently
    python -m clients.classify cat.jpg --url http://127.0.0.1:8200

Without --url: the server `make serve` started (its ports are in .run/tritonserver.json) while it
runs, else Triton's defaults (127.0.0.1:8000 HTTP, :8001 gRPC). Prints label and probability per
image; exits non-zero if any image failed, naming it. A wrong or missing server is one line that says
what answers at the URL and what to use instead. `make serve`'s server restricts model configuration:
--batch reads max_batch_size with the admin key it wrote (.run/admin.key), sent to that server only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from pathlib import Path

from clients.client import (DEFAULT_MODEL, DEFAULT_URLS, PROTOCOLS, AsyncImageClassifierClient, ClassificationError,
                            ImageClassifierClient, Prediction, ServerUnavailable)
from clients.endpoint import split_url
from serving.access import read_key
from serving.health import number
from serving.server import served

READ_STATUS = {FileNotFoundError: "NOT_FOUND", PermissionError: "PERMISSION_DENIED"}  # else INVALID_ARGUMENT


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Classify images with the Triton image_classifier ensemble.")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, BMP, GIF, TIFF)")
    p.add_argument("--url", default=None,
                   help="[http:// | grpc://]host:port (default: the server `make serve` started, while it runs; "
                        "else %s)" % DEFAULT_URLS)
    p.add_argument("--protocol", default=None, choices=PROTOCOLS, help="(default: the --url scheme's, else http)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="(default: %(default)s)")
    p.add_argument("--top-k", type=number(int, 1), default=5, help="(default: %(default)s)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--batch", action="store_true",
                      help="send the images in as few requests as the model's max_batch_size allows")
    mode.add_argument("--async", dest="use_async", action="store_true",
                      help="one request per image, sent concurrently with asyncio")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    return p


Outcome = list[Prediction] | ClassificationError
Outcomes = list[tuple[str, Outcome]]  # one per argument, in order: a path given twice is classified twice


def server_url(url: str | None, protocol: str | None, running: dict | None) -> tuple[str, str]:
    """(protocol, host:port): --url, else the server `make serve` started (`running`), else Triton's default."""
    if url:
        return split_url(url, protocol)
    protocol = protocol or "http"
    return split_url((running or DEFAULT_URLS)[protocol], protocol)


def read_images(paths: list[str]) -> list[tuple[str, bytes | ClassificationError]]:
    """(path, bytes) per argument; a file that cannot be read is that image's failure, not the run's."""
    images = []
    for name in paths:
        try:
            images.append((name, Path(name).read_bytes()))
        except OSError as exc:
            status = READ_STATUS.get(type(exc), "INVALID_ARGUMENT")
            images.append((name, ClassificationError(f"cannot read the file: {exc.strerror or exc}", status)))
    return images


def classify_files(args: argparse.Namespace) -> Outcomes:
    images = read_images(args.images)
    readable = [data for _, data in images if isinstance(data, bytes)]
    results = iter(_classify(args, readable) if readable else [])
    return [(name, next(results) if isinstance(data, bytes) else data) for name, data in images]


def _classify(args: argparse.Namespace, images: list[bytes]) -> list[Outcome]:
    """One outcome per image, in order, as the chosen mode (one by one, --batch or --async) sends them.
    ServerUnavailable is no image's fault: it is raised, once."""
    if args.use_async:
        return asyncio.run(_classify_async(args, images))
    admin_key = getattr(args, "admin_key", None)
    with ImageClassifierClient(args.url, args.protocol, args.model, admin_key=admin_key) as client:
        if args.batch:
            return _batched(client, images, args.top_k)
        return [outcome for image in images for outcome in _requested(client, [image], args.top_k)]


def _requested(client: ImageClassifierClient, images: list[bytes], top_k: int) -> list[Outcome]:
    """One request: its answers, or its error blamed on the images the server names."""
    try:
        return client.classify(images, top_k)
    except ServerUnavailable:
        raise
    except ClassificationError as exc:
        return _blame(len(images), exc)


def _batched(client: ImageClassifierClient, images: list[bytes], top_k: int) -> list[Outcome]:
    """Requests of at most the served model's max_batch_size images each."""
    size = max(1, client.max_batch_size())
    return [outcome for start in range(0, len(images), size)
            for outcome in _requested(client, images[start:start + size], top_k)]


def _blame(count: int, exc: ClassificationError) -> list[Outcome]:
    """A request failed: the server's message names the bad items of a batch ("image 2: ...")."""
    bad = {int(i) for i in re.findall(r"image (\d+):", str(exc))}
    innocent = ClassificationError("not classified: another image in the same request failed", exc.status)
    return [exc if (i in bad or not bad) else innocent for i in range(count)]


async def _classify_async(args: argparse.Namespace, images: list[bytes]) -> list[Outcome]:
    admin_key = getattr(args, "admin_key", None)
    async with AsyncImageClassifierClient(args.url, args.protocol, args.model, admin_key=admin_key) as client:
        async def one(image: bytes) -> Outcome:
            try:
                return (await client.classify([image], args.top_k))[0]
            except ClassificationError as exc:
                return exc

        outcomes = list(await asyncio.gather(*(one(image) for image in images)))
    unavailable = next((o for o in outcomes if isinstance(o, ServerUnavailable)), None)
    if unavailable is not None:
        raise unavailable
    return outcomes


def report(outcomes: Outcomes, as_json: bool) -> int:
    failures = 0
    for name, outcome in outcomes:
        if isinstance(outcome, ClassificationError):
            failures += 1
            if as_json:
                print(json.dumps({"image": name, "error": str(outcome), "status": outcome.status}))
            else:
                print(f"{name}: ERROR ({outcome.status}): {outcome}", file=sys.stderr)
            continue
        if as_json:
            print(json.dumps({"image": name, "top": [vars(p) for p in outcome]}))
        else:
            print(name)
            for p in outcome:
                print(f"  {p.score:7.2%}  {p.index:5d}  {p.label}")
    return failures


def admin_key_for(url: str, running: dict | None) -> str | None:
    """`make serve`'s admin key when `url` is that server's; no other server is sent it."""
    return read_key() if running and url in (running["http"], running["grpc"]) else None


def _served_hint(running: dict | None, url: str) -> str:
    """Where the server `make serve` started answers, when the request went elsewhere."""
    if not running or url in (running["http"], running["grpc"]):
        return ""
    return f" (the server `make serve` started: HTTP {running['http']}, gRPC {running['grpc']})"


def main(args: argparse.Namespace) -> int:
    running = served()
    args.protocol, args.url = server_url(args.url, args.protocol, running)
    args.admin_key = admin_key_for(args.url, running)
    try:
        return report(classify_files(args), args.json)
    except ServerUnavailable as exc:
        raise ServerUnavailable(f"{exc}{_served_hint(running, args.url)}") from None


if __name__ == "__main__":
    try:
        failed = main(get_args_parser().parse_args())
    except (OSError, ClassificationError, ValueError) as exc:
        sys.exit(f"clients.classify: {exc}")
    sys.exit(1 if failed else 0)
