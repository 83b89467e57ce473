"""Classify image files with a running Triton server.

    python -m clients.classify cat.jpg dog.png --protocol grpc --top-k 5
    python -m clients.classify photos/*.jpg --batch          # requests of up to max_batch_size images
    python -m clients.classify photos/*.jpg --async          # one request per image, up to --concurrency at once
    python -m clients.classify cat.jpg --url http://127.0.0.1:8200
    python -m clients.classify cat.jpg --url grpcs://triton.example:8001 --tls-ca ca.pem   # TLS (--tls-cert/-key: mTLS)

Without --url: the server `make serve` started (its ports are in .run/tritonserver.json: the current
folder's, else the checkout's; $TRITON_RUN_DIR names another) while it runs, else Triton's defaults
(127.0.0.1:8000 HTTP, :8001 gRPC). Prints label and probability per
image as the answers come, in argument order; exits non-zero if any image failed, naming it. A file
that is not a regular file or is over --max-image-bytes (default: the contract's max_image_bytes; a
deployment spec that raised `limits.max_image_bytes` wants it raised too) fails alone, unread; files are
read one request at a time. A --batch request that fails because of the images the server's message names
is sent once more without them. A busy answer (the server's bounded queue is full) is retried a few times.
A wrong or missing server is one line that says what answers at the URL and what to use instead, and so
is a model the server does not serve (--model); a server that goes away mid-run leaves the answers
already printed and fails the rest. Output piped into a reader that stops early (`| head -1`) ends the
run quietly, exit 141 (128 + SIGPIPE, as a shell reports for other commands). `make serve`'s
server restricts model configuration: --batch reads max_batch_size with an admin key (--admin-key-file,
$TRITON_ADMIN_KEY, else the one `make serve` wrote, sent to that server only), and without one sends
requests of the deployment spec's default max_batch_size. A server started with `make serve INFERENCE_KEY=1`
takes classifications only with its inference key (--inference-key-file, else the one `make serve` wrote,
sent to that server only, else $TRITON_INFERENCE_KEY). TLS: an https:// or grpcs:// URL, --tls, or any
of --tls-ca (the CA to verify the server against; else the system's), --tls-cert and --tls-key (a client
certificate); the server's certificate is always verified. A file that cannot be read, a certificate that does
not verify, a client certificate asked for or refused, and TLS on one side only are each one line, exit 1.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from clients.client import (DEFAULT_MODEL, DEFAULT_URLS, PROTOCOLS, AsyncImageClassifierClient, ClassificationError,
                            ImageClassifierClient, Prediction, ServerBusy, ServerUnavailable, UnknownModel)
from clients.endpoint import split_url
from clients.tls import TLS, tls_for
from common.contract import MAX_BATCH_SIZE, ImageLimits
from serving.access import INFERENCE_KEY_ENV, KEY_ENV, read_key
from serving.health import number
from serving.server import inference_key_for, is_served, recorded_for, servers_found

READ_STATUS = {FileNotFoundError: "NOT_FOUND", PermissionError: "PERMISSION_DENIED"}  # else INVALID_ARGUMENT
BUSY_RETRIES = 5  # a busy answer is retried this many times, about 0.1 s, 0.2 s, 0.4 s ... apart
DEFAULT_CONCURRENCY = 8  # --async requests in flight: well below the committed spec's derived queues
RUN_ERRORS = (ServerUnavailable, UnknownModel)  # every image would fail alike: the run stops at the first
SIGPIPE_EXIT = 128 + signal.SIGPIPE  # what a shell reports for a command whose reader went away (`yes | head -1`)
FILE_KINDS = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device",
              stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Classify images with the Triton image_classifier ensemble.")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, BMP, GIF, TIFF)")
    p.add_argument("--url", default=None,
                   help="[http:// | https:// | grpc:// | grpcs://]host:port (default: the server `make serve` "
                        "started, while it runs; else %s; the TLS schemes: port 443)" % DEFAULT_URLS)
    p.add_argument("--protocol", default=None, choices=PROTOCOLS, help="(default: the --url scheme's, else http)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="(default: %(default)s)")
    p.add_argument("--top-k", type=number(int, 1), default=5, help="(default: %(default)s)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--batch", action="store_true",
                      help="send the images in as few requests as the model's max_batch_size allows")
    mode.add_argument("--async", dest="use_async", action="store_true",
                      help="one request per image, sent concurrently with asyncio")
    p.add_argument("--concurrency", type=number(int, 1), default=DEFAULT_CONCURRENCY,
                   help="--async: requests in flight at once (default: %(default)s)")
    p.add_argument("--admin-key-file", default=None,
                   help=f"file holding the server's admin key, for --batch to read max_batch_size (default: "
                        f"${KEY_ENV}, else the key `make serve` wrote, for its server)")
    p.add_argument("--inference-key-file", default=None,
                   help=f"file holding the server's inference key, if it restricts inference (default: "
                        f"the key `make serve INFERENCE_KEY=1` wrote, for its server, else ${INFERENCE_KEY_ENV})")
    p.add_argument("--max-image-bytes", type=number(int, 1), default=ImageLimits.max_image_bytes,
                   help="larger files fail here, unsent: the served deployment spec's limits.max_image_bytes "
                        "(default: %(default)s, the built-in limit)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    tls = p.add_argument_group("TLS (the server's certificate is always verified)")
    tls.add_argument("--tls", action="store_true", help="speak TLS (as an https:// or grpcs:// URL does)")
    tls.add_argument("--tls-ca", metavar="FILE", default=None,
                     help="PEM CA certificates to verify the server against (default: the system's)")
    tls.add_argument("--tls-cert", metavar="FILE", default=None, help="PEM client certificate, for mutual TLS")
    tls.add_argument("--tls-key", metavar="FILE", default=None, help="the client certificate's PEM private key")
    return p


Outcome = list[Prediction] | ClassificationError
Emit = Callable[[str, Outcome], None]  # called once per argument, in order: a path given twice is classified twice


def server_url(url: str | None, protocol: str | None, running: dict | None) -> tuple[str, str]:
    """(protocol, host:port): --url, else the server `make serve` started (`running`), else Triton's default."""
    if url:
        return split_url(url, protocol)
    protocol = protocol or "http"
    return split_url((running or DEFAULT_URLS)[protocol], protocol)


