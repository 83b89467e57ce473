"""Model quality: the build's reference, the served classifier's quality metrics, and the drift and
confidence alerts firing in a real Prometheus on shifted streams (and not on the held-out mix)."""
from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from build.repository import quality
from build.repository.templates import quality_metrics as qm
from tests.deploy.test_monitoring import RULES, active_alerts, loopback_config, promtool, rules  # noqa: F401 (fixture)

QUALITY_ALERTS = ("ModelPredictionDrift", "ModelConfidenceDrop")


# ---- the reference ---------------------------------------------------------------------------------

def test_reference_of_a_few_classes_tracks_them_all():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.05, 0.9, 0.05]])
    ref = quality.reference_from_probabilities(probabilities, ["a", "b", "c"], "four images")
    assert ref["tracked"] == [0, 1, 2] and not ref["has_other"]
    assert ref["class_share"] == {"0": 0.25, "1": 0.5, "2": 0.25}
    assert ref["labels"] == {"0": "a", "1": "b", "2": "c"}
    shares = dict(zip(ref["confidence_buckets"], ref["confidence_share"]))
    assert shares[0.4] == 0.25 and shares[0.5] == 0.25 and shares[0.7] == 0.5 and shares[0.8] == 0.75
    assert shares[0.9] == 1.0 and math.isclose(ref["confidence_mean"], (0.7 + 0.8 + 0.4 + 0.9) / 4)
    assert ref["low_confidence_bound"] == 0.6  # the largest bound with at most 25 % of the answers under it
    assert quality.low_confidence_bound([0.3] * len(qm.CONFIDENCE_BUCKETS)) == qm.CONFIDENCE_BUCKETS[0]
    assert ref["output"] == "probabilities" and ref["images"] == 4


def test_reference_of_many_classes_tracks_the_most_frequent_answers_and_counts_the_rest_as_other():
    classes = 1000
    answers = np.repeat(np.arange(30), np.arange(30, 0, -1))  # class 0 most often, class 29 least
    probabilities = np.full((len(answers), classes), 0.1 / classes)
    probabilities[np.arange(len(answers)), answers] = 0.9
    ref = quality.reference_from_probabilities(probabilities, [f"c{i}" for i in range(classes)], "test")
    assert ref["tracked"] == list(range(qm.MAX_TRACKED_CLASSES)) and ref["has_other"]
    rest = np.arange(qm.MAX_TRACKED_CLASSES, 30)
    assert math.isclose(ref["class_share"][qm.OTHER], (30 - rest).sum() / len(answers))
    assert math.isclose(sum(ref["class_share"].values()), 1.0)
    assert len(ref["class_share"]) == qm.MAX_TRACKED_CLASSES + 1


def test_reference_refuses_what_is_not_a_batch_of_probabilities():
    with pytest.raises(ValueError, match="probabilities"):
        quality.reference_from_probabilities(np.zeros((0, 3)), ["a", "b", "c"], "none")
    with pytest.raises(ValueError, match="labels"):
        quality.reference_from_probabilities(np.ones((2, 3)) / 3, ["a", "b"], "two")


def test_python_classifiers_get_a_reference_and_the_metrics_code(tiny_artifacts, tmp_path):
    from build.repository.spec import DeploymentSpec
    from build.repository.writer import write_repository

    for pipeline, backend in (("ensemble", "python-onnxruntime"), ("fused", "python-onnxruntime"),
                              ("ensemble", "onnxruntime")):
        repo = tmp_path / f"{pipeline}-{backend}"
        write_repository(DeploymentSpec(artifacts=str(tiny_artifacts), pipeline=pipeline), backend, repo, "tests")
        version = repo / "classifier" / "1"
        if backend == "onnxruntime":  # no python step after the classifier: no metrics (ModelQualityMetricsMissing)
            assert not (version / qm.REFERENCE_JSON).exists()
            continue
        ref = qm.load_reference(version / qm.REFERENCE_JSON)
        assert ref["images"] == 240 and "6 bundled photos" in ref["description"]
        assert math.isclose(sum(ref["class_share"].values()), 1.0)
        assert (version / "quality_metrics.py").read_bytes() == Path(qm.__file__).read_bytes()
        # the served copy needs nothing of the project (the repository runs on another server as it is)
        code = ("import sys; sys.modules['build'] = sys.modules['common'] = None; "
                "import quality_metrics as q; print(q.load_reference(q.REFERENCE_JSON)['images'])")
        alone = subprocess.run([sys.executable, "-c", code],
                               cwd=version, capture_output=True, text=True, timeout=60)
        assert alone.returncode == 0 and alone.stdout.strip() == "240", alone.stderr


