"""`make profile` (benchmarks/profile.py): Linux perf's samples of a real served pipeline, turned into
CPU ms per image by serving process and library group. The served test skips where perf may not
sample all CPUs (it says why) or perf_analyzer is not set up."""
import json

import pytest

from benchmarks import profile
from build.repository.writer import write_repository
from build.repository.spec import DeploymentSpec


@pytest.mark.parametrize("dso, group", [
    ("/x/.venv/lib/python3.11/site-packages/onnxruntime/capi/onnxruntime_pybind11_state.so", "ONNX Runtime"),
    ("/x/.venv/lib/python3.11/site-packages/pillow.libs/libjpeg-6dc8d115.so.62.4.0", "JPEG decoding"),
    ("/x/.venv/lib/python3.11/site-packages/PIL/_imaging.cpython-311-x86_64-linux-gnu.so", "Pillow (resize, convert)"),
    # Triton's wheel lives under site-packages/python3.11: it must not count as the interpreter
    ("/x/.venv/lib/python3.11/site-packages/nvidia_pytriton.libs/libtritonserver-717102f0.so",
     "Triton (server, backends, stub)"),
    ("/x/.venv/lib/python3.11/site-packages/pytriton/tritonserver/bin/tritonserver", "Triton (server, backends, stub)"),
    ("/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0", "Python interpreter"),
    ("/usr/lib/x86_64-linux-gnu/libc.so.6", "libc, libstdc++ (memcpy, malloc)"),
    ("[kernel.kallsyms]", "kernel (page faults, scheduling, I/O)"),
    ("/x/.venv-perf/bin/perf_analyzer", profile.OTHER),
])
def test_library_groups(dso, group):
    assert profile.group_of(dso) == group


def test_samples_are_divided_per_image_and_other_processes_and_idle_cpus_left_out():
    text = ("  100/100   2000000  7f00 (/usr/lib/libpython3.11.so.1.0)\n"
            "  100/101   4000000  7f01 ([kernel.kallsyms])\n"
            "  200/200   6000000  7f02 (/o/onnxruntime_pybind11_state.so)\n"
            "  300/300   9000000  7f03 (/v/perf_analyzer)\n"
            "    0/0    50000000  7f04 ([kernel.kallsyms])\n"
            "garbage line\n")
    totals = profile.parse_script(text)
    assert totals[(100, "[kernel.kallsyms]")] == 4_000_000 and len(totals) == 5
    p = profile.attribute(totals, {100: "server", 200: "classifier"}, images=2, pipeline="ensemble", seconds=1.0)
    assert p.ms_per_image["server"] == {"kernel (page faults, scheduling, I/O)": 2.0, "Python interpreter": 1.0}
    assert p.ms_per_image["classifier"] == {"ONNX Runtime": 3.0}
    assert p.total() == 6.0 and p.outside_ms_per_image == 4.5
    with pytest.raises(ValueError, match="no images finished"):
        profile.attribute(totals, {}, images=0, pipeline="fused", seconds=1.0)


@pytest.mark.slow
def test_profile_of_both_served_pipelines(tiny_artifacts, perf_tool, perf_venv, tmp_path):
    try:
        profile.require_perf()
    except profile.ProfilerUnavailable as exc:
        pytest.skip(f"needs Linux perf sampling all CPUs: {exc}")
    repo = tmp_path / "model_repository"
    write_repository(DeploymentSpec(artifacts=str(tiny_artifacts)), "python-onnxruntime", repo, "tests")
    out = tmp_path / "profile"
    profiles = profile.main(profile.get_args_parser().parse_args([
        "--model-repository", str(repo), "--concurrency", "2", "--seconds", "2", "--perf-venv", str(perf_venv),
        "--out", str(out)]))
    ensemble, fused = profiles
    assert set(ensemble.ms_per_image) == {"server", "preprocess", "classifier"}
    assert set(fused.ms_per_image) == {"server", "classifier"}
    for p in profiles:
        assert p.images > 0 and p.total() > 0
        assert p.group_totals().get("ONNX Runtime", 0) > 0  # the classifier ran, and was sampled
    assert "ONNX Runtime" in ensemble.ms_per_image["classifier"]
    assert "JPEG decoding" in ensemble.ms_per_image["preprocess"]
    assert "| **all serving processes** |" in (out / "profile.md").read_text()
    doc = json.loads((out / "profile.json").read_text())
    assert [p["pipeline"] for p in doc["profiles"]] == ["ensemble", "fused"] and doc["machine"]["cpu"]


def test_images_are_counted_over_the_recorded_seconds_only():
    """The statistics snapshots span perf record's start-up and write-out too (15 s around a 12 s
    recording): the CPU of 12 s is divided by the images of 12 s, not of 15 s."""
    assert profile.images_recorded(1500, wall_s=15.0, recorded_s=12.0) == 1200
    assert profile.images_recorded(1200, wall_s=12.0, recorded_s=12.0) == 1200
