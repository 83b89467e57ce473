"""deploy/images/: what the image definitions promise (pins, non-root, ports, the NGC tag), and, where
podman can build and run containers, `make image` builds the CPU image and a container started from it
(read-only root, non-root user) classifies the bundled photos over HTTP and gRPC."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from serving.server import Ports, free_port
from tests.deploy.test_publish import moto  # noqa: F401  (fixture: moto's S3 server on loopback)

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "deploy" / "images"
SHIP_MK = ROOT / "mk" / "ship.mk"
TEST_IMAGE = "localhost/triton-image-classifier:test"
# What a sandbox that cannot build images says (rlimits, cgroups, no mirror to bootstrap from).
SANDBOX_REFUSALS = ("Operation not permitted", "cgroups", "Permission denied", "Temporary failure in name resolution",
                    "Could not resolve", "Network is unreachable")


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            found[re.sub(r"\[.*\]", "", name).lower().replace("_", "-")] = version.strip()
    return found


def make_variable(name: str) -> str:
    return re.search(rf"^{name} \?= (.*)$", SHIP_MK.read_text(), re.M).group(1).strip()


def test_cpu_image_pins_what_the_python_models_import():
    image = pins(ROOT / "requirements" / "image.txt")
    main = pins(ROOT / "requirements" / "main.txt")
    assert {"nvidia-pytriton", "numpy", "pillow", "onnxruntime"} <= set(image)
    assert {name: main.get(name) for name in image} == image  # the versions the tests run
    copied = [*(ROOT / "build" / "repository" / "templates").glob("*.py"),  # what the writer puts in the repository
              *(ROOT / "common" / f"{m}.py" for m in ("preprocessing", "contract", "onnxsession", "cpu"))]
    templates = " ".join(p.read_text() for p in copied)
    for module, package in (("numpy", "numpy"), ("PIL", "pillow"), ("onnxruntime", "onnxruntime")):
        assert re.search(rf"^\s*(import|from) {module}\b", templates, re.M) and package in image


def test_images_run_as_non_root_and_expose_the_four_ports():
    for name in ("Containerfile.cpu", "Containerfile.gpu"):
        text = (IMAGES / name).read_text()
        (user,) = re.findall(r"^USER (\S+)$", text, re.M)[-1:]
        assert user.split(":")[0] not in ("0", "root"), name
        assert re.search(r"^EXPOSE 8000 8001 8002 8003$", text, re.M), name  # 8003: the supervisor's probes


def test_images_start_the_supervisor_with_every_module_it_imports():
    """Both images run `python3 -m serving.supervise ... -- tritonserver`, and the Deployment's initContainer
    `python3 -m serving.pull`; the serving modules copied into them are exactly what those two import,
    transitively, and their third-party imports (psutil, prometheus_client, aiohttp, orjson, boto3) are pinned in the
    image."""
    import ast

    def imports(module: str) -> tuple[set[str], set[str]]:
        tree = ast.parse((ROOT / "serving" / f"{module}.py").read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        return {n.split(".")[1] for n in names if n.startswith("serving.")}, {n.split(".")[0] for n in names}

    needed, todo, third_party = set(), ["supervise", "pull"], set()
    while todo:
        module = todo.pop()
        needed.add(module)
        own, top = imports(module)
        todo += sorted(own - needed)
        third_party |= {t for t in top if t not in sys.stdlib_module_names and t not in ("serving", "__future__")}
    image = pins(ROOT / "requirements" / "image.txt")
    assert third_party == {"psutil", "prometheus_client", "boto3", "botocore", "aiohttp", "orjson"}
    third_party = {t.replace("_", "-") for t in third_party}  # the distribution's name
    assert third_party <= set(image)
    copied_cpu = set(re.findall(r"serving/(\w+)\.py", (IMAGES / "build-cpu.sh").read_text()))
    copied_gpu = set(re.findall(r"serving/(\w+)\.py", (IMAGES / "Containerfile.gpu").read_text()))
    assert copied_cpu == copied_gpu == needed | {"__init__"}
    assert all(f"{name}=={image[name]}" in (IMAGES / "Containerfile.gpu").read_text() for name in third_party)
    for name in ("Containerfile.cpu", "Containerfile.gpu"):  # the HTTP port a container is given is the guard's
        text = (IMAGES / name).read_text()
        line = exec_form(text, "ENTRYPOINT") + exec_form(text, "CMD")
        assert line[:line.index("tritonserver")] == ["python3", "-m", "serving.supervise", "--address=0.0.0.0",
                                                     "--port=8003", "--guard-http", "--"], name


def exec_form(text: str, instruction: str) -> list[str]:
    """An ENTRYPOINT or CMD in exec form (a JSON list, continued over lines); [] when there is none."""
    found = re.search(rf"^{instruction} (\[.*?\])$", text.replace("\\\n", " "), re.M)
    return json.loads(found.group(1)) if found else []


def test_every_server_command_line_in_deploy_keeps_model_control_behind_a_key():
    """An open model-control API runs code (a python model loaded with its files): each image starts tritonserver
    under serving.supervise, which adds the restricted-API flags a command lacks; the manifests are checked in
    tests/deploy/test_kubernetes.py. A new file that starts a server must join one of these checks."""
    from serving.supervise import missing_restrictions, restrict

    for name in ("Containerfile.cpu", "Containerfile.gpu"):
        text = (IMAGES / name).read_text()
        line = exec_form(text, "ENTRYPOINT") + exec_form(text, "CMD")
        assert line[:3] == ["python3", "-m", "serving.supervise"], name
        server = line[line.index("--") + 1:]
        assert server[0] == "tritonserver" and missing_restrictions(restrict(server, "k")) == [], name
    starting = {str(p.relative_to(ROOT)) for p in (ROOT / "deploy").rglob("*")
                if p.is_file() and "--model-control-mode" in p.read_text(errors="replace")}
    assert starting == {"deploy/images/Containerfile.cpu", "deploy/images/Containerfile.gpu",
                        "deploy/k8s/base/deployment.yaml", "deploy/kserve/servingruntime.yaml"}


# (NGC tag, requirements/image.txt's Pillow) -> the GPU image's: Pillow 13 needs Python 3.11, NGC 24.10 has 3.10;
# 12.3.0, the newest for 3.10, preprocesses the bundled photos to the same bytes as 13.0.0.
GPU_PILLOW = {("24.10-py3", "13.0.0"): "12.3.0"}
# (NGC tag, package, requirements/image.txt's version) -> the GPU image's, for NGC 24.10's Python 3.10: multidict 7.2
# (aiohttp's) needs Python 3.11; 7.1.0 is the newest for 3.10 (pip download --python-version 3.10 aiohttp==3.14.5).
GPU_PY310 = {("24.10-py3", "multidict", "7.2.1"): "7.1.0"}


def test_gpu_image_pins_what_the_tests_run():
    """The GPU image's Pillow (the preprocess model's), psutil, prometheus-client, aiohttp and boto3 with their
    dependencies are requirements/image.txt's, bar the pairs listed in GPU_PILLOW and GPU_PY310 (Python 3.10 there):
    a change of either side fails here until someone checks the other."""
    text = (IMAGES / "Containerfile.gpu").read_text()
    (install,) = re.findall(r"^RUN python3 -m pip install (.*)$", text, re.M)
    gpu, image = dict(re.findall(r"(?<!\S)([a-z][a-z0-9._-]*)==(\S+)", install)), pins(ROOT / "requirements" / "image.txt")
    tag = re.search(r"^ARG TRITON_TAG=(\S+)$", text, re.M).group(1)
    s3 = {"boto3", "botocore", "s3transfer", "jmespath", "python-dateutil", "six", "urllib3"}
    supervise = {"psutil", "prometheus-client"}
    guard = {"aiohttp", "aiohappyeyeballs", "aiosignal", "attrs", "frozenlist", "idna", "multidict", "propcache",
             "typing-extensions", "yarl", "orjson"}
    gpu = {name.replace("_", "-"): version for name, version in gpu.items()}
    assert set(gpu) == {"pillow"} | supervise | s3 | guard
    assert all(gpu[n] == GPU_PY310.get((tag, n, image[n]), image[n]) for n in supervise | s3 | guard)
    assert gpu["pillow"] == GPU_PILLOW.get((tag, image["pillow"]), image["pillow"])


def test_gpu_image_is_the_pinned_ngc_tag_plus_pillow():
    text = (IMAGES / "Containerfile.gpu").read_text()
    tag = re.search(r"^ARG TRITON_TAG=(\S+)$", text, re.M).group(1)
    assert tag == make_variable("NGC_TAG") and re.fullmatch(r"\d\d\.\d\d-py3", tag)
    assert "FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}" in text
    assert re.search(r"pip install .*pillow==\d", text)  # server#6621: the stock image lacks Pillow


# ---- build and run, where containers run ------------------------------------------------------------

def podman_args() -> list[str]:
    """As mk/ship.mk's PODMAN_ARGS: runc where installed."""
    return ["--runtime", "runc"] if shutil.which("runc") else []