# ---- names the rules and the served code agree on ----------------------------------------------------

def test_the_rules_read_the_series_the_served_classifier_writes():
    names = {qm.PREDICTIONS, qm.CONFIDENCE, qm.REFERENCE_CLASS_SHARE, qm.REFERENCE_CONFIDENCE_SHARE,
             qm.REFERENCE_CONFIDENCE_MEAN, qm.REFERENCE_IMAGES, qm.REFERENCE_LOW_CONFIDENCE_BOUND}
    dashboard = (RULES.parent / "dashboard.json").read_text()
    text = (RULES / "recording.yml").read_text() + (RULES / "alerts.yml").read_text() + dashboard
    used = set(re.findall(r"model_quality_[a-z0-9_]+", text))
    histogram = {f"{qm.CONFIDENCE}_{s}" for s in ("bucket", "sum", "count")}
    assert used - {"model_quality_"} <= names | histogram, used - names - histogram
    # the live and the reference low-confidence shares read the version's own bound, no fixed one
    exprs = " ".join(r["expr"] for r in rules("recording.yml"))
    assert not re.search(r"\ble=\"", exprs)
    assert exprs.count(qm.REFERENCE_LOW_CONFIDENCE_BOUND) == 2


# ---- a real server: what it counts is what the model answered ------------------------------------------

def png(crop: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(crop).save(out, format="PNG")
    return out.getvalue()


def held_out_images(artifacts: Path) -> list[bytes]:
    """The build's default held-out views (the reference's images) as PNG files, in a fixed shuffled order."""
    from build.precision.imagesets import held_out_set
    from common.preprocessing import PreprocessConfig

    crops = held_out_set(PreprocessConfig.load(artifacts / "preprocess.json")).crops
    return [png(crops[i]) for i in np.random.default_rng(0).permutation(len(crops))]


def served_answers(artifacts: Path, images: list[bytes]) -> np.ndarray:
    """What the served pipeline answers for `images`: the same preprocessing and session, in process."""
    from common.onnxsession import cpu_session
    from common.preprocessing import PreprocessConfig, load_batch

    session = cpu_session(str(artifacts / "model.onnx"))
    batch = load_batch(images, PreprocessConfig.load(artifacts / "preprocess.json"))
    return session.run(["probabilities"], {"images": batch})[0]


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as answer:
        lines = answer.read().decode().splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines
            if line.startswith("model_quality_")}


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["ensemble", "fused"])
def test_served_classifier_counts_its_answers_and_exports_its_reference(tiny_artifacts, tmp_path, pipeline):
    from build.repository.spec import DeploymentSpec
    from build.repository.writer import write_repository
    from clients.client import ClassificationError, ImageClassifierClient
    from serving.server import TritonServer

    repo = tmp_path / "model_repository"
    write_repository(DeploymentSpec(artifacts=str(tiny_artifacts), pipeline=pipeline), "python-onnxruntime", repo,
                     "tests")
    ref = qm.load_reference(repo / "classifier" / "1" / qm.REFERENCE_JSON)
    images = held_out_images(tiny_artifacts)[:96]
    probabilities = served_answers(tiny_artifacts, images)
    with TritonServer(repo, log_file=tmp_path / "tritonserver.log") as server, \
            ImageClassifierClient(server.http_url, "http") as client:
        for start in range(0, len(images), 8):
            client.classify(images[start:start + 8], top_k=1)
        with pytest.raises(ClassificationError):  # a bad request is not counted
            client.classify([images[0], b"not an image"], top_k=1)
        where = 'model="classifier",version="1"'
        for _ in range(200):  # counted off the request path: until the count stops short of every answer
            series = scrape(server.metrics_url)
            if series[f"{qm.CONFIDENCE}_count{{{where}}}"] >= len(images):
                break
            time.sleep(0.05)
    top1 = probabilities.argmax(axis=1)
    for c in ref["tracked"]:
        key = f'{qm.PREDICTIONS}{{class="{c}",label="{ref["labels"][str(c)]}",{where}}}'
        assert series[key] == np.sum(top1 == c), key
        share = f'{qm.REFERENCE_CLASS_SHARE}{{class="{c}",label="{ref["labels"][str(c)]}",{where}}}'
        assert series[share] == pytest.approx(ref["class_share"][str(c)])
    confidence = probabilities.max(axis=1)
    assert series[f"{qm.CONFIDENCE}_count{{{where}}}"] == len(images)
    assert series[f"{qm.CONFIDENCE}_sum{{{where}}}"] == pytest.approx(confidence.sum(), rel=1e-5)
    bound = ref["low_confidence_bound"]
    low = qm.bucket_label(bound)
    assert series[f'{qm.CONFIDENCE}_bucket{{{where},le="{low}"}}'] == np.sum(confidence <= bound)
    assert series[f'{qm.REFERENCE_CONFIDENCE_SHARE}{{le="{low}",{where}}}'] == pytest.approx(
        ref["confidence_share"][ref["confidence_buckets"].index(bound)])
    assert series[f'{qm.REFERENCE_LOW_CONFIDENCE_BOUND}{{le="{low}",{where}}}'] == bound
    assert series[f"{qm.REFERENCE_IMAGES}{{{where}}}"] == ref["images"]


