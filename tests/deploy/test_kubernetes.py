"""deploy/k8s/ and deploy/kserve/: kustomize renders every overlay, every object validates against the
pinned Kubernetes schema (kubernetes-validate) or a vendored CRD schema (deploy/schemas/), the pieces
agree with each other and with the project's contracts, and the autoscaler's metric and the probes
answer from a real server scraped by a real Prometheus."""
from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml

from serving import access
from tests.deploy.test_publish import moto  # noqa: F401  (fixture: moto's S3 server on loopback)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SCHEMAS = DEPLOY / "schemas"
RECORDING = DEPLOY / "monitoring" / "rules" / "recording.yml"
KUBERNETES_VERSION = "1.32"  # the kubectl on the project's machines; docs/deploy.md
TARGETS = {"cpu": K8S / "overlays" / "cpu", "cpu-vnni": K8S / "overlays" / "cpu-vnni", "gpu": K8S / "overlays" / "gpu",
           "kserve": DEPLOY / "kserve", "kserve-storage": DEPLOY / "kserve" / "storage-container",
           "prometheus-adapter": K8S / "prometheus-adapter"}
# apiVersion/kind -> vendored schema file (deploy/schemas/README.md)
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring.coreos.com-v1.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring.coreos.com-v1.yaml",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "servingruntime-serving.kserve.io-v1alpha1.yaml",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice-serving.kserve.io-v1beta1.yaml",
    ("serving.kserve.io/v1alpha1", "ClusterStorageContainer"):
        "clusterstoragecontainer-serving.kserve.io-v1alpha1.yaml",
}


@pytest.fixture(scope="session")
def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("no kubectl (with its built-in kustomize) on PATH")
    return found


def render(kubectl: str, folder: Path) -> list[dict]:
    done = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {folder}:\n{done.stderr}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="session")
def rendered(kubectl) -> dict[str, list[dict]]:
    return {name: render(kubectl, folder) for name, folder in TARGETS.items()}


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    return found


# ---- validation ------------------------------------------------------------------------------------

def _kubernetes_definitions() -> dict:
    import kubernetes_validate

    folder = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    (strict,) = [p for p in folder.glob(f"v{KUBERNETES_VERSION}.*-local-strict")]
    return json.loads((strict / "_definitions.json").read_text())


def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    """The vendored schema, its `$ref`s into Kubernetes' own definitions resolved offline; unknown
    fields are errors wherever the schema lists properties (kubectl's strict field validation)."""
    from referencing import Registry, Resource

    schema = yaml.safe_load((SCHEMAS / CRD_SCHEMAS[(api_version, kind)]).read_text())
    registry = Resource.from_contents(_kubernetes_definitions()) @ Registry()
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validation_errors(obj: dict) -> list[str]:
    import kubernetes_validate

    key = (obj["apiVersion"], obj["kind"])
    if key in CRD_SCHEMAS:
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in crd_validator(*key).iter_errors(obj)]
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


def test_every_target_renders(rendered):
    kinds = {name: sorted(o["kind"] for o in objs) for name, objs in rendered.items()}
    server = sorted(["ServiceAccount", "ConfigMap", "Service", "Service", "Deployment", "HorizontalPodAutoscaler",
                     "PodDisruptionBudget", "PodMonitor", "PrometheusRule", "NetworkPolicy"])
    assert kinds["cpu"] == server and kinds["cpu-vnni"] == server and kinds["gpu"] == server
    assert kinds["kserve"] == ["InferenceService", "ServiceAccount", "ServingRuntime"]
    assert kinds["kserve-storage"] == ["ClusterStorageContainer"]
    assert kinds["prometheus-adapter"] == ["ConfigMap"]


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_object_validates(rendered, target):
    pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (make setup)")
    for obj in rendered[target]:
        errors = validation_errors(obj)
        assert not errors, f"{target}: {obj['kind']}/{obj['metadata']['name']}: {errors}"


