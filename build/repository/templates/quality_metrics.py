"""What the served classifier answers, as Prometheus metrics: the distribution of predicted classes and of
top-1 confidence, per model and version, next to the reference the build recorded for that version.

Copied next to the python classifier models' model.py by `python -m build.engines` (source:
build/repository/templates/quality_metrics.py), with the version's `quality_reference.json`
(build/repository/quality.py writes it). numpy and the standard library only; the python backend's
`triton_python_backend_utils` is passed in, so the build imports this file too (names, bucketing).

Series (Triton serves them on its metrics endpoint; labels `model`, `version`):
    model_quality_predictions_total{class, label}             counter: answers by predicted class
    model_quality_top1_confidence_{bucket{le}, sum, count}     histogram: top-1 probability of each answer
    model_quality_reference_class_share{class, label}          gauge: the reference's share of each class
    model_quality_reference_top1_confidence_share{le}          gauge: the reference's share with top-1 <= le
    model_quality_reference_top1_confidence_mean               gauge
    model_quality_reference_images                             gauge: how many images the reference saw
    model_quality_reference_low_confidence_bound{le}           gauge: the bound "low confidence" means for
                                                               this version (value and `le` both)
`class` is a class index for the classes the reference tracks (all of them up to MAX_TRACKED_CLASSES,
else the reference's most frequent answers) and OTHER for every other class, so a version has at most
MAX_TRACKED_CLASSES + 1 class series whatever its number of classes (docs/operations.md).
"""
import json
import os
import queue
import threading

import numpy as np

REFERENCE_JSON = "quality_reference.json"
MAX_TRACKED_CLASSES = 20
OTHER = "other"
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
# "Low confidence" is relative to the reference: at or below the largest bucket bound under which the
# reference had at most this share of its answers (its lower quartile, to a bucket), per version.
LOW_CONFIDENCE_REFERENCE_SHARE = 0.25

PREDICTIONS = "model_quality_predictions_total"
CONFIDENCE = "model_quality_top1_confidence"
REFERENCE_CLASS_SHARE = "model_quality_reference_class_share"
REFERENCE_CONFIDENCE_SHARE = "model_quality_reference_top1_confidence_share"
REFERENCE_CONFIDENCE_MEAN = "model_quality_reference_top1_confidence_mean"
REFERENCE_IMAGES = "model_quality_reference_images"
REFERENCE_LOW_CONFIDENCE_BOUND = "model_quality_reference_low_confidence_bound"


def bucket_label(bound: float) -> str:
    """A histogram bound as Triton writes it in `le` (and as the reference gauges carry it)."""
    return f"{bound:g}"


def load_reference(path):
    with open(path) as f:
        reference = json.load(f)
    for key in ("output", "tracked", "class_share", "confidence_buckets", "confidence_share", "confidence_mean",
                "images", "low_confidence_bound"):
        if key not in reference:
            raise ValueError(f"{path}: no {key!r}; rebuild the repository (make engines)")
    return reference


