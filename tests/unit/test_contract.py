"""The wire contract and the agent's import boundary."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from edgefarm.domain import (
    ArtifactRef,
    Assignment,
    DeviceCapabilities,
    MeasurementResult,
    MeasureSettings,
    TrialOutcome,
)
from protos import convert

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_fresh() -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools is in the dev extra")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_message_and_rpc_is_documented() -> None:
    for proto in (ROOT / "protos" / "edgefarm" / "v1").glob("*.proto"):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            if stripped.startswith(("message ", "rpc ", "service ")):
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1} {stripped}"


def test_agent_never_imports_ray_coordinator_or_results() -> None:
    code = (
        "import sys; import agent.client, agent.probe, agent.runner, agent.trial, "
        "agent.backends, agent.hub.service, edgefarm.cli.agent_cmd; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'ray', 'coordinator', 'results', 'sqlalchemy', 'sklearn', 'pandas'}); print(bad)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_assignment_round_trip() -> None:
    a = Assignment(
        task_id="t",
        attempt=2,
        lease_id="l",
        campaign_id="c",
        model="m",
        backend="onnxruntime",
        scheme="int8-static",
        artifact=ArtifactRef("a" * 64, 10, "m.onnx"),
        eval_data=None,
        settings=MeasureSettings(trials=5, threads=2),
        options={"k": "v"},
    )
    assert convert.assignment_from_pb(convert.assignment_to_pb(a, 1.0)) == a
    b = Assignment(**{**a.__dict__, "eval_data": ArtifactRef("b" * 64, 3, "eval.npz")})
    assert convert.assignment_from_pb(convert.assignment_to_pb(b, 1.0)) == b


def test_result_and_capabilities_round_trip() -> None:
    trial = TrialOutcome([1.0, 2.0], 3, 0.5, 0.1, 100, 50, False, "too few iterations")
    r = MeasurementResult(
        task_id="t",
        attempt=1,
        lease_id="l",
        agent_id="ag",
        device_id="d",
        ok=True,
        backend_version="1.0",
        batch_size=4,
        trials=[trial],
        accuracy={"top1": 0.9},
        model_size_bytes=7,
        environment={"os": "Linux"},
    )
    back = convert.result_from_pb(convert.result_to_pb(r), "ag", "d")
    # samples come back as compact arrays of doubles: equal values, another sequence type
    assert [list(t.samples_ms) for t in back.trials] == [[1.0, 2.0]]
    for t in back.trials:
        t.samples_ms = list(t.samples_ms)
    assert back == r
    assert pickle.loads(pickle.dumps(back)) == r  # as it travels to the ingestion process
    c = DeviceCapabilities(
        device_id="d", arch="arm64", cpu_flags=["neon"], backends={"mlx": "0.1"}, extra={"x": "y"}
    )
    assert convert.capabilities_from_pb(convert.capabilities_to_pb(c)) == c