def test_validation_refuses_broken_objects(rendered):
    """The validators catch what a cluster would refuse: a misspelt field, a wrong type, an out-of-range
    canary share, an unknown relabelling action."""
    pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (make setup)")
    deployment = copy.deepcopy(one(rendered["cpu"], "Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    assert validation_errors(deployment)
    hpa = copy.deepcopy(one(rendered["cpu"], "HorizontalPodAutoscaler"))
    hpa["spec"]["maxReplicas"] = "ten"
    assert validation_errors(hpa)
    isvc = copy.deepcopy(one(rendered["kserve"], "InferenceService"))
    isvc["spec"]["predictor"]["canaryTrafficPercent"] = 150
    assert validation_errors(isvc)
    runtime = copy.deepcopy(one(rendered["kserve"], "ServingRuntime"))
    runtime["spec"]["containers"][0]["args"] = "--http-port=8080"
    assert validation_errors(runtime)
    storage = copy.deepcopy(one(rendered["kserve-storage"], "ClusterStorageContainer"))
    storage["spec"]["container"]["name"] = "pull"  # KServe would not see it as its storage initializer
    assert validation_errors(storage)
    storage = copy.deepcopy(one(rendered["kserve-storage"], "ClusterStorageContainer"))
    storage["spec"]["supportedUriFormats"][0] = {"prefx": "published-s3://"}
    assert validation_errors(storage)
    monitor = copy.deepcopy(one(rendered["cpu"], "PodMonitor"))
    monitor["spec"]["podMetricsEndpoints"][0]["relabelings"][0]["action"] = "rename"
    assert validation_errors(monitor)


# ---- what the objects say ---------------------------------------------------------------------------

def test_vnni_overlay_is_the_cpu_overlay_on_nodes_with_a_flag_the_vnni_file_needs(rendered):
    """overlays/cpu-vnni adds one thing to overlays/cpu: a required node affinity whose terms (ORed) are Node
    Feature Discovery's labels of exactly the flags a `vnni`-layout INT8 file asks for (common/cpu.py)."""
    from common import cpu

    vnni = copy.deepcopy(rendered["cpu-vnni"])
    pod = one(vnni, "Deployment")["spec"]["template"]["spec"]
    terms = pod.pop("affinity")["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert vnni == rendered["cpu"]
    flags = cpu.requirement("vnni").split("|")
    assert terms == [{"matchExpressions": [{"key": cpu.NODE_LABELS[f], "operator": "In", "values": ["true"]}]}
                     for f in flags]
    assert pod["nodeSelector"] == {"kubernetes.io/arch": "amd64"}


def test_placement_names_the_overlay_that_keeps_a_repository_where_it_answers_as_gated(kubectl, tiny_artifacts,
                                                                                       tmp_path):
    """A repository whose INT8 file is in the portable `avx2` layout runs anywhere; one whose file is in the
    `vnni` layout (written by build.precision.quantize from the same cache) is placed on the overlay whose
    node affinity names the flags that file's metadata asks for."""
    import onnx

    from build import engines
    from build.repository import placement
    from common import cpu

    artifacts, repo = tmp_path / "tiny", tmp_path / "repo"
    shutil.copytree(tiny_artifacts, artifacts)
    engines.main(engines.get_args_parser().parse_args([
        "--artifacts", str(artifacts), "--out", str(repo), "--precision", "int8", "--int8-cpu-layout", "avx2",
        "--min-agreement-int8", "0"]))
    assert placement.requirements(repo) == {}
    assert placement.advice(repo).endswith(f"any x86-64 CPU (Kubernetes: {placement.ANY_CPU_OVERLAY})")

    done = subprocess.run([sys.executable, "-m", "build.precision.quantize", "--artifacts", str(artifacts),
                           "--target", "cpu", "--cpu-layout", "vnni"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    shutil.copy(artifacts / "model.int8.cpu.onnx", repo / "classifier" / "1" / "model.onnx")
    flags = tuple(cpu.requirement("vnni").split("|"))
    assert placement.requirements(repo) == {"classifier/1/model.onnx": ("vnni", flags)}
    printed = subprocess.run([sys.executable, "-m", "build.repository.placement", "--model-repository", str(repo)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    line = printed.stdout.strip()
    assert "classifier/1/model.onnx (INT8 layout vnni)" in line and ", ".join(flags) in line
    assert f"Kubernetes: {placement.VNNI_OVERLAY}," in line and "INT8_CPU_LAYOUT=avx2" in line
    pod = one(render(kubectl, ROOT / placement.VNNI_OVERLAY), "Deployment")["spec"]["template"]["spec"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert [t["matchExpressions"][0]["key"] for t in terms] == [cpu.NODE_LABELS[f] for f in flags]
    assert all(f"{label}=true" in line for label in map(cpu.NODE_LABELS.get, flags))
    # a requirement no overlay here selects is named, not placed
    model = onnx.load(str(repo / "classifier" / "1" / "model.onnx"))
    onnx.helper.set_model_props(model, {cpu.LAYOUT_KEY: "vnni", cpu.REQUIRES_KEY: "no_cpu_has_this_flag"})
    onnx.save(model, str(repo / "classifier" / "1" / "model.onnx"))
    assert placement.advice(repo).endswith("classifier/1/model.onnx: one of no_cpu_has_this_flag "
                                           "(no overlay of this project selects such nodes)")
    # TensorRT plans go to the GPU overlay (no plan can be built here: the manifest is the only change)
    manifest = json.loads((repo / "BUILD.json").read_text())
    (repo / "BUILD.json").write_text(json.dumps({**manifest, "backend": "tensorrt"}))
    assert f"(Kubernetes: {placement.GPU_OVERLAY}, on nodes with that GPU)" in placement.advice(repo)
    for overlay in (placement.ANY_CPU_OVERLAY, placement.GPU_OVERLAY):
        assert (ROOT / overlay / "kustomization.yaml").is_file()


NGC_ENTRYPOINT = "/opt/nvidia/nvidia_entrypoint.sh"  # the GPU image's ENTRYPOINT (CUDA compatibility set-up)


def server_container(objects: list[dict]) -> dict:
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def pull_container(objects: list[dict]) -> dict:
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["initContainers"]
    return container


def supervisor_command(container: dict) -> list[str]:
    """The container's command after the NGC entrypoint the GPU overlay puts first."""
    command = container.get("command", [])
    return command[1:] if command[:1] == [NGC_ENTRYPOINT] else command


def test_the_gpu_pod_runs_ngc_s_entrypoint_first_as_the_image_does(rendered):
    """A pod's `command` replaces the image's ENTRYPOINT: NGC's, which sets up CUDA forward compatibility on older
    drivers, runs only where the command names it. The rest is the CPU pods' command."""
    gpu, cpu = server_container(rendered["gpu"])["command"], server_container(rendered["cpu"])["command"]
    assert gpu[0] == NGC_ENTRYPOINT and gpu[1:] == cpu and NGC_ENTRYPOINT not in cpu


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_pod_runs_locked_down_with_probes_and_resources(rendered, target):
    pod = one(rendered[target], "Deployment")["spec"]["template"]["spec"]
    container = server_container(rendered[target])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/tmp", "/dev/shm"} <= mounts  # writable places Triton and the python backend need
    # the supervisor's endpoint (serving.supervise): /ready is 503 while a dead stub's model is reloaded
    command = supervisor_command(container)
    assert command[:3] == ["python3", "-m", "serving.supervise"]
    assert command[-2:] == ["--", "tritonserver"] and "--port=8003" in command
    assert {probe: (container[probe]["httpGet"]["path"], container[probe]["httpGet"]["port"])
            for probe in ("livenessProbe", "readinessProbe", "startupProbe")} == {
        "livenessProbe": ("/live", "health"), "readinessProbe": ("/ready", "health"),
        "startupProbe": ("/ready", "health")}
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002, "health": 8003}
    flags = dict(a.split("=", 1) for a in container["args"])
    assert [int(flags[f"--{name}-port"]) for name in ("grpc", "metrics")] == [8001, 8002]
    # the http port is the supervisor's HTTP guard; Triton's own HTTP port listens on loopback behind it
    assert "--http-guard=0.0.0.0:8000" in command
    assert flags["--http-address"] == "127.0.0.1" and int(flags["--http-port"]) not in ports.values()


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_grace_period_outlasts_the_supervisors_bounded_shutdown(rendered, target):
    """On SIGTERM the supervisor answers /ready 503 for --unready-wait (the server still serving while the
    endpoints drop the pod), waits at most WATCHDOG_STOP_S for the watchdog and --drain-timeout for the drain,
    then Triton takes up to --exit-timeout-secs: the kubelet's SIGKILL must come later, with a margin."""
    from serving.supervise import WATCHDOG_STOP_S, get_args_parser

    margin_s = 10
    pod = one(rendered[target], "Deployment")["spec"]["template"]["spec"]
    container = server_container(rendered[target])
    supervisor = get_args_parser().parse_args(supervisor_command(container)[3:])
    exit_timeout_s = int(dict(a.split("=", 1) for a in container["args"])["--exit-timeout-secs"])
    assert supervisor.unready_wait >= 3
    steps = supervisor.unready_wait + WATCHDOG_STOP_S + supervisor.drain_timeout + exit_timeout_s
    assert pod["terminationGracePeriodSeconds"] >= steps + margin_s, (pod["terminationGracePeriodSeconds"], steps)


def probe_window_s(probe: dict) -> int:
    """Seconds a probe lets the container go unanswered before the kubelet acts (Kubernetes' defaults
    where a field is unset)."""
    return probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def duration_s(text: str) -> float:
    """A Go duration as Knative reads one ("900s", "15m", "1h30m")."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    assert parts and text, f"{text!r} is not a duration"
    hours, minutes, seconds = (int(p or 0) for p in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


@pytest.mark.parametrize("target", ["cpu", "cpu-vnni", "gpu"])
def test_the_hpa_alone_sets_the_deployments_scale(rendered, target):
    """An HPA scales the Deployment in every server overlay: a spec.replicas there would put the scale back
    to that number on each `kubectl apply -k`, under load too, until the HPA raised it again."""
    deployment = one(rendered[target], "Deployment")
    target_ref = one(rendered[target], "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target_ref["kind"], target_ref["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"], deployment["spec"]["replicas"]


@pytest.mark.parametrize("target", ["cpu", "cpu-vnni", "gpu"])
def test_rollout_deadline_outlasts_the_startup_window(rendered, target):
    """A new pod may spend the startup probe's whole window loading models, after scheduling, the image
    pull, and its initContainer's wait for a publish in progress: a progress deadline no longer than those
    (Kubernetes' default, 600 s, is the window alone) reports a rollout of pods that are still loading as failed."""
    from serving.pull import get_args_parser

    deployment = one(rendered[target], "Deployment")
    window = probe_window_s(server_container(rendered[target])["startupProbe"])
    window += get_args_parser().parse_args(pull_container(rendered[target])["command"][3:]).wait
    assert deployment["spec"].get("progressDeadlineSeconds", 600) > window, window


def test_kserve_runtime_waits_for_model_loading_as_the_deployment_does(rendered):
    """Triton opens its HTTP port only once every model has loaded, so KServe's liveness probe on 8080 would
    restart a container still loading: a startup probe holds it off at least as long as the Deployment's
    does, and Knative's progress deadline for the revision outlasts that window plus the storage container's
    wait for a publish in progress."""
    from serving.pull import get_args_parser

    (container,) = one(rendered["kserve"], "ServingRuntime")["spec"]["containers"]
    assert "startupProbe" in container, "no startup probe: liveness restarts a server still loading its models"
    window = probe_window_s(container["startupProbe"])
    assert window >= probe_window_s(server_container(rendered["cpu"])["startupProbe"]), window
    assert container["startupProbe"]["httpGet"]["port"] == container["livenessProbe"]["httpGet"]["port"]
    storage = one(rendered["kserve-storage"], "ClusterStorageContainer")["spec"]["container"]
    window += get_args_parser().parse_args(storage["command"][3:]).wait
    annotations = one(rendered["kserve"], "ServingRuntime")["spec"].get("annotations", {})
    assert duration_s(annotations.get("serving.knative.dev/progress-deadline", "600s")) > window


def test_kserve_readiness_is_the_supervisors_as_in_the_deployment(rendered):
    """Triton's own readiness stays 200 while a model whose python stub died is reloaded; the supervisor's /ready
    says 503 then. KServe's runtime probed Triton's 8080: its readiness is the supervisor's port and path now,
    on the loopback address the supervisor binds by default (Knative's queue-proxy probes 127.0.0.1), with the
    Deployment's period and threshold; startup and liveness are Triton's own, through KServe's HTTP port (the
    supervisor's HTTP guard)."""
    from serving.supervise import get_args_parser

    (container,) = one(rendered["kserve"], "ServingRuntime")["spec"]["containers"]
    command = container["command"]
    supervisor = get_args_parser().parse_args(command[command.index("serving.supervise") + 1:command.index("--")])
    assert supervisor.address == "127.0.0.1", supervisor.address
    readiness = container["readinessProbe"]
    assert readiness["httpGet"] == {"path": "/ready", "port": supervisor.port}
    deployment = server_container(rendered["cpu"])["readinessProbe"]
    assert (readiness["periodSeconds"], readiness["failureThreshold"]) == (deployment["periodSeconds"],
                                                                          deployment["failureThreshold"])
    guard_port = supervisor.http_guard[1]
    assert container["livenessProbe"]["httpGet"]["port"] == container["startupProbe"]["httpGet"]["port"] == guard_port


def test_gpu_overlay_asks_for_a_gpu_and_cpu_overlay_does_not(rendered):
    gpu = server_container(rendered["gpu"])["resources"]
    cpu = server_container(rendered["cpu"])["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in json.dumps(cpu)
    for target in ("cpu", "gpu"):
        config = one(rendered[target], "ConfigMap")["data"]["MODEL_REPOSITORY"]
        assert config.startswith("s3://") and config.endswith(f"/{target}")


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_repository_and_credentials_come_from_config_and_secrets(rendered, target):
    """The initContainer reads the repository's URL and the S3 credentials; the server, which reads no S3 any
    more, gets neither, and keeps the admin key."""
    container = server_container(rendered[target])
    config = one(rendered[target], "ConfigMap")
    refs = {next(iter(r)): r[next(iter(r))]["name"] for r in pull_container(rendered[target])["envFrom"]}
    assert refs == {"configMapRef": config["metadata"]["name"], "secretRef": "triton-s3"}
    assert "--url=$(MODEL_REPOSITORY)" in pull_container(rendered[target])["command"]
    assert "envFrom" not in container and "$(MODEL_REPOSITORY)" not in json.dumps(container)
    env = {e["name"]: e for e in container["env"]}
    assert env["TRITON_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "triton-admin-key"
    # the same restricted APIs and header as `make serve` (serving/access.py)
    expected = access.restricted_args("$(TRITON_ADMIN_KEY)")
    assert [a for a in container["args"] if "restricted" in a] == expected


@pytest.mark.parametrize("target", ["cpu", "cpu-vnni", "gpu"])
def test_pods_serve_a_local_copy_pulled_by_an_init_container(rendered, target):
    """An initContainer of the server's image runs serving.pull (the published repository, checked against its
    PUBLISHED.json, renamed into place whole) into an emptyDir; tritonserver serves that folder, read-only,
    and reads nothing from S3 itself. Its flags are serving.pull's own."""
    from serving.pull import get_args_parser

    pod = one(rendered[target], "Deployment")["spec"]["template"]["spec"]
    init, server = pull_container(rendered[target]), server_container(rendered[target])
    assert init["image"] == server["image"] and init["command"][:3] == ["python3", "-m", "serving.pull"]
    pulled = get_args_parser().parse_args(init["command"][3:])
    assert pulled.url == "$(MODEL_REPOSITORY)" and pulled.wait > 0
    assert init["securityContext"] == server["securityContext"]  # non-root from the pod's, read-only root
    (mount,) = init["volumeMounts"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(volumes[mount["name"]]) == {"name", "emptyDir"}  # on the node's disk, lives as long as the pod
    assert pulled.to.parent == Path(mount["mountPath"])
    (served,) = [m for m in server["volumeMounts"] if m["name"] == mount["name"]]
    assert served.get("subPath") == pulled.to.name and served.get("readOnly") is True
    assert f"--model-repository={served['mountPath']}" in server["args"]
    assert [a for a in server["args"] if a.startswith("--model-repository")] == ["--model-repository=/models"]


@pytest.mark.parametrize("target", ["cpu", "cpu-vnni", "gpu"])
def test_headless_service_lets_grpc_clients_balance_per_request(rendered, target):
    """A ClusterIP Service balances connections, and a gRPC client holds one: triton-grpc-headless (no cluster
    IP) resolves to every ready pod, for clients with `dns:///` and round_robin. They reach the pods directly,
    so its one port is the container's gRPC port, and it selects the pods the ClusterIP Service selects."""
    headless = one(rendered[target], "Service", "triton-grpc-headless")["spec"]
    pod_labels = one(rendered[target], "Deployment")["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"]: p["containerPort"] for p in server_container(rendered[target])["ports"]}
    assert headless["clusterIP"] == "None" and "type" not in headless
    assert headless["selector"] == one(rendered[target], "Service", "triton")["spec"]["selector"]
    assert headless["selector"].items() <= pod_labels.items()
    (port,) = headless["ports"]
    assert (port["name"], port["targetPort"], port["appProtocol"]) == ("grpc", "grpc", "grpc")
    assert port["port"] == container_ports["grpc"]
    assert not headless.get("publishNotReadyAddresses")  # only ready pods: the supervisor's /ready decides


def test_every_server_keeps_model_control_behind_a_key(rendered):
    """The Deployment passes the restricted-API flags with the Secret's key, so serving.supervise adds no second
    pair; KServe's runtime passes none, and serving.supervise adds them (the Secret's key if there is one). Both
    give serving.supervise the optional Secret triton-inference-key, which puts inference behind a key of its own
    where the operator made one; no flag of theirs restricts inference already."""
    from serving.supervise import missing_restrictions, restrict_inference

    servers = {}
    for target, objects in rendered.items():
        for obj in objects:
            spec = obj.get("spec", {}).get("template", {}).get("spec", obj.get("spec", {}))
            for container in spec.get("containers", []):
                line = supervisor_command(container) + container.get("args", [])
                if "tritonserver" in line:
                    servers[target] = (line, {e["name"]: e for e in container.get("env", [])})
    assert set(servers) == {"cpu", "cpu-vnni", "gpu", "kserve"}
    for target, (line, env) in servers.items():
        assert line[:3] == ["python3", "-m", "serving.supervise"], target
        ref = env["TRITON_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("triton-admin-key", "key"), target
        server = line[line.index("tritonserver"):]
        assert missing_restrictions(server) == ([] if target != "kserve" else ["--http-restricted-api",
                                                                              "--grpc-restricted-protocol"]), target
        inference = env["TRITON_INFERENCE_KEY"]["valueFrom"]["secretKeyRef"]
        assert inference == {"name": "triton-inference-key", "key": "key", "optional": True}, target
        assert restrict_inference(server, "k") == [*server, *access.inference_restricted_args("k")], target
    assert servers["kserve"][1]["TRITON_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is True


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_selectors_pick_the_server_pods(rendered, target):
    objects = rendered[target]
    deployment = one(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [deployment["spec"]["selector"]["matchLabels"], one(objects, "Service", "triton")["spec"]["selector"],
                 one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                 one(objects, "PodMonitor")["spec"]["selector"]["matchLabels"]]
    for selector in selectors:
        assert selector and selector.items() <= labels.items()
    service_ports = {p["targetPort"] for p in one(objects, "Service", "triton")["spec"]["ports"]}
    # every port clients use, and Triton's metrics; the supervisor's health port is for the kubelet and the
    # PodMonitor, which reach the pods themselves
    assert service_ports == {p["name"] for p in server_container(objects)["ports"]} - {"health"}
    assert [(e["port"], e["path"]) for e in one(objects, "PodMonitor")["spec"]["podMetricsEndpoints"]] == [
        ("metrics", "/metrics"), ("health", "/metrics")]  # Triton's, the supervisor's
    hpa = one(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (hpa["kind"], hpa["name"]) == ("Deployment", deployment["metadata"]["name"])


@pytest.mark.parametrize("target", ["cpu", "cpu-vnni", "gpu"])
def test_only_labelled_clients_reach_inference_and_any_namespace_the_metrics(rendered, target):
    """The NetworkPolicy selects the server pods and admits http and grpc only from pods or namespaces labelled
    as clients (one HTTP body can kill Triton 2.51: docs/operations.md), Triton's metrics and the supervisor's
    health port (its probes, its /metrics: read only) from any namespace, for Prometheus; every port it names is
    one the server container declares. A peer selector must stay free of the base's own labels, which
    kustomize adds to matchLabels: a client would have to be labelled as the server."""
    objects = rendered[target]
    policy = one(objects, "NetworkPolicy")["spec"]
    labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items() and policy["policyTypes"] == ["Ingress"]
    declared = {p["name"] for p in server_container(objects)["ports"]}
    admitted = {}
    for rule in policy["ingress"]:
        for port in rule["ports"]:
            assert port["port"] in declared and port["protocol"] == "TCP"
            admitted[port["port"]] = rule["from"]
    assert set(admitted) == {"http", "grpc", "metrics", "health"} == declared
    client = {"key": "triton-image-classifier/client", "operator": "In", "values": ["true"]}
    assert admitted["http"] == admitted["grpc"] == [{"podSelector": {"matchExpressions": [client]}},
                                                     {"namespaceSelector": {"matchExpressions": [client]}}]
    assert admitted["metrics"] == admitted["health"] == [{"namespaceSelector": {}}]


def test_kserve_canary_and_v2_protocol(rendered):
    from serving.pull import KSERVE_FOLDER

    runtime = one(rendered["kserve"], "ServingRuntime")
    isvc = one(rendered["kserve"], "InferenceService")
    predictor = isvc["spec"]["predictor"]
    assert 0 < predictor["canaryTrafficPercent"] < 100
    assert predictor["model"]["runtime"] == runtime["metadata"]["name"]
    assert predictor["model"]["protocolVersion"] == "v2" and "v2" in runtime["spec"]["protocolVersions"]
    formats = {(f["name"], f["version"]) for f in runtime["spec"]["supportedModelFormats"]}
    assert (predictor["model"]["modelFormat"]["name"], predictor["model"]["modelFormat"]["version"]) in formats
    (container,) = runtime["spec"]["containers"]
    # where serving.pull, KServe's storage container here, puts it in the volume KServe mounts at /mnt/models
    assert f"--model-repository=/mnt/models/{KSERVE_FOLDER}" in container["args"]
    # KServe's default HTTP port is the supervisor's HTTP guard, Triton's own HTTP port on loopback behind it
    assert "--http-guard=0.0.0.0:8080" in container["command"] and "ports" not in container
    assert {"--http-address=127.0.0.1", "--http-port=8081"} <= set(container["args"])
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["command"][:3] == ["python3", "-m", "serving.supervise"]


def test_kserve_downloads_from_the_overlays_s3_endpoint_with_their_secret(rendered):
    """KServe's storage initializer takes the endpoint from the service account's annotations (else AWS over
    HTTPS) and the credentials from the Secret it lists: the endpoint and Secret of the Kubernetes overlays.
    The container meets the restricted Pod Security profile (seccomp included)."""
    from serving.publish import S3Location

    isvc = one(rendered["kserve"], "InferenceService")
    account = one(rendered["kserve"], "ServiceAccount")
    assert isvc["spec"]["predictor"]["serviceAccountName"] == account["metadata"]["name"]
    notes = account["metadata"]["annotations"]
    overlay = S3Location.parse(one(rendered["cpu"], "ConfigMap")["data"]["MODEL_REPOSITORY"])
    scheme, _, host = overlay.endpoint.partition("://")
    assert notes["serving.kserve.io/s3-endpoint"] == host
    assert notes["serving.kserve.io/s3-usehttps"] == ("1" if scheme == "https" else "0")
    secrets = {e["secretRef"]["name"] for e in pull_container(rendered["cpu"])["envFrom"] if "secretRef" in e}
    assert [s["name"] for s in account["secrets"]] == sorted(secrets)
    (container,) = one(rendered["kserve"], "ServingRuntime")["spec"]["containers"]
    assert container["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["runAsNonRoot"] is True


# KServe's default ClusterStorageContainer's formats (kserve/kserve config/storagecontainers/default.yaml), which
# KServe matches unanchored (Go's regexp.MatchString; pkg/apis/serving/v1alpha1/storage_container_types.go)
KSERVE_DEFAULT_PREFIXES = ("gs://", "s3://", "hdfs://", "webhdfs://", "hf://")
KSERVE_DEFAULT_REGEXES = (r"https://(.+?).blob.core.windows.net/(.+)", r"https://(.+?).file.core.windows.net/(.+)",
                          r"https?://(.+)/(.+)")


def test_kserve_pulls_the_publication_with_serving_pull_as_its_storage_container(rendered):
    """The InferenceService's storageUri has a scheme of its own, claimed by our ClusterStorageContainer alone
    (never s3://, nor any format of KServe's default one: two claims leave the choice to chance): KServe runs
    the runtime's image with serving.pull, appending the storageUri and /mnt/models, and the repository it
    puts there is where the runtime's --model-repository points. It reads the overlays' bucket and prefix
    from the endpoint and Secret KServe injects from the service account (no credentials of its own), waits
    for a publish in progress, and runs locked down like the Deployment's initContainer."""
    from serving.publication import STORAGE_URI_SCHEME, S3Location
    from serving.pull import get_args_parser, source_and_destination

    (storage,) = rendered["kserve-storage"]
    assert "namespace" not in storage["metadata"]  # cluster-scoped
    container = storage["spec"]["container"]
    (runtime,) = one(rendered["kserve"], "ServingRuntime")["spec"]["containers"]
    storage_uri = one(rendered["kserve"], "InferenceService")["spec"]["predictor"]["model"]["storageUri"]
    assert container["name"] == "storage-initializer" and container["image"] == runtime["image"]

    assert storage["spec"]["supportedUriFormats"] == [{"prefix": STORAGE_URI_SCHEME}]
    assert storage_uri.startswith(STORAGE_URI_SCHEME)
    assert not storage_uri.startswith(KSERVE_DEFAULT_PREFIXES), storage_uri
    assert not any(re.search(r, storage_uri) for r in KSERVE_DEFAULT_REGEXES), storage_uri

    assert container["command"][:3] == ["python3", "-m", "serving.pull"] and "args" not in container  # KServe's
    called = get_args_parser().parse_args([*container["command"][3:], storage_uri, "/mnt/models"])
    location, dest = source_and_destination(called)
    assert f"--model-repository={dest}" in runtime["args"] and called.wait > 0
    overlay = S3Location.parse(one(rendered["cpu"], "ConfigMap")["data"]["MODEL_REPOSITORY"])
    assert (location.bucket, location.prefix, location.endpoint) == (overlay.bucket, overlay.prefix, None)
    assert "envFrom" not in container and not [e for e in container.get("env", []) if e["name"].startswith("AWS_")]

    sc = container["securityContext"]
    assert runtime["securityContext"].items() <= sc.items()  # non-root, no escalation, no capabilities, seccomp
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]


# ---- the autoscaler's metric: HPA <- prometheus-adapter <- recording rule <- Triton -----------------

def recording_rules() -> dict[str, str]:
    groups = yaml.safe_load(RECORDING.read_text())["groups"]
    return {r["record"]: r["expr"] for g in groups for r in g["rules"] if "record" in r}


def adapter_rule(rendered) -> dict:
    config = yaml.safe_load(one(rendered["prometheus-adapter"], "ConfigMap")["data"]["config.yaml"])
    (rule,) = config["rules"]
    return rule


def test_adapter_rule_merges_rather_than_replaces_the_adapters_config(rendered):
    """kube-prometheus ships ConfigMap monitoring/adapter-config (the resourceRules behind metrics.k8s.io:
    `kubectl top`, CPU/memory HPAs), the Helm chart <release>-prometheus-adapter: ours replaces neither and holds
    only the rule; the Helm values carry the same rule under rules.custom, which the chart adds to its own."""
    config_map = one(rendered["prometheus-adapter"], "ConfigMap")
    assert config_map["metadata"]["name"] not in ("adapter-config", "prometheus-adapter")
    assert "prometheus-adapter" not in config_map["metadata"]["name"]
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    assert list(config) == ["rules"]  # no resourceRules/externalRules of ours to replace the cluster's
    values = yaml.safe_load((K8S / "prometheus-adapter" / "helm-values.yaml").read_text())
    assert values == {"rules": {"custom": config["rules"]}}


def test_hpa_metric_comes_from_a_recording_rule(rendered):
    rule = adapter_rule(rendered)
    series = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{.*\}", rule["seriesQuery"]).group(1)
    assert series in recording_rules(), f"{series} is not recorded in {RECORDING}"
    assert re.fullmatch(rule["name"]["matches"], series)
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}  # what a PodMonitor's targets carry
    for target in ("cpu", "gpu"):
        (metric,) = one(rendered[target], "HorizontalPodAutoscaler")["spec"]["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
        # the cluster's Prometheus records the same rule (PrometheusRule)
        groups = one(rendered[target], "PrometheusRule")["spec"]["groups"]
        assert [r["expr"] for g in groups for r in g["rules"] if r.get("record") == series] == [recording_rules()[series]]
    assert "model=" not in recording_rules()[series]  # any ensemble name, any model clients call


def test_prometheus_rule_ships_every_rule_of_deploy_monitoring(rendered):
    """The server overlays' PrometheusRule holds the groups of recording.yml and alerts.yml exactly (the
    committed file is what `make k8s-rule` writes now), and every job they select is one of the PodMonitor's."""
    from serving.monitor import K8S_RULE, k8s_rule

    groups = [g for name in ("recording.yml", "alerts.yml") for g in yaml.safe_load(
        (RECORDING.parent / name).read_text())["groups"]]
    assert K8S_RULE.read_text() == k8s_rule(), f"{K8S_RULE} is stale: make k8s-rule"
    exprs = " ".join(r["expr"] for g in groups for r in g["rules"])
    assert set(re.findall(r'\bjob\s*=~?\s*"([^"]*)"', exprs)) == {"triton", "triton-supervisor"}
    for target in ("cpu", "cpu-vnni", "gpu"):
        assert one(rendered[target], "PrometheusRule")["spec"]["groups"] == groups
        endpoints = one(rendered[target], "PodMonitor")["spec"]["podMetricsEndpoints"]
        for endpoint, job in zip(endpoints, ("triton", "triton-supervisor"), strict=True):
            assert {"action": "replace", "targetLabel": "job", "replacement": job} in endpoint["relabelings"]


def adapter_query(rule: dict, namespace: str, pod: str) -> str:
    """The PromQL prometheus-adapter sends for one pod (its template, filled in as the adapter does)."""
    series = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{.*\}", rule["seriesQuery"]).group(1)
    return (rule["metricsQuery"].replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", f'namespace="{namespace}",pod=~"{pod}"')
            .replace("<<.GroupBy>>", "pod"))


@pytest.mark.slow
def test_probes_and_hpa_metric_answer_from_a_live_server(rendered, tiny_artifacts, tmp_path, photos, moto):
    """The Deployment's command lines, run here on loopback: the initContainer's pulls a repository published
    to S3 (moto's server) into the pod's volume, and the server's (serving.supervise over tritonserver, the admin
    key from the environment) serves that folder: its probes answer 200 on the ports their names point to, and a
    stub killed with SIGKILL turns readiness to 503 until the supervisor has reloaded its model through
    the key-guarded API. The http port is the supervisor's HTTP guard: a body that would kill Triton 2.51 is
    answered 400, no restart. A real Prometheus scraping it (with the namespace/pod labels a PodMonitor adds)
    records the rule, and the adapter's query for that pod returns a number (its client classifying through
    the guard)."""
    if shutil.which("prometheus") is None:
        pytest.skip("no prometheus binary (make prometheus-setup, as root)")
    from build.repository.spec import DeploymentSpec
    from build.repository.writer import write_repository
    from serving.server import Ports, TritonServer, free_port
    from serving.stubs import serving_stubs

    repo = tmp_path / "model_repository"
    write_repository(DeploymentSpec(artifacts=str(tiny_artifacts)), "python-onnxruntime", repo, "tests")
    served = pulled_volume(rendered["cpu"], repo, f"s3://{moto}/k8s/image_classifier/cpu", tmp_path / "volume")
    container = server_container(rendered["cpu"])
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    ports, key = Ports.free(), "k8s-test-key"
    local = {8000: free_port(), 8080: ports.http, 8001: ports.grpc, 8002: ports.metrics, 8003: free_port()}
    command = loopback_command(container, served, local, key)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_ADMIN_KEY": key, "HOME": str(tmp_path)}
    with open(tmp_path / "pod.log", "ab") as log:
        pod = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)

    def probe(name: str) -> int:
        return http_probe(container, name, local)

    try:
        for _ in range(600):
            if probe("startupProbe") == 200 or pod.poll() is not None:
                break
            time.sleep(0.2)
        assert [probe(p) for p in ("startupProbe", "livenessProbe", "readinessProbe")] == [200, 200, 200], \
            (tmp_path / "pod.log").read_text(errors="replace")[-3000:]
        with urllib.request.urlopen(f"http://127.0.0.1:{local[8003]}/status", timeout=5) as answer:
            server_pid = json.load(answer)["server_pid"]
        os.kill(serving_stubs(server_pid, "classifier", 1)[0].pid, signal.SIGKILL)
        codes = []
        for _ in range(1200):
            codes.append(probe("readinessProbe"))
            if 503 in codes and codes[-1] == 200:
                break
            time.sleep(0.05)
        assert 503 in codes and codes[-1] == 200, (tmp_path / "pod.log").read_text(errors="replace")[-3000:]
        assert probe("livenessProbe") == 200
        # the PodMonitor's second endpoint: the supervisor's /metrics counts that crash
        supervisor = one(rendered["cpu"], "PodMonitor")["spec"]["podMetricsEndpoints"][1]
        with urllib.request.urlopen(f"http://127.0.0.1:{local[named[supervisor['port']]]}{supervisor['path']}",
                                    timeout=5) as answer:
            assert 'triton_supervisor_stub_crashes_total{model="classifier"} 1.0' in answer.read().decode()
        # the container's http port is the supervisor's guard: the body that kills Triton 2.51 is answered 400
        from tests.serving.test_http_guard import check_guarded_server

        check_guarded_server(f"127.0.0.1:{local[named['http']]}", f"http://127.0.0.1:{local[8003]}/status",
                             photos["chelsea"])
        _hpa_metric_from_prometheus(rendered, local, photos, tmp_path)  # its client classifies through the guard
    finally:
        pod.send_signal(signal.SIGTERM)
        code = pod.wait(120)
    assert code == 0, (tmp_path / "pod.log").read_text(errors="replace")[-3000:]


def http_probe(container: dict, name: str, local: dict[int, int]) -> int:
    """The HTTP status the container's probe `name` gets on loopback, its port (a number, or a name the container
    declares) standing in as `local` maps it; 0 when nothing answers."""
    get = container[name]["httpGet"]
    port = get["port"]
    if isinstance(port, str):
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{local[port]}{get['path']}", timeout=5) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def loopback_command(container: dict, replaced: dict[str, str], local: dict[int, int], key: str = "",
                     here: bool = True) -> list[str]:
    """A container's command line on this host's loopback: the arguments in `replaced` replaced, every address on
    loopback and each port its stand-in in `local`; with `here`, python3 this interpreter and tritonserver the
    launcher, else both as the image has them (a container on the host's network)."""
    from serving.server import TritonServer

    launcher, python = ["tritonserver"], ["python3"]
    if here:
        launcher, python = TritonServer(ROOT).command(), [sys.executable]
        launcher = launcher[:next(i for i, a in enumerate(launcher) if a.startswith("--"))]
    command = []
    for arg in container["command"] + container.get("args", []):
        arg = replaced.get(arg, arg).replace("$(TRITON_ADMIN_KEY)", key)
        arg = arg.replace("=0.0.0.0", "=127.0.0.1")
        name, _, value = arg.partition("=")
        if name.endswith("-port") and value.isdigit():
            arg = f"{name}={local[int(value)]}"
        elif re.fullmatch(r"127\.0\.0\.1:\d+", value):  # --http-guard=host:port
            arg = f"{name}=127.0.0.1:{local[int(value.rsplit(':', 1)[1])]}"
        command += launcher if arg == "tritonserver" else python if arg == "python3" else [arg]
    return command


@pytest.mark.slow
def test_kserve_runtime_serves_through_its_guard(rendered, tiny_artifacts, tmp_path, photos):
    """The ServingRuntime's command line, run here on loopback: KServe's HTTP port is the supervisor's guard, its
    probes answer 200 through it, the project's client classifies through it, and a body that would kill
    Triton 2.51 is answered 400 without the server restarting; SIGTERM ends it with code 0."""
    from build.repository.spec import DeploymentSpec
    from build.repository.writer import write_repository
    from serving.server import free_port
    from tests.serving.test_http_guard import check_guarded_server

    repo = tmp_path / "model_repository"
    write_repository(DeploymentSpec(artifacts=str(tiny_artifacts)), "python-onnxruntime", repo, "tests")
    (container,) = one(rendered["kserve"], "ServingRuntime")["spec"]["containers"]
    local = {port: free_port() for port in (8080, 8081, 9000, 8002, 8003)}
    repository = next(a for a in container["args"] if a.startswith("--model-repository="))
    command = loopback_command(container, {repository: f"--model-repository={repo}"}, local)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    env.pop("TRITON_ADMIN_KEY", None)  # the Secret is optional: the supervisor makes a key
    with open(tmp_path / "pod.log", "ab") as log:
        pod = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)

    def probe(name: str) -> int:
        return http_probe(container, name, local)

    try:
        for _ in range(600):  # readiness follows Triton's once the watchdog has seen the stubs
            if probe("startupProbe") == probe("readinessProbe") == 200 or pod.poll() is not None:
                break
            time.sleep(0.2)
        assert [probe(p) for p in ("startupProbe", "livenessProbe", "readinessProbe")] == [200, 200, 200], \
            (tmp_path / "pod.log").read_text(errors="replace")[-3000:]
        check_guarded_server(f"127.0.0.1:{local[8080]}", f"http://127.0.0.1:{local[8003]}/status", photos["coffee"])
    finally:
        pod.send_signal(signal.SIGTERM)
        code = pod.wait(120)
    assert code == 0, (tmp_path / "pod.log").read_text(errors="replace")[-3000:]


def pulled_volume(objects: list[dict], repo: Path, url: str, volume: Path) -> dict[str, str]:
    """Publish `repo` to `url` and run the initContainer's command with the pod's volume at `volume`; the
    server's --model-repository argument with the folder it mounts from that volume in place of the mount."""
    from serving.publication import S3Location
    from serving.publish import publish

    publish(repo, S3Location.parse(url), create_bucket=True, progress=False)
    init, server = pull_container(objects), server_container(objects)
    (mount,) = init["volumeMounts"]
    command = [sys.executable if a == "python3" else a.replace("$(MODEL_REPOSITORY)", url)
               .replace(mount["mountPath"], str(volume)) for a in init["command"]]
    done = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    (served,) = [m for m in server["volumeMounts"] if m["name"] == mount["name"]]
    folder = volume / served["subPath"]
    assert (folder / "BUILD.json").read_bytes() == (repo / "BUILD.json").read_bytes()
    return {f"--model-repository={served['mountPath']}": f"--model-repository={folder}"}


def _hpa_metric_from_prometheus(rendered, local: dict[int, int], photos, tmp_path: Path) -> None:
    """The PodMonitor's endpoint has Triton's metrics; Prometheus records the rule the adapter asks for."""
    from clients.client import ImageClassifierClient
    from serving.monitor import Prometheus
    from serving.server import free_port

    container = server_container(rendered["cpu"])
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    get = one(rendered["cpu"], "PodMonitor")["spec"]["podMetricsEndpoints"][0]
    with urllib.request.urlopen(f"http://127.0.0.1:{local[named[get['port']]]}{get['path']}") as answer:
        assert b"nv_inference_queue_duration_us" in answer.read()

    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(RECORDING)],
              "scrape_configs": [{"job_name": "triton", "static_configs": [{
                  "targets": [f"127.0.0.1:{local[8002]}"],
                  "labels": {"namespace": "triton", "pod": "triton-0"}}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    query = adapter_query(adapter_rule(rendered), "triton", "triton-0")
    images = list(photos.values())
    with Prometheus(tmp_path / "prometheus.yml", tmp_path / "data", free_port(), tmp_path / "prometheus.log") \
            as prometheus, ImageClassifierClient(f"127.0.0.1:{local[8000]}", "http") as client:
        answer = []
        for _ in range(120):  # bounded: a few requests, then ask again
            for i in range(4):
                client.classify([images[i % len(images)]] * 2, top_k=1)
            answer = prometheus.query(query)
            if answer and math.isfinite(float(answer[0]["value"][1])):
                break
        assert answer, f"no value for {query}; see {tmp_path}/prometheus.log"
        assert answer[0]["metric"] == {"pod": "triton-0"}
        value = float(answer[0]["value"][1])
        assert math.isfinite(value) and value >= 0, value  # seconds of queue per request: any machine's figure
