"""common.cpu: the integer path it reads off this CPU is the one ONNX Runtime's U8S8 kernels take here.

One QLinearConv per case, inputs and weights chosen so the exact int32 sum is known: uint8 activations
of 255 times int8 weights of 127 overflow a 16-bit pair (2 x 255 x 127 > 32767) wherever the kernel adds
products in pairs (x86 without VNNI), and never with 7-bit weights or in a depthwise kernel. The same
cases run under valgrind, whose virtual CPU is an AVX2 one without VNNI whatever the host is, so the
saturating path is checked on every CI machine too.
"""
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from common import cpu

ZEN3_FLAGS = frozenset("fpu sse2 ssse3 sse4_1 sse4_2 avx avx2 fma bmi2 sha_ni vaes".split())  # no VNNI
SPR_FLAGS = ZEN3_FLAGS | {"avx512f", "avx512_vnni", "avx_vnni", "amx_int8"}
ZEN4_FLAGS = ZEN3_FLAGS | {"avx512f", "avx512_vnni"}
K, CHANNELS, SIDE = 64, 8, 4
CASES = {"pointwise, 8-bit weights": (127, False), "pointwise, 7-bit weights": (64, False),
         "depthwise, 8-bit weights": (127, True)}


def qlinearconv(weight: int, depthwise: bool) -> tuple[onnx.ModelProto, int]:
    """x (uint8, all 255) -> QLinearConv (int8 weights, all `weight`) -> float; and the exact sum."""
    channels_in = CHANNELS if depthwise else K
    taps = 9 if depthwise else K
    shape = (CHANNELS, 1, 3, 3) if depthwise else (CHANNELS, K, 1, 1)
    exact = 255 * weight * taps
    initializers = [numpy_helper.from_array(a, n) for n, a in [
        ("w", np.full(shape, weight, np.int8)), ("x_scale", np.float32(1)), ("x_zero", np.uint8(0)),
        ("w_scale", np.ones(CHANNELS, np.float32)), ("w_zero", np.zeros(CHANNELS, np.int8)),
        ("y_scale", np.float32(exact / 250)), ("y_zero", np.uint8(0))]]
    nodes = [helper.make_node("QLinearConv", ["x", "x_scale", "x_zero", "w", "w_scale", "w_zero", "y_scale", "y_zero"],
                              ["q"], group=CHANNELS if depthwise else 1, pads=[1, 1, 1, 1] if depthwise else [0] * 4),
             helper.make_node("DequantizeLinear", ["q", "y_scale", "y_zero"], ["y"])]
    graph = helper.make_graph(nodes, "sums", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, channels_in, SIDE, SIDE])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), exact


def computed_sum(model: onnx.ModelProto) -> float:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.full([d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim], 255, np.uint8)
    (y,) = session.run(None, {"x": x})
    return float(y[0, 0, SIDE // 2, SIDE // 2])  # away from the depthwise padding


def is_exact(value: float, exact: int) -> bool:
    return abs(value - exact) <= exact / 250  # one output step


def test_integer_path_is_what_onnxruntime_computes_on_this_cpu():
    path = cpu.integer_path()
    assert path in cpu.PATHS
    for name, (weight, depthwise) in CASES.items():
        model, exact = qlinearconv(weight, depthwise)
        got = computed_sum(model)
        if name == "pointwise, 8-bit weights":  # the layout only VNNI computes exactly
            assert is_exact(got, exact) == (path == "vnni"), (name, got, exact, cpu.describe())
        else:  # the avx2 layout: exact on every CPU
            assert is_exact(got, exact), (name, got, exact, cpu.describe())


EMULATED = """
import sys
sys.path.insert(0, {root!r})
from tests.common.test_cpu import CASES, computed_sum, qlinearconv
for name, (weight, depthwise) in CASES.items():
    model, exact = qlinearconv(weight, depthwise)
    print(name, exact, computed_sum(model))
"""


@pytest.mark.slow
def test_an_avx2_cpu_without_vnni_saturates_only_8_bit_pointwise_weights(tmp_path):
    """Under valgrind (an AVX2 CPU without VNNI to the program): the vnni layout's sums overflow, the
    avx2 layout's do not."""
    if shutil.which("valgrind") is None:
        pytest.skip("needs valgrind (Debian package valgrind; `make test` installs it as root) to emulate a CPU without VNNI")
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    run = subprocess.run(["valgrind", "-q", "--tool=none", sys.executable, "-c", EMULATED.format(root=root)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    results = {line.rsplit(" ", 2)[0]: (int(line.split()[-2]), float(line.split()[-1]))
               for line in run.stdout.splitlines()}
    assert set(results) == set(CASES), run.stdout
    exact, got = results["pointwise, 8-bit weights"]
    assert not is_exact(got, exact) and got < 0.6 * exact, results  # pairs capped at 32767
    for name in ("pointwise, 7-bit weights", "depthwise, 8-bit weights"):
        assert is_exact(results[name][1], results[name][0]), (name, results)


def test_refusal_names_the_missing_flags_and_the_fix():
    vnni = {cpu.LAYOUT_KEY: "vnni", cpu.REQUIRES_KEY: cpu.requirement("vnni")}
    avx2 = {cpu.LAYOUT_KEY: "avx2", cpu.REQUIRES_KEY: cpu.requirement("avx2")}
    why = cpu.refusal(vnni, ZEN3_FLAGS, "AMD EPYC (Zen 3)")
    assert why is not None and why.count("\n") == 0
    assert "avx512_vnni, avx_vnni, amx_int8" in why and "AMD EPYC (Zen 3) (avx2: avx2 integer path)" in why
    assert "INT8_CPU_LAYOUT=avx2" in why
    assert cpu.refusal(vnni, SPR_FLAGS) is None and cpu.refusal(vnni, ZEN4_FLAGS) is None
    for flags in (ZEN3_FLAGS, ZEN4_FLAGS, SPR_FLAGS, frozenset()):
        assert cpu.refusal(avx2, flags) is None
        assert cpu.refusal({}, flags) is None  # FP32, FP16 and foreign files carry no requirement
    assert cpu.integer_path(ZEN3_FLAGS) == "avx2" and cpu.integer_path(ZEN4_FLAGS) == "vnni"
    assert cpu.integer_path(frozenset()) == "avx2"  # unreadable flags: the safe assumption
    with pytest.raises(ValueError, match="not one of"):
        cpu.requirement("amx")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_vnni\n\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu.cpu_flags(str(cpuinfo)) == {"fpu", "avx2", "avx512_vnni"} and cpu.cpu_model(str(cpuinfo)) == "Some CPU"
    assert cpu.cpu_flags(str(tmp_path / "missing")) == frozenset()
    assert cpu.integer_path() == cpu.integer_path(cpu.cpu_flags())
    assert cpu.integer_path() in cpu.describe()


def test_machine_names_the_cpu_its_speed_flags_and_cores(tmp_path):
    import os

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some Xeon\n"
                       "flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_vnni avx_vnni amx_tile amx_int8 amx_bf16\n")
    machine = cpu.machine(str(cpuinfo))
    assert machine["cpu"] == "Some Xeon"
    assert machine["flags"] == ["amx_bf16", "amx_int8", "amx_tile", "avx", "avx2", "avx512_vnni", "avx512f",
                                "avx_vnni", "fma"]  # sorted; fpu and sse4_2 decide nothing here
    assert machine["cores"] == os.cpu_count() and 1 <= machine["cores_usable"] <= machine["cores"]
    assert cpu.machine(str(tmp_path / "missing"))["flags"] == []