class QualityMetrics:
    """The metrics of one classifier version. `record(probabilities)` after each model call: one counter
    increment per distinct predicted class and one histogram observation per answer."""

    def __init__(self, pb_utils, model, version, reference_path):
        self.reference = load_reference(reference_path)
        labels = {"model": model, "version": str(version)}
        tracked = [int(c) for c in self.reference["tracked"]]
        names = self.reference.get("labels", {})
        self.classes = [str(c) for c in tracked] + ([OTHER] if self.reference.get("has_other") else [])
        self.bucket_of = {c: i for i, c in enumerate(tracked)}
        self.other_bucket = len(tracked) if self.reference.get("has_other") else None
        self.families = [
            pb_utils.MetricFamily(name=n, description=d, kind=k) for n, d, k in (
                (PREDICTIONS, "answers by predicted class (tracked classes; the rest as class=other)",
                 pb_utils.MetricFamily.COUNTER),
                (CONFIDENCE, "top-1 probability of each answer", pb_utils.MetricFamily.HISTOGRAM),
                (REFERENCE_CLASS_SHARE, "share of each class in the build's reference answers",
                 pb_utils.MetricFamily.GAUGE),
                (REFERENCE_CONFIDENCE_SHARE, "share of the build's reference answers with top-1 probability <= le",
                 pb_utils.MetricFamily.GAUGE),
                (REFERENCE_CONFIDENCE_MEAN, "mean top-1 probability of the build's reference answers",
                 pb_utils.MetricFamily.GAUGE),
                (REFERENCE_IMAGES, "images the build's reference was computed from", pb_utils.MetricFamily.GAUGE),
                (REFERENCE_LOW_CONFIDENCE_BOUND, "top-1 probability at or below which an answer is low-confidence",
                 pb_utils.MetricFamily.GAUGE))]
        predictions, confidence, class_share, confidence_share, confidence_mean, images, low_bound = self.families

        def class_labels(c):
            return {**labels, "class": c, "label": names.get(c, OTHER if c == OTHER else c)}

        self.counters = [predictions.Metric(labels=class_labels(c)) for c in self.classes]
        self.confidence = confidence.Metric(labels=labels,
                                            buckets=[float(b) for b in self.reference["confidence_buckets"]])
        self.gauges = []
        for c in self.classes:
            self.gauges.append(class_share.Metric(labels=class_labels(c)))
            self.gauges[-1].set(float(self.reference["class_share"][c]))
        for bound, share in zip(self.reference["confidence_buckets"], self.reference["confidence_share"]):
            self.gauges.append(confidence_share.Metric(labels={**labels, "le": bucket_label(bound)}))
            self.gauges[-1].set(float(share))
        for family, value in ((confidence_mean, self.reference["confidence_mean"]), (images, self.reference["images"])):
            self.gauges.append(family.Metric(labels=labels))
            self.gauges[-1].set(float(value))
        bound = float(self.reference["low_confidence_bound"])
        self.gauges.append(low_bound.Metric(labels={**labels, "le": bucket_label(bound)}))
        self.gauges[-1].set(bound)

    def buckets(self, top1):
        """Counter index of each predicted class index (-1: an untracked class without an `other` series)."""
        other = -1 if self.other_bucket is None else self.other_bucket
        return np.array([self.bucket_of.get(int(c), other) for c in top1], dtype=np.int64)

    def record(self, probabilities):
        if len(probabilities) == 0:
            return
        top1 = probabilities.argmax(axis=1)
        buckets = self.buckets(top1)
        counts = np.bincount(buckets[buckets >= 0], minlength=len(self.counters))
        for counter, count in zip(self.counters, counts):
            if count:
                counter.increment(float(count))
        for value in probabilities[np.arange(len(top1)), top1]:
            self.confidence.observe(float(value))

    def close(self):
        """Metrics before their families (the python backend's rule)."""
        self.counters, self.gauges, self.confidence = [], [], None
        self.families = []


class Recorder:
    """What the classifier models hold. `record(results)` hands the probabilities of a model call to a
    background thread and returns: each metrics call is a round trip to the server process, which the
    requests of the batch need not wait for. The thread counts whatever has queued up in one go. A metrics
    failure never fails a request: it is logged, once per kind of error; past MAX_QUEUED waiting batches
    (metrics slower than the model), further batches go uncounted and that is logged once too."""

    MAX_QUEUED = 1024

    def __init__(self, pb_utils, metrics, index):
        self.pb_utils, self.metrics, self.index, self.logged = pb_utils, metrics, index, set()
        self.queue = queue.Queue(self.MAX_QUEUED)
        self.thread = None
        if metrics is not None:
            self.thread = threading.Thread(target=self._drain, name="quality-metrics", daemon=True)
            self.thread.start()

    def record(self, results):
        if self.thread is None or not len(results):
            return
        try:
            self.queue.put_nowait(results[self.index])
        except queue.Full:
            self._log("full", "quality metrics: too many batches waiting; some are not counted")

    def _drain(self):
        while True:
            batches = [self.queue.get()]
            while not self.queue.empty():
                batches.append(self.queue.get_nowait())
            stop = batches[-1] is None
            batches = [b for b in batches if b is not None]
            if batches:
                try:
                    self.metrics.record(np.concatenate(batches))
                except Exception as exc:  # noqa: BLE001 - the answers are right; only the counting failed
                    self._log(type(exc), f"quality metrics not recorded: {exc}")
            if stop:
                return

    def _log(self, kind, message):
        if kind not in self.logged:
            self.logged.add(kind)
            self.pb_utils.Logger.log_warn(message)

    def close(self):
        """Count what is queued, then release the metrics (before their families)."""
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join(timeout=10)
            self.thread = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None


def open_quality_metrics(pb_utils, args, version_dir, output_names):
    """The classifier's Recorder; without a quality_reference.json (a repository built before it) one that
    records nothing, and a log line that says why."""
    path = os.path.join(version_dir, REFERENCE_JSON)
    if not os.path.exists(path):
        pb_utils.Logger.log_warn(f"no {path}: no quality metrics for this version (rebuild with make engines)")
        return Recorder(pb_utils, None, 0)
    metrics = QualityMetrics(pb_utils, args["model_name"], args["model_version"], path)
    return Recorder(pb_utils, metrics, output_names.index(metrics.reference["output"]))
