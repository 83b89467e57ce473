"""DeploymentSpec.load: every malformed spec is one ValueError naming the file and the key, never a traceback."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from build.repository.spec import DEFAULT_QUEUE_TIMEOUT_US, DeploymentSpec, StageSpec
from common.contract import ImageLimits


@pytest.mark.parametrize("key", ["preprocess", "classifier", "fused", "limits"])
@pytest.mark.parametrize("value", [None, 4, [1, 2], "x"])
def test_a_stage_that_is_not_an_object_is_a_value_error_naming_the_key(tmp_path, key, value):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({key: value}))
    with pytest.raises(ValueError, match=rf"^{path}: {key} must be an object of \[") as info:
        DeploymentSpec.load(path)
    fields = "max_image_bytes" if key == "limits" else "preferred_batch_sizes"
    assert fields in str(info.value) and str(info.value).endswith(f"got {value!r}")


def test_stage_objects_and_dicts_still_load(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"preprocess": {"instances": 3}, "limits": {"min_image_side": 8}}))
    spec = DeploymentSpec.load(path)
    assert spec.preprocess == StageSpec(instances=3) and spec.limits.min_image_side == 8
    assert isinstance(spec.limits, ImageLimits) and DeploymentSpec(classifier=StageSpec(threads=3)).classifier.threads == 3
    path.write_text(json.dumps({"classifier": {"instances": 1, "bogus": 2}}))
    with pytest.raises(ValueError, match="bogus"):  # a TypeError from the dataclass, reported as ValueError
        DeploymentSpec.load(path)


WRONG_TYPES = [  # (path of the key, value, the message's end): each rendered a config Triton cannot parse, or a
    # model that fails to load (parameters are int()'ed in the stubs), or a cache silently off (int(0.5) MiB)
    (("preprocess", "instances"), 2.5, "preprocess.instances must be an integer, got 2.5"),
    (("preprocess", "instances"), True, "preprocess.instances must be an integer, got True"),
    (("preprocess", "instances"), "2", "preprocess.instances must be an integer, got '2'"),
    (("max_batch_size",), 32.0, "max_batch_size must be an integer, got 32.0"),
    (("max_batch_size",), None, "max_batch_size must be an integer, got None"),
    (("classifier", "preferred_batch_sizes"), [4.5], "classifier.preferred_batch_sizes[0] must be an integer, got 4.5"),
    (("classifier", "preferred_batch_sizes"), 4, "classifier.preferred_batch_sizes must be a list, got 4"),
    (("classifier", "queue_timeout_us"), 1e6, "classifier.queue_timeout_us must be an integer, got 1000000.0"),
    (("fused", "threads"), 1.5, "fused.threads must be an integer, got 1.5"),
    (("limits", "max_image_bytes"), 1.5, "limits.max_image_bytes must be an integer, got 1.5"),
    (("response_cache_mb",), 0.5, "response_cache_mb must be an integer, got 0.5"),
    (("target_server",), "tensorrt", "target_server must be an object, got 'tensorrt'"),
    (("classifier_name",), None, "classifier_name must be a string, got None"),
    (("preprocess", "bogus"), 1, "unknown preprocess key 'bogus'; valid: ['instances', 'max_queue_delay_us', "
                                 "'max_queue_size', 'nice', 'preferred_batch_sizes', 'queue_timeout_us', 'threads']"),
]


@pytest.mark.parametrize("where, value, message", WRONG_TYPES, ids=[f"{'.'.join(w)}={v!r}" for w, v, _ in WRONG_TYPES])
def test_a_value_of_the_wrong_type_is_a_value_error_naming_the_key(tmp_path, where, value, message):
    data = json.loads((CONFIGS / "deployment.json").read_text())
    parent = data
    for key in where[:-1]:
        parent = parent[key]
    parent[where[-1]] = value
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as info:
        DeploymentSpec.load(path)
    assert str(info.value) == f"{path}: {message}"


def test_values_of_their_types_load_as_before():
    data = json.loads((CONFIGS / "deployment.json").read_text())
    data["limits"] = {"max_image_aspect_ratio": 100}  # an integer where a number is asked for
    data["classifier"]["max_queue_size"] = None
    spec = DeploymentSpec.from_dict(data)
    assert spec.limits.max_image_aspect_ratio == 100 and spec.classifier.max_queue_size is None
    assert DeploymentSpec.from_dict(spec.to_dict()) == spec and DeploymentSpec.from_dict({}) == DeploymentSpec()


@pytest.mark.parametrize("changes, message", [
    ({"pipeline": "fused", "preprocessing": "dali"}, "the fused pipeline preprocesses in its python model"),
    ({"pipeline": "fused", "backend": "onnxruntime"}, "the fused pipeline runs in the python backend"),
    ({"classifier_name": 'a"b'}, r"model names are letters, digits.*'a\"b'"),
    ({"ensemble_name": ""}, "model names are letters"),
    ({"preprocess_name": ".."}, "model names are letters"),
    # a batching delay as long as the queue timeout: every lone request timed out (HTTP 503 in 1 s on an idle server)
    ({"preprocess": {"instances": 2, "max_queue_delay_us": 3_000_000}},
     r"^preprocess.max_queue_delay_us 3000000 must be below its derived queue timeout 1000000: "),
    ({"fused": {"instances": 2, "max_queue_delay_us": 1_000_000}}, "fused.max_queue_delay_us 1000000 must be below"),
    ({"classifier": {"max_queue_delay_us": 500, "queue_timeout_us": 500}},
     r"^classifier.max_queue_delay_us 500 must be below queue_timeout_us 500: "),
    # beyond the types of Triton's model config fields: the model fails to load
    ({"max_batch_size": 2**40}, r"^max_batch_size must be at most 2147483647 \(Triton's field is int32\), got 1099511627776$"),
    ({"classifier": {"max_queue_delay_us": 2**70}}, r"^classifier.max_queue_delay_us must be at most 18446744073709551615 "),
    ({"classifier": {"queue_timeout_us": 2**64}}, "classifier.queue_timeout_us must be at most 18446744073709551615"),
    ({"preprocess": {"max_queue_size": 2**31}}, r"preprocess.max_queue_size must be at most 2147483647 \(Triton's field is int32"),
    ({"preprocess": {"instances": 2**31}}, "preprocess.instances must be at most 2147483647"),
    ({"max_batch_size": 2**20, "preprocess": {"instances": 2**12}},  # each within int32, their product not
     r"^preprocess: the derived max_queue_size 4294967296 exceeds 2147483647"),
])
def test_specs_that_cannot_be_served_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        DeploymentSpec.from_dict(changes)



@pytest.mark.parametrize("text, message", [
    # NaN compared false with every image's aspect ratio: the guard was off
    ('{"limits": {"max_image_aspect_ratio": NaN}}', "limits.max_image_aspect_ratio must be a finite number, got nan"),
    ('{"limits": {"max_image_aspect_ratio": Infinity}}', "limits.max_image_aspect_ratio must be a finite number, got inf"),
    # above Pillow's own limit, which warns above it and refuses above twice it whatever the spec says
    ('{"limits": {"max_image_pixels": 300000000}}',
     r"limits.max_image_pixels must be at most 89478485 \(the image decoder's own limit, Pillow's MAX_IMAGE_PIXELS\), "
     "got 300000000"),
])
def test_image_limits_that_cannot_take_effect_are_refused(tmp_path, text, message):
    path = tmp_path / "spec.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"^{path}: {message}$"):
        DeploymentSpec.load(path)
    assert DeploymentSpec.from_dict({"limits": {"max_image_pixels": 89_478_485}}).limits.max_image_pixels == 89_478_485

def test_a_delay_below_the_timeout_or_with_no_timeout_loads():
    stage = {"instances": 2, "max_queue_delay_us": DEFAULT_QUEUE_TIMEOUT_US - 1}
    assert DeploymentSpec.from_dict({"preprocess": stage}).queue_policy("preprocess") == (64, DEFAULT_QUEUE_TIMEOUT_US)
    for unbounded in ({"instances": 2, "queue_timeout_us": 0}, {"instances": 1}):  # no timeout: any delay is served
        spec = DeploymentSpec.from_dict({"preprocess": {**unbounded, "max_queue_delay_us": 2**64 - 1}})
        assert spec.queue_policy("preprocess")[1] == 0
    bounded = {"instances": 2, "max_queue_size": 2**31 - 1}
    widest = {"max_batch_size": 2**31 - 1, "preprocess": bounded, "fused": bounded}
    assert DeploymentSpec.from_dict(widest).queue_policy("preprocess") == (2**31 - 1, DEFAULT_QUEUE_TIMEOUT_US)


def test_build_engines_reports_a_null_stage_in_one_line(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"preprocess": None}))
    cli = subprocess.run([sys.executable, "-m", "build.engines", "--spec", str(path), "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 1 and "Traceback" not in cli.stderr, cli.stderr
    assert cli.stderr.strip() == f"build.engines: {path}: preprocess must be an object of " \
                                 "['instances', 'max_queue_delay_us', 'max_queue_size', 'nice', 'preferred_batch_sizes', 'queue_timeout_us', 'threads'], got None"


CONFIGS = Path(__file__).parents[2] / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.json")))
def test_every_committed_spec_loads_without_a_caution(name):
    spec = DeploymentSpec.load(CONFIGS / name)
    assert spec.cautions() == [], spec.cautions()


def test_a_single_instance_derives_no_queue_policy_and_one_set_by_hand_is_a_caution():
    """Triton 2.51's batcher leaves one instance behind any queue policy idle for 500 ms now and then
    (docs/results/2026-12-03-single-instance-stall.md): derived, a single instance gets none."""
    import dataclasses

    committed = DeploymentSpec.load(CONFIGS / "deployment.json")
    one = committed.replace(preprocess=dataclasses.replace(committed.preprocess, instances=1))
    assert one.queue_policy("preprocess") == (0, 0) and one.queue_policy("classifier") == (0, DEFAULT_QUEUE_TIMEOUT_US)
    [door] = one.cautions()  # unbounded, behind no other model: said
    assert door.startswith("preprocess: the door has one instance and so no queue bound") and "500 ms" in door
    for size, timeout in ((8, 0), (0, 50000), (8, 50000)):  # the size alone and the timeout alone stalled it too
        bounded = one.replace(preprocess=dataclasses.replace(one.preprocess, max_queue_size=size,
                                                             queue_timeout_us=timeout))
        [caution] = bounded.cautions()
        assert caution.startswith(f"preprocess: one instance behind a queue policy (max_queue_size {size}, "
                                  f"timeout {timeout} us):") and "500 ms" in caution
    # the classifier behind a bounded door: one instance, no policy, nothing to say
    default = DeploymentSpec()
    assert default.classifier.instances == 1 and default.queue_policy("classifier") == (0, 0)
    assert default.cautions() == []
    fused = one.replace(pipeline="fused", fused=dataclasses.replace(one.fused, instances=1, max_queue_size=4))
    assert [c.split(":")[0] for c in fused.cautions()] == ["fused"]  # preprocess is not served in a fused pipeline