def hard_limits() -> list[str]:
    nofile = subprocess.run(["bash", "-c", "ulimit -Hn"], capture_output=True, text=True).stdout.strip()
    nofile = "1048576" if nofile == "unlimited" else nofile
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=4096:4096"]


@pytest.fixture(scope="module")
def podman() -> list[str]:
    if shutil.which("podman") is None:
        subprocess.run(["make", "--no-print-directory", "image-setup"], cwd=ROOT, capture_output=True)
    if shutil.which("podman") is None:
        pytest.skip("no podman and `make image-setup` could not install it (needs root)")
    return ["podman", *podman_args()]


@pytest.fixture(scope="module")
def cpu_image(podman, lite0_repository):
    done = subprocess.run(["make", "--no-print-directory", "image", f"REPOSITORY={lite0_repository}",
                           f"IMAGE={TEST_IMAGE}"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        refused = [m for m in SANDBOX_REFUSALS if m in done.stderr]
        if not refused:  # anything else is a broken image definition or build script: a failure
            pytest.fail(f"`make image` failed:\n{done.stderr[-3000:]}")
        pytest.skip(f"`make image` refused by this machine ({', '.join(refused)}): {done.stderr[-1500:]}")
    from build.repository import placement  # where the baked repository answers as gated, said last

    assert done.stderr.splitlines()[-1] == f"make image: {placement.advice(lite0_repository)}", done.stderr[-2000:]
    yield TEST_IMAGE
    subprocess.run([*podman, "rmi", TEST_IMAGE], capture_output=True)


def stopped_cleanly(podman: list[str], name: str) -> bool:
    """`podman stop` (SIGTERM, then SIGKILL 40 s later) of container `name`: whether it exited with code 0."""
    stopped = subprocess.run([*podman, "stop", "--time", "40", name], capture_output=True, text=True, timeout=90)
    assert stopped.returncode == 0, stopped.stderr
    code = subprocess.run([*podman, "inspect", "--format", "{{.State.ExitCode}}", name],
                          capture_output=True, text=True).stdout.strip()
    return code == "0"


def wait_ready(url: str, container: list[str], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    logs = subprocess.run([*container[:-1], "logs", container[-1]], capture_output=True, text=True)
    pytest.fail(f"container not ready after {timeout:.0f} s:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")


@contextlib.contextmanager
def serving_container(podman: list[str], name: str, run: list[str], http_port: int):
    """`podman run -d --name <name> <run>` (skipped where podman cannot run containers), ready on `http_port`
    (host loopback) for the body of the `with`, then removed."""
    started = subprocess.run([*podman, "run", "-d", "--name", name, *run], capture_output=True, text=True,
                             timeout=120)
    if started.returncode != 0:
        pytest.skip(f"podman cannot run containers here: {started.stderr.strip()[-800:]}")
    try:
        wait_ready(f"http://127.0.0.1:{http_port}/v2/health/ready", [*podman, name])
        yield
    finally:
        subprocess.run([*podman, "rm", "-f", name], capture_output=True)


@pytest.mark.slow
def test_cpu_image_keeps_no_layer_of_build_only_files(podman, cpu_image, lite0_repository):
    """The wheelhouse pip installs from is mounted for that step, not copied: a COPY layer keeps its files
    (~100 MB) in the image even after a later step deletes them. No COPY layer is larger than the biggest
    thing the image is meant to carry, the baked repository."""
    history = json.loads(subprocess.run([*podman, "history", "--format", "json", cpu_image], capture_output=True,
                                        text=True, check=True).stdout)
    copies = {h["CreatedBy"][:80]: h["size"] for h in history if "COPY" in h["CreatedBy"]}
    repository = sum(f.stat().st_size for f in lite0_repository.rglob("*") if f.is_file())
    assert copies and all(size <= repository + 2**20 for size in copies.values()), (repository, copies)


@pytest.mark.slow
def test_cpu_image_has_debians_security_updates(podman, cpu_image):
    """debootstrap installs bookworm's point release alone; the base then takes bookworm-security and
    bookworm-updates, and its label says when (a base made before that is made again)."""
    upgraded = subprocess.run([*podman, "image", "inspect", "--format",
                               '{{index .Labels "io.triton-ic.base.upgraded"}}', cpu_image],
                              capture_output=True, text=True, check=True).stdout.strip()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\dZ", upgraded), upgraded
    sources = subprocess.run([*podman, "run", "--rm", *hard_limits(), "--entrypoint", "cat", cpu_image,
                              "/etc/apt/sources.list.d/debian.sources"], capture_output=True, text=True)
    if sources.returncode != 0 and "debian.sources" not in sources.stderr:
        pytest.skip(f"podman cannot run containers here: {sources.stderr.strip()[-800:]}")
    suites = {s for line in sources.stdout.splitlines() if line.startswith("Suites:") for s in line.split()[1:]}
    assert suites == {"bookworm", "bookworm-updates", "bookworm-security"}, sources.stdout


@pytest.mark.slow
def test_cpu_image_serves_the_bundled_photos(podman, cpu_image, photos):
    """The image as `podman run` starts it, with tritonserver's flags alone: it classifies over HTTP (through the
    supervisor's guard on the port given) and gRPC, reloads a stub killed inside it, answers the body that kills
    Triton 2.51 with 400 and no restart, runs as uid 1000 and stops cleanly on SIGTERM."""
    from clients.client import ImageClassifierClient
    from common.samples import CAT_CLASSES, ESPRESSO
    from tests.serving.test_http_guard import check_guarded_server

    ports, health = Ports.free(), free_port()
    name = f"triton-image-test-{ports.http}"
    run = [*hard_limits(), "--read-only", "--tmpfs", "/tmp", "--shm-size", "256m",
           "-p", f"127.0.0.1:{ports.http}:8000", "-p", f"127.0.0.1:{ports.grpc}:8001",
           "-p", f"127.0.0.1:{ports.metrics}:8002", "-p", f"127.0.0.1:{health}:8003", cpu_image,
           "--model-repository=/models", "--http-address=0.0.0.0", "--grpc-address=0.0.0.0",
           "--metrics-address=0.0.0.0"]
    with serving_container(podman, name, run, ports.http):
        wait_ready(f"http://127.0.0.1:{health}/ready", [*podman, name])
        # the entrypoint's watchdog: a classifier stub killed inside the container is reloaded, /ready 503 meanwhile
        kill = ("import os, psutil\n"
                "stub = next(p for p in psutil.process_iter(['cmdline']) if '/classifier/' in ' '.join(p.info['cmdline'] or []))\n"
                "os.kill(stub.pid, 9)")
        assert subprocess.run([*podman, "exec", name, "python3", "-c", kill], capture_output=True).returncode == 0
        codes = []
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health}/ready", timeout=2) as answer:
                    codes.append(answer.status)
            except urllib.error.HTTPError as exc:
                codes.append(exc.code)
            if 503 in codes and codes[-1] == 200:
                break
            time.sleep(0.05)
        assert 503 in codes and codes[-1] == 200, codes[-20:]
        uid = subprocess.run([*podman, "exec", name, "id", "-u"], capture_output=True, text=True).stdout.strip()
        assert uid == "1000"
        # the port given to tritonserver is the supervisor's HTTP guard (--guard-http), the server serving on
        check_guarded_server(f"127.0.0.1:{ports.http}", f"http://127.0.0.1:{health}/status", photos["chelsea"])
        for protocol, port in (("http", ports.http), ("grpc", ports.grpc)):
            with ImageClassifierClient(f"127.0.0.1:{port}", protocol) as client:
                chelsea, coffee = client.classify([photos["chelsea"], photos["coffee"]], top_k=3)
            assert CAT_CLASSES & {p.index for p in chelsea}, protocol
            assert coffee[0].index == ESPRESSO, protocol
        with urllib.request.urlopen(f"http://127.0.0.1:{ports.metrics}/metrics", timeout=5) as answer:
            assert b'nv_inference_request_success{model="image_classifier"' in answer.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{health}/metrics", timeout=5) as answer:  # the supervisor's
            assert b'triton_supervisor_stub_crashes_total{model="classifier"} 1.0' in answer.read()
        assert stopped_cleanly(podman, name), "the supervisor and tritonserver did not shut down cleanly on SIGTERM"


@pytest.mark.slow
def test_cpu_image_serves_a_mounted_repository_whose_weights_sit_beside_its_models(podman, cpu_image, tmp_path,
                                                                                    photos):
    """A repository `make engines` wrote on the host (here as root) from an import that keeps its weights beside
    model.onnx (ONNX external data, as models over 2 GB must), mounted read-only at /models: the server, uid 1000,
    reads every model file and its weights file and classifies. Before, onnx's weights files were 0600: the
    server could read model.onnx but not model.onnx.data, and the classifier never loaded."""
    from build.repository.spec import DeploymentSpec
    from build.repository.writer import write_repository
    from clients.client import ImageClassifierClient
    from common.preprocessing import PreprocessConfig
    from tests.training.tiny_torch import TinyNet, export_with_external_data
    from training.export import import_onnx

    labels, config = [f"class {i}" for i in range(7)], PreprocessConfig(resize=72, crop=64)
    artifacts = import_onnx(export_with_external_data(TinyNet(), tmp_path / "source" / "model.onnx"),
                            tmp_path / "artifacts", labels, config).out_dir
    repository = tmp_path / "model_repository"
    write_repository(DeploymentSpec(artifacts=str(artifacts)), "python-onnxruntime", repository, "tests")
    assert (repository / "classifier" / "1" / "model.onnx.data").is_file()
    port = Ports.free().http
    run = [*hard_limits(), "--read-only", "--tmpfs", "/tmp", "--shm-size", "256m", "-v", f"{repository}:/models:ro",
           "-p", f"127.0.0.1:{port}:8000", cpu_image, "--model-repository=/models", "--http-address=0.0.0.0"]
    with serving_container(podman, f"triton-image-test-{port}", run, port):
        with ImageClassifierClient(f"127.0.0.1:{port}", "http") as client:
            assert client.probabilities([photos["chelsea"]]).shape == (1, 7)


@pytest.mark.slow
def test_cpu_image_runs_the_kserve_runtimes_command_behind_its_http_guard(podman, cpu_image, photos):
    """The KServe runtime's command line (deploy/kserve/servingruntime.yaml) in the CPU image, on the host's network
    with free ports in place of its own: KServe's HTTP port is the supervisor's guard, Triton's own HTTP port
    listens on loopback only, the project's client classifies through the guard, and the body that kills
    Triton 2.51 is answered 400 with no restart; SIGTERM ends it cleanly."""
    import psutil
    import yaml

    from clients.client import ImageClassifierClient
    from common.samples import ESPRESSO
    from tests.deploy.test_kubernetes import loopback_command
    from tests.serving.test_http_guard import check_guarded_server

    runtime = yaml.safe_load((ROOT / "deploy" / "kserve" / "servingruntime.yaml").read_text())
    (container,) = runtime["spec"]["containers"]
    local = {port: free_port() for port in (8080, 8081, 9000, 8002, 8003)}
    repository = next(a for a in container["args"] if a.startswith("--model-repository="))
    # the repository baked into the image
    command = loopback_command(container, {repository: "--model-repository=/models"}, local, here=False)
    name = f"triton-image-kserve-{local[8080]}"
    run = [*hard_limits(), "--read-only", "--tmpfs", "/tmp", "--shm-size", "256m", "--network", "host",
           "--entrypoint", json.dumps(command), cpu_image]
    guard = f"127.0.0.1:{local[8080]}"
    with serving_container(podman, name, run, local[8080]):
        wait_ready(f"http://127.0.0.1:{local[8003]}/ready", [*podman, name])
        listening = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet") if c.status == "LISTEN"}
        assert ("127.0.0.1", local[8081]) in listening and ("0.0.0.0", local[8081]) not in listening
        with ImageClassifierClient(guard, "http") as client:
            assert client.classify([photos["coffee"]], top_k=1)[0][0].index == ESPRESSO
        check_guarded_server(guard, f"http://127.0.0.1:{local[8003]}/status", photos["chelsea"])
        assert stopped_cleanly(podman, name), "the supervisor, its guard and tritonserver did not shut down cleanly"


@pytest.mark.slow
def test_cpu_image_serves_a_repository_from_s3_with_a_read_only_root(podman, cpu_image, moto, lite0_repository,
                                                                      photos):
    """What the Kubernetes Deployment does: the repository from S3 (moto on the host's loopback), the
    credentials from the environment, the root file system read-only, /tmp the only writable place."""
    from clients.client import ImageClassifierClient
    from common.samples import CAT_CLASSES, ESPRESSO
    from serving.publish import S3Location, publish

    url = publish(lite0_repository, S3Location.parse(f"s3://{moto}/models/image-test"), create_bucket=True,
                  progress=False)["url"]
    ports = Ports.free()
    name = f"triton-image-s3-{ports.http}"
    env = [arg for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
           for arg in ("-e", f"{key}={os.environ[key]}")]
    # the host's network: the supervisor's endpoint on a free port, not 8003 (`make serve`'s watchdog's)
    entrypoint = json.dumps(["python3", "-m", "serving.supervise", f"--port={free_port()}", "--", "tritonserver",
                             "--model-control-mode=explicit", "--load-model=*"])
    run = [*hard_limits(), "--read-only", "--tmpfs", "/tmp", "--shm-size", "256m", "--network", "host", *env,
           "--entrypoint", entrypoint, cpu_image, f"--model-repository={url}",
           f"--http-port={ports.http}", f"--grpc-port={ports.grpc}", f"--metrics-port={ports.metrics}",
           "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"]
    with serving_container(podman, name, run, ports.http):
        with ImageClassifierClient(f"127.0.0.1:{ports.http}", "http") as client:
            chelsea, coffee = client.classify([photos["chelsea"], photos["coffee"]], top_k=3)
        assert CAT_CLASSES & {p.index for p in chelsea} and coffee[0].index == ESPRESSO


@pytest.mark.slow
def test_cpu_image_pulls_a_publication_as_the_deployments_init_container(podman, cpu_image, moto, lite0_repository,
                                                                          tmp_path, photos):
    """The Deployment's initContainer command run in the image (boto3 and serving.pull are in it), root file
    system read-only: the publication lands whole in the mounted folder, checked against its PUBLISHED.json.
    Then the server container as the Deployment runs it: uid 1000, the pulled folder mounted read-only at
    /models, the root read-only, /tmp the only writable place; it classifies the bundled photos. Then KServe's
    storage container (deploy/kserve/storage-container): its command, the storageUri and the volume, the
    endpoint in AWS_ENDPOINT_URL as KServe sets it; the repository lands in the volume's folder the
    ServingRuntime serves."""
    import yaml

    from clients.client import ImageClassifierClient
    from common.samples import CAT_CLASSES, ESPRESSO
    from serving.publication import STORAGE_URI_SCHEME
    from serving.publish import S3Location, publish
    from serving.pull import KSERVE_FOLDER
    from tests.deploy.test_pull import tree

    url = publish(lite0_repository, S3Location.parse(f"s3://{moto}/models/image-pull"), create_bucket=True,
                  progress=False)["url"]
    env = [arg for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
           for arg in ("-e", f"{key}={os.environ[key]}")]

    def run_pull(mount: str, command: list[str], *extra_env: str) -> Path:
        volume = tmp_path / mount.strip("/").replace("/", "-")
        volume.mkdir()
        volume.chmod(0o777)  # the image runs as uid 1000
        done = subprocess.run([*podman, "run", "--rm", *hard_limits(), "--read-only", "--tmpfs", "/tmp", "--network",
                               "host", *env, *extra_env, "-v", f"{volume}:{mount}", "--entrypoint", command[0],
                               cpu_image, *command[1:]], capture_output=True, text=True, timeout=300)
        if done.returncode != 0 and "cannot" in done.stderr and "serving.pull" not in done.stderr:
            pytest.skip(f"podman cannot run containers here: {done.stderr.strip()[-800:]}")
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.startswith("pulled ") and f"into {mount}/" in done.stdout
        return volume

    volume = run_pull("/pull", ["python3", "-m", "serving.pull", "--url", url, "--to", "/pull/repository",
                                "--wait", "0"])
    pulled = tree(volume / "repository")
    assert json.loads(pulled.pop("PUBLISHED.json"))["url"] == url
    assert pulled == tree(lite0_repository)

    ports = Ports.free()
    name = f"triton-image-pulled-{ports.http}"
    entrypoint = json.dumps(["python3", "-m", "serving.supervise", f"--port={free_port()}", "--", "tritonserver",
                             "--model-control-mode=explicit", "--load-model=*"])
    run = [*podman, "run", "-d", "--name", name, *hard_limits(), "--read-only", "--tmpfs", "/tmp", "--shm-size", "256m",
           "--network", "host", "-v", f"{volume / 'repository'}:/models:ro", "--entrypoint", entrypoint, cpu_image,
           "--model-repository=/models", f"--http-port={ports.http}", f"--grpc-port={ports.grpc}",
           f"--metrics-port={ports.metrics}", "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
           "--metrics-address=127.0.0.1"]
    started = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        wait_ready(f"http://127.0.0.1:{ports.http}/v2/health/ready", [*podman, name])
        probe = subprocess.run([*podman, "exec", name, "sh", "-c", "id -u; touch /models/x"], capture_output=True,
                               text=True)
        assert probe.stdout.strip() == "1000" and probe.returncode != 0, (probe.stdout, probe.stderr)
        for protocol, port in (("http", ports.http), ("grpc", ports.grpc)):
            with ImageClassifierClient(f"127.0.0.1:{port}", protocol) as client:
                chelsea, coffee = client.classify([photos["chelsea"], photos["coffee"]], top_k=3)
            assert CAT_CLASSES & {p.index for p in chelsea} and coffee[0].index == ESPRESSO, protocol
    finally:
        subprocess.run([*podman, "rm", "-f", name], capture_output=True)

    storage = yaml.safe_load((ROOT / "deploy/kserve/storage-container/clusterstoragecontainer.yaml").read_text())
    location = S3Location.parse(url)
    volume = run_pull("/mnt/models", [*storage["spec"]["container"]["command"], "--wait=0",
                                      f"{STORAGE_URI_SCHEME}{location.bucket}/{location.prefix}", "/mnt/models"],
                      "-e", f"AWS_ENDPOINT_URL={location.endpoint}")
    assert [p.name for p in volume.iterdir()] == [KSERVE_FOLDER]
    pulled = tree(volume / KSERVE_FOLDER)
    assert json.loads(pulled.pop("PUBLISHED.json"))["url"] == url
    assert pulled == tree(lite0_repository)


def test_the_gpu_image_context_holds_every_file_its_containerfile_copies(tmp_path):
    """`make image-gpu` once built from deploy/images, where no serving/ exists: every COPY failed."""
    context = tmp_path / "context"
    subprocess.run(["make", "-s", "image-gpu-context", f"GPU_CONTEXT={context}"], cwd=ROOT, check=True, timeout=60)
    text = (IMAGES / "Containerfile.gpu").read_text().replace("\\\n", " ")
    sources = [s for line in re.findall(r"^COPY (.+)$", text, re.M) for s in line.split()[:-1] if not s.startswith("--")]
    assert sources and all((context / s).is_file() for s in sources), sources
