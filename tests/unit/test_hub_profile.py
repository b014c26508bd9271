"""Hub profile -> farm trial mapping, and the test double's profiles against the real client's."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from agent.hub.profile import placement_summary, profile_trial
from edgefarm.domain import MeasureSettings

# What the real client (qai_hub 0.56, _profile_pb_to_python_dict) returns for the
# ProfileDetail of its own unit test: times in µs, memory in bytes, ranges as tuples.
REAL_PROFILE: dict[str, Any] = {
    "execution_summary": {
        "estimated_inference_time": 3652,
        "estimated_inference_peak_memory": 166711296,
        "first_load_time": 1374293,
        "first_load_peak_memory": 166711296,
        "warm_load_time": 277823,
        "warm_load_peak_memory": 163520512,
        "compile_time": 0,
        "compile_peak_memory": 0,
        "compile_memory_increase_range": (0, 0),
        "compile_memory_peak_range": (0, 0),
        "first_load_memory_increase_range": (72258864, 82031840),
        "first_load_memory_peak_range": (98230272, 108003248),
        "warm_load_memory_increase_range": (0, 0),
        "warm_load_memory_peak_range": (118784, 43225712),
        "inference_memory_increase_range": (0, 2658496),
        "inference_memory_peak_range": (2654208, 39406752),
        "all_compile_times": [1],
        "all_first_load_times": [1374293],
        "all_inference_times": [10003, 4205],
        "all_warm_load_times": [277823],
    },
    "execution_detail": [
        {"compute_unit": "CPU", "execution_time": 23, "name": "truediv", "type": "MUL"},
        {
            "compute_unit": "NPU",
            "execution_cycles": 180315,
            "execution_time": 127,
            "name": "transpose",
            "type": "TRANSPOSE",
        },
    ],
}


def test_profile_maps_to_a_trial_with_units_converted() -> None:
    trial = profile_trial(REAL_PROFILE, MeasureSettings(min_iterations=2))
    assert trial.samples_ms == [10.003, 4.205] and trial.valid
    assert trial.duration_s == pytest.approx(0.014208)
    assert trial.load_time_s == pytest.approx(1.374293)
    assert trial.peak_rss_bytes == 166711296
    assert trial.load_rss_delta_bytes == 82031840
    m = trial.metrics
    assert m["estimated_inference_ms"] == pytest.approx(3.652)
    assert m["warm_load_ms"] == pytest.approx(277.823)
    assert (m["inference_memory_peak_low_bytes"], m["inference_memory_peak_high_bytes"]) == (
        2654208,
        39406752,
    )
    assert (m["npu_layers"], m["gpu_layers"], m["cpu_layers"], m["layers"]) == (1, 0, 1, 2)
    assert m["npu_layer_share"] == 0.5
    assert placement_summary(REAL_PROFILE["execution_detail"]) == "CPU:1,NPU:1"


def test_short_or_old_profiles_are_invalid_not_errors() -> None:
    short = profile_trial(REAL_PROFILE, MeasureSettings(min_iterations=100))
    assert not short.valid and "2 of the 100" in short.invalid_reason
    # a v1.0 profile (no per-iteration times, no ranges: None as the client leaves them)
    summary = {
        k: v for k, v in REAL_PROFILE["execution_summary"].items() if not k.startswith("all_")
    }
    summary.update(inference_memory_peak_range=None, first_load_time=None)
    old = profile_trial({"execution_summary": summary, "execution_detail": []}, MeasureSettings())
    assert old.samples_ms == [3.652] and not old.valid and "estimate" in old.invalid_reason
    assert math.isnan(old.load_time_s)
    assert "inference_memory_peak_low_bytes" not in old.metrics and "layers" not in old.metrics


def test_the_double_returns_profiles_shaped_like_the_real_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = pytest.importorskip("qai_hub.client", reason="the qai-hub extra is not installed")
    pb = pytest.importorskip("qai_hub.public_api_pb2")
    detail = pb.ProfileDetail(major_version=1, minor_version=8)
    detail.execution_memory.peak.upper = 1  # every optional part present
    for part in (detail.compile_memory, detail.cold_load_memory, detail.warm_load_memory):
        part.peak.upper = 1
    detail.all_execution_times.append(1)
    detail.layer_details.append(pb.LayerDetail(name="x", compute_unit=pb.COMPUTE_UNIT_NPU))
    real = client._profile_pb_to_python_dict(detail)

    from tests.doubles.qai_hub import _state

    monkeypatch.setenv(_state.STATE_ENV, str(tmp_path))
    fake = _fake_profile(tmp_path)
    assert fake.keys() == real.keys()
    assert fake["execution_summary"].keys() == real["execution_summary"].keys()
    for key, value in real["execution_summary"].items():
        assert type(fake["execution_summary"][key]) is type(value), key
    layer_keys = {"name", "type", "compute_unit", "execution_time", "execution_cycles"}
    assert all(set(layer) <= layer_keys for layer in fake["execution_detail"])
    assert {layer["compute_unit"] for layer in fake["execution_detail"]} <= {"NPU", "GPU", "CPU"}


def _fake_profile(state: Path) -> dict[str, Any]:
    """A profile from the double for a one-node ONNX model compiled for QNN."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from tests.doubles.qai_hub import _state

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    _state.state_dir()
    onnx.save(helper.make_model(graph), str(state / "models" / "m1.onnx"))
    _state.save("models", {"id": "m1", "name": "m", "created_at": 0, "model_type": "ONNX"})
    _state.save("models", {"id": "m2", "source": "m1", "runtime": "qnn_context_binary"})
    return _state.profile({"model_id": "m2", "options": "--max_profiler_iterations 3"})
