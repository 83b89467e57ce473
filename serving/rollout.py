"""Versioned classifiers, rolled out live on a running server (explicit model control).

    python -m serving.rollout status
    python -m serving.rollout add --artifacts artifacts/mine [--model-file F] [--held-out DIR]   (make rollout)
    python -m serving.rollout rollback                                                          (make rollback)
    python -m serving.rollout ab start --artifacts artifacts/mine [--model-file F]              (make ab)
    python -m serving.rollout ab run [--split 0.2] [--duration 30]
    python -m serving.rollout ab stop | ab promote

`add` gates the candidate against the version in service on held-out images (the build's gate:
agreement with it on decided images, or with labels true top-1 at most --max-accuracy-drop below
it; the build's --held-out folder, recorded in BUILD.json, unless --held-out is given), writes it as
the classifier's next version folder with a quality reference from the same images, loads the
classifier (Triton loads the new version, then retires the old one: requests in flight finish on it),
waits until it is ready and checks it through the ensemble on the bundled photos; it rolls back by
itself when any of that fails.
`rollback` moves the version in service aside (`<classifier>/_retired/<n>`) and loads the classifier
again, which brings the previous version back. The ensemble is never reloaded and each switch keeps
one version of the classifier in the policy, the pattern that dropped no request in the tests; see
docs/operations.md for why not two versions of one python model side by side.
A/B: `ab start` serves the candidate beside the version in service as its own models
(`<classifier>_candidate`, version n+1, and `<ensemble>_candidate`), `ab run` sends held-out images
with a traffic split and reports each arm's answers and latency apart, `ab promote` rolls the
candidate out and `ab stop` unloads it. Every model-control call sends the admin key
(serving.access). The history is kept in the repository's ROLLOUT.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from build.precision import validate
from build.precision.imagesets import held_out_set
from build.repository import configs, quality
from build.repository.writer import MARKER, copy_model, model_shape, read_labels, weight_files
from common.contract import LABELS_TXT, MODEL_ONNX, PREPROCESS_JSON
from common.files import write_whole
from common.onnxfiles import model_sha256
from common.preprocessing import PreprocessConfig
from serving.access import KEY_FILE, admin_headers
from serving.health import number, positive
from serving.triton_admin import AdminError, LockTimeout, TritonAdmin, control_lock

STATE = "ROLLOUT.json"
RETIRED = "_retired"
CANDIDATE = "_candidate"


class RolloutError(RuntimeError):
    pass


# ---- the served repository -------------------------------------------------------------------------

@dataclasses.dataclass
class Repository:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path) -> "Repository":
        path = Path(path)
        try:
            manifest = json.loads((path / MARKER).read_text())
        except (OSError, ValueError) as exc:
            raise RolloutError(f"{path} is not a repository written by build.engines ({MARKER}: {exc})") from exc
        if manifest.get("pipeline") != "ensemble":
            raise RolloutError(f"{path} serves the {manifest.get('pipeline')} pipeline; rollout works on the ensemble")
        return cls(path, manifest)

    @property
    def classifier(self) -> str:
        return self.manifest["spec"]["classifier_name"]

    @property
    def ensemble(self) -> str:
        return self.manifest["spec"]["ensemble_name"]

    @property
    def preprocess(self) -> str:
        return self.manifest["spec"]["preprocess_name"]

    @property
    def model_filename(self) -> str:
        return configs.CLASSIFIER_BACKENDS[self.manifest["backend"]][2]

    def versions(self, model: str | None = None) -> list[int]:
        folder = self.path / (model or self.classifier)
        return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) if folder.is_dir() else []

    def version_dir(self, version: int, model: str | None = None) -> Path:
        return self.path / (model or self.classifier) / str(version)

    def labels(self) -> list[str]:
        return read_labels(self.path / self.ensemble / configs.LABELS_FILE)

    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig.load(self.version_dir(self.versions(self.preprocess)[-1], self.preprocess) / PREPROCESS_JSON)

    def state(self) -> dict:
        path = self.path / STATE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return {"history": []}
        except (OSError, ValueError) as exc:
            raise RolloutError(f"{path} is unreadable ({exc}): repair it or move it aside "
                               "(it is the rollout history)") from exc
        if not isinstance(state, dict) or not isinstance(state.get("history"), list):
            raise RolloutError(f"{path} holds no history list: repair it or move it aside (it is the rollout history)")
        return state

    def record(self, **entry) -> None:
        """Append `entry` to the history; the file is replaced whole, never left half written."""
        state = self.state()
        state["history"].append({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                                 **entry})
        write_whole(self.path / STATE, json.dumps(state, indent=2) + "\n")


# ---- the server's model-control API ----------------------------------------------------------------

class Server:
    """Model control of the served repository (serving.triton_admin.TritonAdmin, the admin key sent); what the
    server refuses becomes a RolloutError that says what to do. `inference_key`: what the checks' and the A/B
    arms' classifications send, where the server restricts inference (`make serve INFERENCE_KEY=1`)."""

    def __init__(self, http: str, key_file: Path = KEY_FILE, inference_key: str | None = None):
        self.http = http  # host:port, and the admin key for it
        self.key_file = key_file
        self.inference_key = inference_key
        self.admin = TritonAdmin(http, lambda: admin_headers(key_file), timeout=300)

    def _ask(self, call: Callable, *args):
        try:
            return call(*args)
        except AdminError as exc:
            hint = ""
            if exc.status in (401, 403):
                hint = f" (the admin key in {self.key_file} does not match this server's)"
            elif any(word in exc.answer for word in ("explicit", "polling", "not allowed")):
                hint = " (the server must run with --model-control-mode=explicit, as make serve starts it)"
            raise RolloutError(f"{exc}{hint}") from None
        except OSError as exc:
            raise RolloutError(f"no server answers at {self.http} ({exc}): start one (make serve)") from exc

    def ready_versions(self, model: str) -> list[int]:
        return sorted(int(v) for v in self._ask(self.admin.ready_versions).get(model, ()))

    def load(self, model: str) -> None:
        self._ask(self.admin.load, model)

    def unload(self, model: str) -> None:
        self._ask(self.admin.unload, model)

    def wait_serving(self, model: str, version: int, timeout: float = 120) -> None:
        """Until `version` is the one READY version of `model` (the old one has been retired)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready_versions(model) == [version]:
                return
            time.sleep(0.2)
        raise RolloutError(f"{model} version {version} not serving alone after {timeout:.0f} s "
                           f"(ready: {self.ready_versions(model)})")


def served_server(url: str | None) -> tuple[Server, Path | None]:
    """The server to act on (--url, else the one `make serve` started, found from any folder) and its repository
    when known: only `make serve`'s own, so that another server's versions are never moved in the wrong
    repository; the admin key sent is the one recorded beside that server's state, and so is its inference key
    (else $TRITON_INFERENCE_KEY)."""
    from serving.server import find_served, inference_key_for, recorded_for, servers_found

    if url:
        http = url.removeprefix("http://")
        info = recorded_for(http, servers_found())
        if info is None:  # not make serve's: its repository is not known here
            return Server(http, inference_key=inference_key_for(http, [])), None
    else:
        info = find_served()
        if info is None:
            raise RolloutError("no server started by `make serve` is running: start one, or pass --url and "
                               "--repository")
        http = info["http"]
    return Server(http, Path(info["admin_key_file"]), inference_key_for(http, [info])), Path(info["model_repository"])


# ---- the gate ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Candidate:
    model_file: Path
    artifacts: Path


def check_compatible(repo: Repository, candidate: Candidate) -> None:
    """Same labels, input and preprocessing as the served ensemble: only the classifier changes."""
    if candidate.model_file.suffix != ".onnx":
        raise RolloutError(f"{candidate.model_file}: rollout gates ONNX files here (a plan needs TensorRT and a GPU "
                           "to run the gate)")
    if candidate.model_file.name != repo.model_filename and repo.model_filename != MODEL_ONNX:
        raise RolloutError(f"the served classifier ({repo.manifest['backend']}) loads {repo.model_filename}, "
                           f"not {candidate.model_file.name}")
    labels = read_labels(candidate.artifacts / LABELS_TXT)
    if labels != repo.labels():
        raise RolloutError(f"{candidate.artifacts / LABELS_TXT} differs from the served labels "
                           f"({len(labels)} vs {len(repo.labels())} classes): build a new repository (make engines)")
    shape = model_shape(candidate.artifacts, candidate.model_file)
    weight_files(candidate.model_file)  # weights beside the file: copied with it, so they must be where it says
    if list(shape.input_dims) != list(repo.manifest["input_dims"]):
        raise RolloutError(f"the candidate takes {list(shape.input_dims)}, the served classifier "
                           f"{repo.manifest['input_dims']}: build a new repository (make engines)")
    config = PreprocessConfig.load(candidate.artifacts / PREPROCESS_JSON)
    if config != repo.preprocess_config():
        raise RolloutError(f"{candidate.artifacts / PREPROCESS_JSON} differs from the served preprocessing: the "
                           "ensemble shares it, so build a new repository (make engines)")


def check_held_out(held_out: str | None) -> None:
    if held_out and not Path(held_out).is_dir():
        raise RolloutError(f"--held-out {held_out} is not a folder: pass a folder of held-out images (an ImageFolder)")


def build_held_out(repo: Repository, held_out: str | None, log=print) -> str | None:
    """The held-out folder for the gate and the candidate's quality reference: `held_out` when given, else the
    one the repository's build used (BUILD.json), so that every version's reference comes from the same
    images; None (the bundled photos) where the build used those or its folder is gone. Logs which, in one line."""
    if held_out:
        return held_out
    recorded = repo.manifest.get("held_out")
    folder = (recorded or {}).get("folder")
    if recorded is None:
        log(f"held-out images: the bundled photos ({MARKER} records none the build used; --held-out DIR to choose)")
    elif folder is None:
        log("held-out images: the bundled photos, as the build used")
    elif not Path(folder).is_dir():
        log(f"held-out images: the bundled photos, since {folder}, the build's, is gone (--held-out DIR to choose)")
        return None
    elif quality.folder_digest(folder) != recorded.get("files_sha256"):
        log(f"held-out images: {folder}, the build's, whose files have changed since the build")
    else:
        log(f"held-out images: {folder}, as the build used")
    return folder


def gate(repo: Repository, candidate: Candidate, held_out: str | None, thresholds: dict, log=print) -> validate.VariantReport:
    """The candidate against the version in service, on held-out images (build.precision.validate's gate)."""
    serving = repo.versions()[-1]
    in_service = repo.version_dir(serving) / repo.model_filename
    config = repo.preprocess_config()
    images = held_out_set(config, held_out)
    labels = validate.held_out_labels(images, held_out, candidate.artifacts)
    outputs = validate.run_all([validate.onnxruntime_runner(in_service, "in_service"),
                                validate.onnxruntime_runner(candidate.model_file, "candidate")], images, config, 16)
    scores = validate.compare(outputs["in_service"], outputs["candidate"], labels)
    reference = validate.compare(outputs["in_service"], outputs["in_service"], labels)["accuracy"]
    report = validate.VariantReport("candidate", str(candidate.model_file), "fp32", "ONNX Runtime CPU", **scores)
    report = validate.gate(report, {"accuracy_drop": thresholds["accuracy_drop"]}, reference,
                           threshold=thresholds["agreement"])
    log(f"gate: candidate vs version {serving} in service on {images.description}: {validate.gate_summary(report)}"
        + (f" (in service: true top-1 {reference:.2%})" if reference is not None else "")
        + ("  PASS" if report.passed else f"  FAIL: {report.reason}"))
    return report


# ---- the actions ------------------------------------------------------------------------------------

def write_version(repo: Repository, candidate: Candidate, model: str, source: int, version: int,
                  held_out: str | None) -> Path:
    """A copy of version `source`'s folder (the python model and its modules) with the candidate's model
    file and, where the folder has one, a quality reference computed for the candidate."""
    target = repo.version_dir(version, model)
    if target.exists():
        raise RolloutError(f"{target} exists already")
    staging = target.with_name(f".{version}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    served = repo.version_dir(source) / repo.model_filename
    shutil.copytree(repo.version_dir(source), staging, ignore=shutil.ignore_patterns(*weight_files(served)))
    copy_model(candidate.model_file, staging / repo.model_filename, keep={p.name for p in staging.iterdir()})
    if (staging / quality.REFERENCE_JSON).exists():
        quality.write_reference(staging, quality.compute_reference(candidate.model_file, candidate.artifacts, held_out))
    staging.rename(target)
    return target


def smoke_check(server: Server, repo: Repository, candidate: Candidate, ensemble: str) -> str | None:
    """Classify the bundled photos through `ensemble` and compare with the candidate in process: None when
    every top-1 matches, else what differed."""
    from clients.client import ImageClassifierClient
    from common.preprocessing import load_batch
    from common.onnxsession import cpu_session
    from common.samples import sample_photos

    photos = sample_photos()
    names = list(photos)[:4]
    client = ImageClassifierClient(server.http, protocol="http", model=ensemble, inference_key=server.inference_key)
    encoded = [photos[n].read_bytes() for n in names]
    served = [answer[0].index for answer in client.classify(encoded, top_k=1)]
    pixels = load_batch(encoded, repo.preprocess_config())
    expected = cpu_session(candidate.model_file, 1).run(None, {"images": pixels})[-1].argmax(1).tolist()
    return None if served == expected else f"served top-1 {served} != the candidate's in process {expected}"


def add(repo: Repository, server: Server, candidate: Candidate, held_out: str | None, thresholds: dict,
        force: bool = False, log=print) -> int:
    check_compatible(repo, candidate)
    check_held_out(held_out)
    repo.state()  # an unreadable history stops the rollout before anything changes
    held_out = build_held_out(repo, held_out, log)
    versions = repo.versions()
    serving = versions[-1]
    if server.ready_versions(repo.classifier) != [serving]:
        raise RolloutError(f"the server serves {repo.classifier} versions {server.ready_versions(repo.classifier)}, "
                           f"the repository's newest is {serving}: is it serving {repo.path}?")
    report = gate(repo, candidate, held_out, thresholds, log)
    if not report.passed and not force:
        raise RolloutError(f"the candidate failed the gate against version {serving}: {report.reason} "
                           "(--force rolls it out anyway)")
    with control_lock(repo.path):  # the watchdog does not reload the classifier meanwhile
        version = max([*versions, *retired_versions(repo)]) + 1
        write_version(repo, candidate, repo.classifier, serving, version, held_out)
        log(f"wrote {repo.version_dir(version)}; loading {repo.classifier} (version {version} in, {serving} out)")
        started = time.monotonic()
        try:
            server.load(repo.classifier)
            server.wait_serving(repo.classifier, version)
            problem = smoke_check(server, repo, candidate, repo.ensemble)
        except BaseException as exc:  # Ctrl-C too: an unchecked version is never left serving unrecorded
            why = str(exc) or type(exc).__name__
            log(f"version {version} did not come up ({why}): rolling back")
            _rollback(repo, server, log, reason=f"rollout failed: {why}")
            if not isinstance(exc, Exception):
                raise
            raise RolloutError(f"version {version} was rolled back: {exc}") from exc
        if problem:
            log(f"version {version} answers wrongly through {repo.ensemble} ({problem}): rolling back")
            _rollback(repo, server, log, reason=f"smoke check failed: {problem}")
            raise RolloutError(f"version {version} was rolled back: {problem}")
        repo.record(action="rollout", model=repo.classifier, version=version, previous=serving,
                    sha256=model_sha256(candidate.model_file), source=str(candidate.model_file),
                    gate=validate.gate_summary(report), passed=report.passed)
    log(f"{repo.classifier} version {version} serving ({time.monotonic() - started:.1f} s); "
        f"version {serving} kept for `make rollback`")
    return version


def retired_versions(repo: Repository) -> list[int]:
    folder = repo.path / repo.classifier / RETIRED
    return sorted(int(p.name.split(".")[0]) for p in folder.iterdir() if p.name.split(".")[0].isdigit()) \
        if folder.is_dir() else []


def rollback(repo: Repository, server: Server, log=print, reason: str = "") -> int:
    with control_lock(repo.path):  # a watchdog reload of the version moved away here would never finish
        server.ready_versions(repo.classifier)  # no server answering: refused before a file moves
        return _rollback(repo, server, log, reason)


def _rollback(repo: Repository, server: Server, log, reason: str) -> int:
    versions = repo.versions()
    if len(versions) < 2:
        raise RolloutError(f"{repo.classifier} has no earlier version to return to (versions: {versions})")
    current, previous = versions[-1], versions[-2]
    retired = repo.path / repo.classifier / RETIRED
    retired.mkdir(exist_ok=True)
    target = retired / str(current)
    suffix = 1
    while target.exists():
        target, suffix = retired / f"{current}.{suffix}", suffix + 1
    shutil.move(str(repo.version_dir(current)), str(target))
    repo.record(action="rollback", model=repo.classifier, version=previous, retired=current, reason=reason)
    log(f"moved version {current} to {target}; loading {repo.classifier} (version {previous} back)")
    started = time.monotonic()
    try:
        server.load(repo.classifier)
        server.wait_serving(repo.classifier, previous)
    except RolloutError as exc:
        raise RolloutError(f"version {current} is retired and {previous} is the newest on disk, but the server did not "
                           f"load it ({exc}); a server that starts now serves {previous}, `make rollout-status` shows "
                           f"what is served: do not roll back again (that would retire {previous} too)") from exc
    log(f"{repo.classifier} version {previous} serving again ({time.monotonic() - started:.1f} s)")
    return previous


# ---- A/B ---------------------------------------------------------------------------------------------

def candidate_names(repo: Repository) -> tuple[str, str]:
    return repo.classifier + CANDIDATE, repo.ensemble + CANDIDATE


def ab_start(repo: Repository, server: Server, candidate: Candidate, held_out: str | None, log=print) -> int:
    with control_lock(repo.path):
        return _ab_start(repo, server, candidate, held_out, log)


def _ab_start(repo: Repository, server: Server, candidate: Candidate, held_out: str | None, log) -> int:
    check_compatible(repo, candidate)
    check_held_out(held_out)
    repo.state()
    held_out = build_held_out(repo, held_out, log)
    model, ensemble = candidate_names(repo)
    for name in (model, ensemble):
        if (repo.path / name).exists():
            raise RolloutError(f"{repo.path / name} exists: an A/B test is running (ab stop first)")
    loaded = []
    try:
        return _write_and_load_candidate(repo, server, candidate, held_out, loaded, log)
    except BaseException:
        remove_candidate(repo, server, loaded)
        raise


def _write_and_load_candidate(repo: Repository, server: Server, candidate: Candidate, held_out: str | None,
                              loaded: list[str], log) -> int:
    model, ensemble = candidate_names(repo)
    serving = repo.versions()[-1]
    version = max([*repo.versions(), *retired_versions(repo)]) + 1
    (repo.path / model).mkdir()
    config = (repo.path / repo.classifier / "config.pbtxt").read_text()
    (repo.path / model / "config.pbtxt").write_text(config.replace(f'name: "{repo.classifier}"', f'name: "{model}"', 1))
    write_version(repo, candidate, model, serving, version, held_out)
    ens = (repo.path / repo.ensemble / "config.pbtxt").read_text()
    ens = ens.replace(f'name: "{repo.ensemble}"', f'name: "{ensemble}"', 1)
    ens = ens.replace(f'model_name: "{repo.classifier}"', f'model_name: "{model}"')
    (repo.path / ensemble / "1").mkdir(parents=True)
    (repo.path / ensemble / "config.pbtxt").write_text(ens)
    (repo.path / ensemble / "1" / "README").write_text("Ensembles have no model file; this keeps the version folder.\n")
    shutil.copy2(repo.path / repo.ensemble / configs.LABELS_FILE, repo.path / ensemble / configs.LABELS_FILE)
    for name in (model, ensemble):
        server.load(name)
        loaded.append(name)
    repo.record(action="ab-start", model=model, version=version, against=serving,
                sha256=model_sha256(candidate.model_file), source=str(candidate.model_file),
                artifacts=str(candidate.artifacts))
    log(f"A/B: {ensemble} -> {model} version {version} beside {repo.ensemble} -> {repo.classifier} version {serving}")
    return version


def ab_stop(repo: Repository, server: Server, log=print) -> None:
    model, ensemble = candidate_names(repo)
    if not (repo.path / model).exists():
        raise RolloutError("no A/B test is running (no candidate models in the repository)")
    with control_lock(repo.path):
        remove_candidate(repo, server, [model, ensemble])
        repo.record(action="ab-stop", model=model)
    log(f"A/B stopped: {ensemble} and {model} unloaded and removed")


def remove_candidate(repo: Repository, server: Server, loaded: list[str]) -> None:
    """Unload the candidate models in `loaded` (the ensemble first), then remove both candidate folders."""
    for name in reversed(loaded):
        server.unload(name)
    for name in reversed(candidate_names(repo)):
        shutil.rmtree(repo.path / name, ignore_errors=True)


def ab_candidate(repo: Repository) -> Candidate:
    model, _ = candidate_names(repo)
    versions = repo.versions(model)
    if not versions:
        raise RolloutError("no A/B test is running (no candidate models in the repository)")
    entry = next((h for h in reversed(repo.state()["history"]) if h["action"] == "ab-start"), None)
    if entry is None:
        raise RolloutError(f"{STATE} does not record the A/B candidate's source")
    artifacts = entry.get("artifacts") or Path(entry["source"]).parent  # older entries lack it
    return Candidate(repo.version_dir(versions[-1], model) / repo.model_filename, Path(artifacts))


def ab_run(repo: Repository, server: Server, split: float, duration: float, seed: int = 0, log=print) -> dict:
    """Held-out photos, each request to the candidate with probability `split`: each arm's requests,
    failures, latency and answers apart."""
    from clients.client import ClassificationError, ImageClassifierClient
    from common.samples import sample_photos

    _, candidate = candidate_names(repo)
    arms = {name: ImageClassifierClient(server.http, protocol="http", model=name, inference_key=server.inference_key)
            for name in (repo.ensemble, candidate)}
    photos = [p.read_bytes() for p in sample_photos().values()]
    stats = {name: {"requests": 0, "failed": 0, "latency_ms": [], "answers": {}} for name in arms}
    rng = random.Random(seed)
    deadline = time.monotonic() + duration
    i = 0
    while time.monotonic() < deadline:
        name = candidate if rng.random() < split else repo.ensemble
        arm = stats[name]
        started = time.perf_counter()
        try:
            top = arms[name].classify([photos[i % len(photos)]], top_k=1)[0][0]
            arm["answers"][top.label] = arm["answers"].get(top.label, 0) + 1
        except ClassificationError:
            arm["failed"] += 1
        arm["latency_ms"].append(1000 * (time.perf_counter() - started))
        arm["requests"] += 1
        i += 1
    report = {}
    for name, arm in stats.items():
        lat = sorted(arm["latency_ms"])
        report[name] = {"requests": arm["requests"], "failed": arm["failed"],
                        "share": arm["requests"] / max(1, i),
                        "p50_ms": statistics.median(lat) if lat else None,
                        "p99_ms": float(np.percentile(lat, 99)) if lat else None,
                        "answers": dict(sorted(arm["answers"].items(), key=lambda kv: -kv[1]))}
        log(f"{name:28s} {arm['requests']:6d} requests ({report[name]['share']:.0%}), {arm['failed']} failed, "
            + (f"p50 {report[name]['p50_ms']:.1f} ms, p99 {report[name]['p99_ms']:.1f} ms; " if lat else "")
            + "top-1: " + ", ".join(f"{k} {v}" for k, v in list(report[name]["answers"].items())[:4]))
    return report


# ---- CLI ---------------------------------------------------------------------------------------------

def status(repo: Repository, server: Server | None) -> dict:
    model, ensemble = candidate_names(repo)
    info = {"repository": str(repo.path), "classifier": repo.classifier, "versions": repo.versions(),
            "retired": retired_versions(repo), "ab_candidate": repo.versions(model),
            "history": repo.state()["history"][-5:]}
    if server is not None:
        try:
            info["serving"] = server.ready_versions(repo.classifier)
            info["serving_candidate"] = server.ready_versions(model)
        except RolloutError as exc:
            info["server"] = str(exc)
    return info


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="HTTP host:port of the server (default: the one make serve started)")
    p.add_argument("--repository", default=None, help="its model repository (default: the one make serve serves)")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("status", help="versions in the repository and on the server, recent history")

    def candidate_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--artifacts", required=True, help="the candidate's artifacts folder (labels, preprocess.json)")
        q.add_argument("--model-file", default=None, help="the file to serve (default: <artifacts>/model.onnx)")
        q.add_argument("--held-out", default=None, help="held-out images for the gate and the quality reference: an "
                       "ImageFolder (true top-1); default the build's (BUILD.json), else the bundled held-out photos")

    a = sub.add_parser("add", help="gate a candidate against the version in service and roll it out")
    candidate_args(a)
    a.add_argument("--min-agreement", type=number(float, 0, 1), default=validate.THRESHOLDS["int8"],
                   help="top-1 agreement with the version in service on decided images, without labels (default: %(default)s)")
    a.add_argument("--max-accuracy-drop", type=number(float, 0, 1), default=validate.ACCURACY_DROP,
                   help="with labels: how far below the version in service its true top-1 may be (default: %(default)s)")
    a.add_argument("--force", action="store_true", help="roll out even when the gate fails")
    sub.add_parser("rollback", help="retire the version in service and serve the previous one")
    ab = sub.add_parser("ab", help="A/B: a candidate served beside the version in service")
    ab_sub = ab.add_subparsers(dest="ab_action", required=True)
    candidate_args(ab_sub.add_parser("start", help="load the candidate as <classifier>_candidate and <ensemble>_candidate"))
    run = ab_sub.add_parser("run", help="send held-out photos with a traffic split; each arm's answers and latency")
    run.add_argument("--split", type=number(float, 0, 1), default=0.2, help="share of requests to the candidate (default: %(default)s)")
    run.add_argument("--duration", type=positive(float), default=20.0, help="seconds (default: %(default)s)")
    run.add_argument("--report", default=None, help="write the report here as JSON")
    ab_sub.add_parser("stop", help="unload and remove the candidate")
    ab_sub.add_parser("promote", help="roll the candidate out (gated) and stop the A/B test")
    return p


def main(args: argparse.Namespace) -> object:
    server, served_repo = served_server(args.url) if args.url or args.action != "status" else (None, None)
    if args.action == "status" and server is None:
        try:
            server, served_repo = served_server(None)
        except RolloutError:
            pass
    path = args.repository or served_repo
    if path is None:
        raise RolloutError("which repository? pass --repository (the server at --url is not the one make serve "
                           "started)")
    repo = Repository.open(path)
    if args.action == "status":
        result = status(repo, server)
        print(json.dumps(result, indent=2))
        return result
    if args.action == "rollback":
        return rollback(repo, server)
    if args.action == "add" or (args.action == "ab" and args.ab_action == "start"):
        artifacts = Path(args.artifacts)
        candidate = Candidate(Path(args.model_file) if args.model_file else artifacts / MODEL_ONNX, artifacts)
        if not candidate.model_file.exists():
            raise RolloutError(f"no {candidate.model_file}")
        if args.action == "ab":
            return ab_start(repo, server, candidate, args.held_out)
        thresholds = {"agreement": args.min_agreement, "accuracy_drop": args.max_accuracy_drop}
        return add(repo, server, candidate, args.held_out, thresholds, args.force)
    if args.ab_action == "run":
        report = ab_run(repo, server, args.split, args.duration)
        if args.report:
            Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
        return report
    if args.ab_action == "stop":
        return ab_stop(repo, server)
    candidate = ab_candidate(repo)  # promote
    thresholds = {"agreement": validate.THRESHOLDS["int8"], "accuracy_drop": validate.ACCURACY_DROP}
    version = add(repo, server, candidate, None, thresholds)
    ab_stop(repo, server)
    return version


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (RolloutError, LockTimeout, OSError, ValueError) as exc:  # OSError: ArtifactsError too
        sys.exit(f"serving.rollout: {exc}")