def tls_settings(args: argparse.Namespace) -> TLS | None:
    """The TLS that --url's scheme, --tls and the --tls-* files ask for (any of them turns it on); None: plain."""
    files = (args.tls_ca, args.tls_cert, args.tls_key)
    return tls_for(args.url, TLS(*files) if args.tls or any(files) else None)


def read_image(name: str, limit: int = ImageLimits.max_image_bytes) -> bytes | ClassificationError:
    """The file's bytes; a file that cannot be read, is not a regular file (a FIFO, /dev/zero) or holds more
    than `limit` bytes (the server would refuse it) is that image's failure, not the run's, and is not read."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens without waiting for a writer
    except OSError as exc:
        status = READ_STATUS.get(type(exc), "INVALID_ARGUMENT")
        return ClassificationError(f"cannot read the file: {exc.strerror or exc}", status)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((k for test, k in FILE_KINDS.items() if test(mode)), "not a file")
            return ClassificationError(f"not a regular file ({kind})", "INVALID_ARGUMENT")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        return ClassificationError(f"over the image size limit of {limit} bytes (--max-image-bytes)",
                                   "INVALID_ARGUMENT")
    return data


def classify_files(args: argparse.Namespace, emit: Emit) -> None:
    """Each argument's outcome, in order, as the chosen mode (one by one, --batch or --async) gets it. Once
    no server answers (ServerUnavailable) or the server has no such model (UnknownModel), the remaining images
    each fail with that error, unsent."""
    if args.use_async:
        asyncio.run(_classify_async(args, emit))
        return
    admin_key, tls = getattr(args, "admin_key", None), getattr(args, "tls_settings", None)
    with ImageClassifierClient(args.url, args.protocol, args.model, admin_key=admin_key, tls=tls,
                               inference_key=getattr(args, "inference_key", None)) as client:
        if args.batch:
            _emit_until_gone(args.images, _batched(client, args.images, args.top_k, args.max_image_bytes), emit)
        else:
            _emit_until_gone(args.images, _one_by_one(client, args.images, args.top_k, args.max_image_bytes), emit)


def _emit_until_gone(names: list[str], outcomes: Iterable[Outcome], emit: Emit) -> None:
    """Emits `outcomes`; once they raise one of RUN_ERRORS, that error for each name left."""
    done = 0
    try:
        for outcome in outcomes:
            emit(names[done], outcome)
            done += 1
    except RUN_ERRORS as gone:
        for name in names[done:]:
            emit(name, gone)


def _one_by_one(client: ImageClassifierClient, names: list[str], top_k: int, limit: int) -> Iterator[Outcome]:
    for name in names:
        image = read_image(name, limit)
        yield image if isinstance(image, ClassificationError) else _requested(client, [image], top_k)[0]


def _backoff(attempt: int) -> float:
    """Seconds before retry `attempt` (0, 1, ...) of a busy answer: doubling, jittered so retries spread out."""
    return 0.1 * 2 ** attempt * random.uniform(0.5, 1.5)


def _requested(client: ImageClassifierClient, images: list[bytes], top_k: int) -> list[Outcome]:
    """One request (a busy answer retried): its answers, or its error blamed on the images the server names."""
    for attempt in range(BUSY_RETRIES + 1):
        try:
            return client.classify(images, top_k)
        except RUN_ERRORS:
            raise
        except ServerBusy as exc:
            if attempt == BUSY_RETRIES:
                return _blame(len(images), exc)
            time.sleep(_backoff(attempt))
        except ClassificationError as exc:
            return _blame(len(images), exc)


def _requested_apart(client: ImageClassifierClient, images: list[bytes], top_k: int) -> list[Outcome]:
    """A request that failed because of the items its message names is sent once more without them, so that one
    bad image fails alone and not the good ones of its request; a message that names none (which failed cannot be
    told) leaves every image failed."""
    answers = _requested(client, images, top_k)
    bad = set().union(*map(_named, answers)) & set(range(len(images)))
    rest = [i for i in range(len(images)) if i not in bad]
    if not bad or not rest:
        return answers
    for i, answer in zip(rest, _requested(client, [images[i] for i in rest], top_k)):
        answers[i] = answer
    return answers


def batch_size(client: ImageClassifierClient) -> int:
    """The served model's max_batch_size; the deployment spec's default when the server restricts its config
    and no admin key was given."""
    try:
        return max(1, client.max_batch_size())
    except ClassificationError as exc:
        if exc.status != "PERMISSION_DENIED":
            raise
    return MAX_BATCH_SIZE


def _batched(client: ImageClassifierClient, names: list[str], top_k: int, limit: int) -> Iterator[Outcome]:
    """Requests of at most max_batch_size images each, read a request at a time; a server that says its limit
    is lower ("batch-size must be <= N") gets the rest in requests of N."""
    size, start = batch_size(client), 0
    while start < len(names):
        chunk = [read_image(name, limit) for name in names[start:start + size]]
        readable = [data for data in chunk if isinstance(data, bytes)]
        answers = _requested_apart(client, readable, top_k) if readable else []
        refused = answers and isinstance(answers[0], ClassificationError)
        lower = re.search(r"batch-size must be <= (\d+)", str(answers[0])) if refused else None
        if lower and 0 < int(lower[1]) < size:
            size = int(lower[1])
            continue
        answers = iter(answers)
        yield from (next(answers) if isinstance(data, bytes) else data for data in chunk)
        start += len(chunk)


def _named(outcome: Outcome) -> set[int]:
    """The items of a failed request that the server's message names as bad ("image 2: ..."), by their place in it."""
    if not isinstance(outcome, ClassificationError):
        return set()
    return {int(i) for i in re.findall(r"image (\d+):", str(outcome))}


