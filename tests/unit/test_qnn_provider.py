"""Direct Snapdragon hosts: onnxruntime's QNN execution provider (no QNN hardware here, so
onnxruntime is a stand-in that lists the provider)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent.backends.onnxruntime import OnnxRuntimeBackend, open_session, provider_options
from agent.probe import ort_accelerators
from edgefarm.domain import MeasureSettings
from edgefarm.errors import TaskError


class _SessionOptions:
    def __init__(self) -> None:
        self.entries: dict[str, str] = {}

    def add_session_config_entry(self, key: str, value: str) -> None:
        self.entries[key] = value


class _FakeOrt:
    """Just enough of the onnxruntime module for open_session, with QNN available."""

    __version__ = "1.31.1"
    SessionOptions = _SessionOptions
    ExecutionMode = SimpleNamespace(ORT_SEQUENTIAL="sequential")
    GraphOptimizationLevel = SimpleNamespace(ORT_ENABLE_ALL="all")

    def __init__(self) -> None:
        self.created: dict[str, Any] = {}

    def get_available_providers(self) -> list[str]:
        return ["QNNExecutionProvider", "CPUExecutionProvider"]

    def InferenceSession(self, path: str, **kwargs: Any) -> Any:
        self.created = kwargs
        return SimpleNamespace(get_providers=lambda: [*kwargs["providers"], "CPUExecutionProvider"])


def test_probe_offers_qnn_as_the_htp_accelerator() -> None:
    assert ort_accelerators(["QNNExecutionProvider", "CPUExecutionProvider"]) == ["qnn-htp"]


def test_qnn_session_gets_the_htp_backend_and_records_it(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not read by the stand-in")
    ort = _FakeOrt()
    options = {
        "execution_provider": "QNNExecutionProvider",
        "provider.htp_performance_mode": "burst",
        "disable_cpu_fallback": "true",
    }
    _, env = open_session(ort, model, MeasureSettings(), options)
    (chosen,) = ort.created["provider_options"]
    assert chosen["htp_performance_mode"] == "burst"
    assert chosen["backend_path"] in ("libQnnHtp.so", "QnnHtp.dll")
    assert ort.created["providers"] == ["QNNExecutionProvider"]
    assert ort.created["sess_options"].entries == {"session.disable_cpu_ep_fallback": "1"}
    assert env["onnxruntime.providers"].startswith("QNNExecutionProvider")
    assert "htp_performance_mode=burst" in env["onnxruntime.provider_options"]
    assert env["onnxruntime.cpu_fallback"] == "disabled"


def test_provider_options_are_only_for_the_chosen_provider() -> None:
    assert provider_options("CPUExecutionProvider", {"task": "auto"}) == {}
    given = {"provider.backend_path": "/opt/qnn/libQnnHtp.so"}
    assert provider_options("QNNExecutionProvider", given) == {
        "backend_path": "/opt/qnn/libQnnHtp.so"
    }


def test_unknown_plain_options_are_still_refused(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    with pytest.raises(TaskError, match="unknown onnxruntime option"):
        OnnxRuntimeBackend().load(model, MeasureSettings(), {"exection_provider": "QNN"})
