"""Conversion step keys: inputs and the versions of the tools the step uses."""

from __future__ import annotations

import pytest

from coordinator import preparation
from coordinator.preparation import STEP_TOOLS, step_key


def test_a_tool_upgrade_redoes_only_the_steps_that_use_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    versions = {dist: "1.0" for tools in STEP_TOOLS.values() for dist in tools}
    monkeypatch.setattr(preparation, "_installed", lambda dist: versions[dist])

    def keys() -> dict[str, str]:
        return {step: step_key(step, model="m").value for step in STEP_TOOLS}

    before = keys()
    versions["mlx-lm"] = "1.1"
    after_mlx = keys()
    assert {s for s in STEP_TOOLS if before[s] != after_mlx[s]} == {"variant:mlx"}
    versions["onnx"] = "2.0"
    after_onnx = keys()
    assert {s for s in STEP_TOOLS if after_mlx[s] != after_onnx[s]} == {
        "builtin",
        "hf-onnx",
        "hub-inputs",
        "variant:olive",
        "variant:onnxruntime",
        "variant:openvino",
    }


def test_key_follows_inputs_and_records_its_tools() -> None:
    a = step_key("variant:llama-cpp", model="m", scheme="Q4_0")
    assert a == step_key("variant:llama-cpp", model="m", scheme="Q4_0")
    assert a.value != step_key("variant:llama-cpp", model="m", scheme="Q8_0").value
    assert set(a.tools) == {"llama-cpp-python"}
    assert a.tools["llama-cpp-python"] != "absent"  # installed for the test suite