# ---- a real Prometheus: the committed alerts fire on shifted streams -----------------------------------

def short_window_rules(tmp_path: Path) -> list[str]:
    """The committed rule files with the quality rules' 30-minute windows cut to 20 s and the quality
    alerts' `for` to 3 s. The alert expressions are the committed ones, unchanged."""
    out = []
    for name in ("recording.yml", "alerts.yml"):
        doc = yaml.safe_load((RULES / name).read_text())
        for group in doc["groups"]:
            for rule in group["rules"]:
                if group["name"] == "model-quality-recording":
                    rule["expr"] = rule["expr"].replace("[30m]", "[20s]")
                if rule.get("alert") in QUALITY_ALERTS:
                    rule["for"] = "3s"
        path = tmp_path / name
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        out.append(str(path))
    committed = {r["alert"]: r["expr"] for r in rules("alerts.yml") if "alert" in r}
    overridden = {r["alert"]: r["expr"] for g in yaml.safe_load(Path(out[1]).read_text())["groups"]
                  for r in g["rules"] if "alert" in r}
    assert overridden == committed
    return out


def alert_states(prometheus_url: str) -> dict[str, set[str]]:
    """alert name -> the states ('pending', 'firing') it is in now, for the classifier."""
    states: dict[str, set[str]] = {}
    for alert in active_alerts(prometheus_url):
        states.setdefault(alert["labels"]["alertname"], set()).add(alert["state"])
    return states


def washed_out(image: bytes, colour: tuple[float, float, float], keep: float = 0.05) -> bytes:
    """A degraded image: `keep` of its contrast left around `colour` (0-1 RGB), like fog."""
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), dtype=np.float32)
    return png(np.clip(pixels * keep + np.array(colour) * 255 * (1 - keep), 0, 255).astype(np.uint8))


def sharpened(artifacts: Path, out: Path, factor: float = 3.0) -> Path:
    """The tiny classifier with its weights times `factor`: the same answers, given with more confidence
    (the tiny model's own answers hover around 0.5, too close to the low-confidence bound to tell a
    confident stream from a degraded one)."""
    import shutil

    import onnx
    from onnx import numpy_helper

    shutil.copytree(artifacts, out)
    model = onnx.load(out / "model.onnx")
    for init in model.graph.initializer:
        if init.name == "W":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, "W"))
    onnx.save(model, out / "model.onnx")
    return out


