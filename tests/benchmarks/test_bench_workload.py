"""The benchmark inputs: real photos, perf_analyzer's --input-data JSON, its CSV (no server needed)."""
import io
import json

import pytest
from PIL import Image

from benchmarks.perf import (PerfAnalyzerError, decode_input_data, parse_csv, repository_models,
                             serialize_bytes_element, write_input_data)
from benchmarks.workload import load_photos
from common.samples import sample_photos

# A CSV written by perf_analyzer 2.51 (`-f`) against this project's ensemble; latencies in us.
PERF_CSV = (
    "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
    "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency\n"
    "2,58.5791,14,5167,3,203,27655,1002,4,33086,41171,44815,54323\n"
)


def test_photos_are_the_bundled_ones_as_jpeg():
    originals = {name: path.read_bytes() for name, path in sample_photos().items()}
    assert load_photos("original") == originals
    jpegs = load_photos("jpeg")
    assert list(jpegs) == list(originals)
    for name, data in jpegs.items():
        with Image.open(io.BytesIO(data)) as image, Image.open(io.BytesIO(originals[name])) as original:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == original.size


def test_input_data_json_decodes_to_the_real_photos(tmp_path):
    photos = load_photos("jpeg")
    path = write_input_data(list(photos.values()), tmp_path / "input.json", "IMAGE")
    doc = json.loads(path.read_text())  # valid JSON
    assert len(doc["data"]) == len(photos)
    for step in doc["data"]:
        assert set(step) == {"IMAGE"} and step["IMAGE"]["shape"] == [1]
    assert decode_input_data(doc, "IMAGE") == list(photos.values())
    with Image.open(io.BytesIO(decode_input_data(doc)[0])) as image:
        image.load()


def test_bytes_element_is_length_prefixed():
    assert serialize_bytes_element(b"abc") == b"\x03\x00\x00\x00abc"
    with pytest.raises(ValueError):
        decode_input_data({"data": [{"IMAGE": {"content": {"b64": "BQAAAGFi"}}}]})  # says 5, holds 2


def test_parse_perf_analyzer_csv(tmp_path):
    path = tmp_path / "perf.csv"
    path.write_text(PERF_CSV + "\n")
    (row,) = parse_csv(path, "image_classifier", "grpc")
    assert row.concurrency == 2 and row.throughput == pytest.approx(58.5791)
    assert row.p50_ms == pytest.approx(33.086) and row.p99_ms == pytest.approx(54.323)
    assert row.server_compute_ms == pytest.approx((203 + 27655 + 1002) / 1000)


def test_a_perf_analyzer_csv_without_a_needed_column_is_a_clear_error(tmp_path):
    path = tmp_path / "perf.csv"
    header, row = PERF_CSV.strip().splitlines()[:2]
    names = header.split(",")
    keep = [i for i, name in enumerate(names) if name != "p99 latency"]
    path.write_text("\n".join(",".join(line.split(",")[i] for i in keep) for line in (header, row)) + "\n")
    with pytest.raises(PerfAnalyzerError, match="no p99 latency column"):
        parse_csv(path, "image_classifier", "grpc")


def test_perf_measures_the_models_the_repository_names(tmp_path):
    """The spec's model names, as BUILD.json records them; the fused pipeline has no preprocess model."""
    from build.repository.spec import DeploymentSpec

    spec = DeploymentSpec(ensemble_name="cats", preprocess_name="decode", classifier_name="net")
    (tmp_path / "BUILD.json").write_text(json.dumps({"spec": spec.to_dict()}))
    assert repository_models(tmp_path) == ["cats", "decode", "net"]
    (tmp_path / "BUILD.json").write_text(json.dumps({"spec": spec.replace(pipeline="fused").to_dict()}))
    assert repository_models(tmp_path) == ["cats", "net"]
    with pytest.raises(FileNotFoundError, match="make engines"):
        repository_models(tmp_path / "nothing")