def _blame(count: int, exc: ClassificationError) -> list[Outcome]:
    """A request failed: the server's message names the bad items of a batch ("image 2: ...")."""
    bad = _named(exc)
    innocent = ClassificationError("not classified: another image in the same request failed", exc.status)
    return [exc if (i in bad or not bad) else innocent for i in range(count)]


class Window:
    """At most `size` requests in flight; each busy answer takes one place away for good (down to one), since
    the server's queue holds fewer than that: the retries then find room."""

    def __init__(self, size: int):
        self.size, self.withheld, self._slots = size, 0, asyncio.Semaphore(size)

    def shrink(self) -> None:
        if self.size > 1:
            self.size, self.withheld = self.size - 1, self.withheld + 1

    async def __aenter__(self) -> None:
        await self._slots.acquire()

    async def __aexit__(self, *exc) -> None:
        if self.withheld:
            self.withheld -= 1
        else:
            self._slots.release()


async def _classify_async(args: argparse.Namespace, emit: Emit) -> None:
    """One request per image, at most args.concurrency in flight (fewer after busy answers, which are
    retried); outcomes emitted in argument order as they complete."""
    admin_key, tls = getattr(args, "admin_key", None), getattr(args, "tls_settings", None)
    async with AsyncImageClassifierClient(args.url, args.protocol, args.model, admin_key=admin_key, tls=tls,
                                          inference_key=getattr(args, "inference_key", None)) as client:
        window = Window(args.concurrency)

        async def one(name: str) -> Outcome:
            async with window:
                image = read_image(name, args.max_image_bytes)
                if isinstance(image, ClassificationError):
                    return image
                for attempt in range(BUSY_RETRIES + 1):
                    try:
                        return (await client.classify([image], args.top_k))[0]
                    except ServerBusy as exc:
                        if attempt == BUSY_RETRIES:
                            return exc
                        window.shrink()
                        await asyncio.sleep(_backoff(attempt))
                    except ClassificationError as exc:  # RUN_ERRORS too: the caller stops at them
                        return exc

        tasks = [asyncio.create_task(one(name)) for name in args.images]
        try:
            for i, (name, task) in enumerate(zip(args.images, tasks)):
                outcome = await task
                emit(name, outcome)
                if isinstance(outcome, RUN_ERRORS):
                    for later in tasks[i + 1:]:
                        later.cancel()
                    for later_name in args.images[i + 1:]:
                        emit(later_name, outcome)
                    return
        finally:
            for task in tasks:
                task.cancel()