def evaluations(prometheus_url: str) -> float:
    """How many times Prometheus has evaluated the quality alerts (its own rule-group counter)."""
    with urllib.request.urlopen(f"{prometheus_url}/metrics", timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith("prometheus_rule_group_iterations_total{") and "model-quality-alerts" in line:
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError("Prometheus reports no evaluation of the model-quality-alerts group")


def value(prometheus, expr: str) -> float:
    result = prometheus.query(expr)
    return float(result[0]["value"][1]) if result else math.nan


@pytest.mark.slow
def test_shifted_streams_fire_the_quality_alerts_and_the_held_out_mix_does_not(promtool, tiny_artifacts,  # noqa: F811
                                                                               tmp_path):
    from build.repository.spec import DeploymentSpec
    from build.repository.writer import write_repository
    from clients.client import ImageClassifierClient
    from serving.monitor import Prometheus, scrape_target
    from serving.server import TritonServer, free_port

    from common.preprocessing import PreprocessConfig

    artifacts = sharpened(tiny_artifacts, tmp_path / "artifacts")
    repo = tmp_path / "model_repository"
    write_repository(DeploymentSpec(artifacts=str(artifacts)), "python-onnxruntime", repo, "tests")
    ref = qm.load_reference(repo / "classifier" / "1" / qm.REFERENCE_JSON)
    images = held_out_images(artifacts)
    probabilities = served_answers(artifacts, images)
    top1, confident = probabilities.argmax(axis=1), probabilities.max(axis=1) > ref["low_confidence_bound"]
    # the one-class stream: the confidently answered views of the least frequent class of the reference that
    # has 10 such views or more (confident, so that only the class distribution shifts)
    counts = np.bincount(top1[confident], minlength=ref["num_classes"])
    shifted_class = min((c for c in range(ref["num_classes"]) if counts[c] >= 10),
                        key=lambda c: ref["class_share"][str(c)])
    one_class = [image for image, c, sure in zip(images, top1, confident) if c == shifted_class and sure]
    # the degraded stream: the views washed out to 5 % contrast around the model's mean colour
    degraded = [washed_out(image, PreprocessConfig.load(artifacts / "preprocess.json").mean) for image in images[:64]]
    assert 1 - ref["class_share"][str(shifted_class)] > 0.25  # a distance the alert's threshold can see

    tvd, low = "quality:class_drift_tvd:ratio30m", "quality:low_confidence_share:ratio30m"
    with TritonServer(repo, log_file=tmp_path / "tritonserver.log") as server, \
            ImageClassifierClient(server.http_url, "http") as client:
        config = loopback_config(tmp_path, scrape_target({"metrics": server.metrics_url}))
        doc = yaml.safe_load(config.read_text())
        doc["rule_files"] = short_window_rules(tmp_path)
        config.write_text(yaml.safe_dump(doc))
        with Prometheus(config, tmp_path / "data", free_port(), tmp_path / "prometheus.log") as prometheus:
            rng = np.random.default_rng(1)

            def send(stream: list[bytes]) -> None:
                client.classify([stream[i] for i in rng.integers(0, len(stream), 8)], top_k=1)

            # 1. the held-out images in their natural mix, until the quality alerts were evaluated 30 times
            #    with 100 answers or more in the window: neither is ever pending or firing, and the
            #    distances stay under the thresholds
            seen, distances, first = set(), [], None
            phases = [("held-out mix", time.time())]
            for _ in range(20000):
                send(images)
                if value(prometheus, "quality:predictions:increase30m") >= 100:
                    first = evaluations(prometheus.url) if first is None else first
                    distances.append((value(prometheus, tvd), value(prometheus, f"{low} - on (job, model, "
                                                                    "version) quality:reference_low_confidence_share")))
                states = alert_states(prometheus.url)
                seen |= {a for a in QUALITY_ALERTS if states.get(a)}
                if first is not None and evaluations(prometheus.url) - first >= 30:
                    break
            assert first is not None and evaluations(prometheus.url) - first >= 30, \
                f"the window never held 100 answers for 30 evaluations; see {tmp_path}"
            assert not seen, f"{seen} pending or firing on the held-out mix; distances {distances}"
            assert all(d < 0.25 and c < 0.2 for d, c in distances), distances

            # 2. one class only, answered confidently: ModelPredictionDrift fires, ModelConfidenceDrop does not
            phases.append((f"class {shifted_class} only", time.time()))
            start = evaluations(prometheus.url)
            while evaluations(prometheus.url) - start < 120:
                send(one_class)
                if "firing" in alert_states(prometheus.url).get("ModelPredictionDrift", set()):
                    break
            states = alert_states(prometheus.url)
            assert "firing" in states.get("ModelPredictionDrift", set()), \
                f"no drift alert on class {shifted_class} only: distance {value(prometheus, tvd)}"
            assert not states.get("ModelConfidenceDrop"), states

            # 3. washed-out images: ModelConfidenceDrop fires
            phases.append(("washed-out", time.time()))
            start = evaluations(prometheus.url)  # bounded by rule evaluations, not by sends: a fast machine
            while evaluations(prometheus.url) - start < 120:  # sent 3000 before the alert's `for` had passed
                send(degraded)
                if "firing" in alert_states(prometheus.url).get("ModelConfidenceDrop", set()):
                    break
            assert "firing" in alert_states(prometheus.url).get("ModelConfidenceDrop", set()), \
                f"no confidence alert on washed-out images: low-confidence share {value(prometheus, low)}"
            if os.environ.get("DRIFT_PLOT"):  # the figure of docs/results/2026-12-02-model-quality.md
                firing = evaluations(prometheus.url)
                while evaluations(prometheus.url) - firing < 5:  # a few evaluations of the firing state
                    send(degraded)
                plot_drift(prometheus.url, phases, time.time(), Path(os.environ["DRIFT_PLOT"]))


def query_range(prometheus_url: str, expr: str, start: float, end: float) -> list[tuple[float, float]]:
    url = f"{prometheus_url}/api/v1/query_range?" + urllib.parse.urlencode(
        {"query": expr, "start": start, "end": end, "step": 1})
    with urllib.request.urlopen(url, timeout=10) as answer:
        result = json.load(answer)["data"]["result"]
    return [(float(t), float(v)) for t, v in result[0]["values"]] if result else []


def plot_drift(prometheus_url: str, phases: list[tuple[str, float]], end: float, out: Path) -> None:
    """The quality series and alert states the live test saw, one panel each, the phases shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = phases[0][1]
    panels = [
        ("prediction drift (total variation)", [("live vs reference", "quality:class_drift_tvd:ratio30m")], 0.25),
        ("low-confidence share (top-1 at or below the reference's bound)",
         [("live", "quality:low_confidence_share:ratio30m"), ("reference", "quality:reference_low_confidence_share")],
         None),
        ("alerts firing", [(a, f'{1 - 0.1 * i} * ALERTS{{alertname="{a}", alertstate="firing"}}')
                           for i, a in enumerate(QUALITY_ALERTS)], None),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 7), sharex=True)
    for ax, (title, series, threshold) in zip(axes, panels):
        for label, expr in series:
            points = query_range(prometheus_url, expr, start, end)
            ax.plot([t - start for t, _ in points], [v for _, v in points], label=label)
        if threshold is not None:
            ax.axhline(threshold, color="red", linestyle="--", linewidth=1, label=f"alert threshold {threshold}")
        for (name, begin), nxt in zip(phases, [p[1] for p in phases[1:]] + [end]):
            ax.axvspan(begin - start, nxt - start, alpha=0.08 * (1 + phases.index((name, begin)) % 2), color="grey")
            if ax is axes[0]:
                ax.text(begin - start + 1, 0.95, name, transform=ax.get_xaxis_transform(), va="top", fontsize=8)
        ax.set_title(title, fontsize=10)
        if title == "alerts firing":
            ax.set_ylim(-0.1, 1.1)
        ax.legend(fontsize=8, loc="center left")
    axes[-1].set_xlabel("seconds (quality windows cut to 20 s, alerts' for: 3 s)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