class Report:
    """Prints each outcome as it comes and counts the failures. A server gone (or without the model) before
    anything was printed is raised instead: the run's one line, not one per image."""

    def __init__(self, as_json: bool):
        self.as_json, self.printed, self.failures = as_json, 0, 0

    def __call__(self, name: str, outcome: Outcome) -> None:
        if isinstance(outcome, RUN_ERRORS) and not self.printed:
            raise outcome
        self.printed += 1
        if isinstance(outcome, ClassificationError):
            self.failures += 1
            if self.as_json:
                print(json.dumps({"image": name, "error": str(outcome), "status": outcome.status}), flush=True)
            else:
                print(f"{name}: ERROR ({outcome.status}): {outcome}", file=sys.stderr, flush=True)
            return
        if self.as_json:
            print(json.dumps({"image": name, "top": [vars(p) for p in outcome]}), flush=True)
        else:
            print(name)
            for p in outcome:
                print(f"  {p.score:7.2%}  {p.index:5d}  {p.label}")
            sys.stdout.flush()


def admin_key_for(url: str, found: list[dict], key_file: str | None = None) -> str | None:
    """--admin-key-file's key, else $TRITON_ADMIN_KEY, else the key `make serve` wrote beside the state of the
    server `url` reaches (`found`: serving.server.servers_found()); no other server is sent one."""
    if key_file:
        return given_key(key_file, "--admin-key-file", "admin")
    recorded = recorded_for(url, found)
    return os.environ.get(KEY_ENV) or (read_key(Path(recorded["admin_key_file"])) if recorded else None)


def given_key(key_file: str, option: str, kind: str) -> str:
    """The key in the file `option` names; a file without one is refused at once."""
    key = read_key(Path(key_file))
    if key is None:
        raise ValueError(f"{option} {key_file}: no {kind} key there")
    return key


def _served_hint(running: dict | None, url: str) -> str:
    """Where the server `make serve` started answers, when the request went elsewhere."""
    if not running or is_served(url, running):
        return ""
    return f" (the server `make serve` started: HTTP {running['http']}, gRPC {running['grpc']})"


def main(args: argparse.Namespace) -> int:
    found = servers_found()
    running = found[0] if found else None
    args.tls_settings = tls_settings(args)  # before server_url drops the URL's scheme
    args.protocol, args.url = server_url(args.url, args.protocol, running)
    args.admin_key = admin_key_for(args.url, found, args.admin_key_file)
    if args.inference_key_file:
        args.inference_key = given_key(args.inference_key_file, "--inference-key-file", "inference")
    else:
        args.inference_key = inference_key_for(args.url, found)
    report = Report(args.json)
    try:
        classify_files(args, report)
    except RUN_ERRORS as exc:
        raise type(exc)(f"{exc}{_served_hint(running, args.url)}") from None
    return report.failures


def stdout_closed() -> int:
    """The reader of the output went away (`... | head -1`): nothing more to say, and nothing to say it to. Output
    still buffered goes to /dev/null, or its flush at exit would print 'Exception ignored ... BrokenPipeError'
    (what the Python docs recommend, for SIGPIPE)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return SIGPIPE_EXIT


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # else gRPC logs a failed TLS handshake itself: a second line
    try:
        failed = main(get_args_parser().parse_args())
    except BrokenPipeError:
        sys.exit(stdout_closed())
    except (OSError, ClassificationError, ValueError) as exc:
        sys.exit(f"clients.classify: {exc}")
    sys.exit(1 if failed else 0)
