"""Trials in real child processes, the backend registry and the agent's import hygiene."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import edgefarm
from agent.backends import get_backend, installed_backends
from agent.backends.noop import NoopBackend
from agent.backends.onnxruntime import OnnxRuntimeBackend
from agent.runner import TrialsReport, child_environment, run_measurement
from coordinator.models.digits import DigitsBundle, build_digits_model
from edgefarm.domain import MeasureSettings
from edgefarm.errors import (
    BackendCrash,
    BackendUnavailable,
    MissingExtra,
    ModelLoadError,
    TaskError,
    TaskTimeout,
)

QUICK = MeasureSettings(
    warmup_iterations=2,
    min_iterations=1,
    min_duration_s=0.0,
    max_duration_s=5.0,
    trials=1,
    timeout_s=30.0,
)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsBundle:
    # a narrower MLP than the default: this module tests the runner, not the model
    return build_digits_model(tmp_path_factory.mktemp("digits"), seed=0, hidden_layers=(64,))


@pytest.fixture()
def dummy_model(tmp_path: Path) -> Path:
    path = tmp_path / "model.bin"
    path.write_bytes(b"\x00" * 128)
    return path


def measure(
    backend: str,
    model: Path,
    settings: MeasureSettings = QUICK,
    options: dict[str, str] | None = None,
    eval_path: Path | None = None,
) -> TrialsReport:
    return asyncio.run(run_measurement(backend, "fp32", model, eval_path, settings, options or {}))


def test_real_measurement_of_the_digits_model(digits: DigitsBundle) -> None:
    settings = MeasureSettings(
        warmup_iterations=5,
        min_iterations=20,
        min_duration_s=0.1,
        trials=2,
        timeout_s=60.0,
        max_other_cpu_cores=0.0,  # record only: not a test of the busy-host guard
    )
    progress: list[tuple[int, int]] = []

    async def on_trial(done: int, total: int) -> None:
        progress.append((done, total))

    report = asyncio.run(
        run_measurement(
            "onnxruntime", "fp32", digits.model_path, digits.eval_path, settings, {}, on_trial
        )
    )
    assert progress == [(1, 2), (2, 2)]
    assert len(report.trials) == 2
    for trial in report.trials:
        assert trial.valid, trial.invalid_reason
        assert len(trial.samples_ms) >= 20
        assert all(s > 0 for s in trial.samples_ms)
        assert trial.duration_s >= 0.1
        assert trial.load_time_s > 0
        assert trial.peak_rss_bytes > 0
        assert trial.warmup_iterations == 5

    acc = report.accuracy
    assert set(acc) == {"top1", "agreement", "reference_top1", "max_abs_diff", "examples"}
    assert acc["examples"] == digits.test_examples
    assert acc["top1"] == pytest.approx(digits.onnx_test_accuracy)
    assert acc["top1"] > 0.9
    assert acc["agreement"] == 1.0 and acc["max_abs_diff"] < 1e-4  # same model, same runtime

    assert report.backend_version == importlib.metadata.version("onnxruntime")
    assert report.model_size_bytes == digits.model_path.stat().st_size
    env = report.environment
    assert env["onnxruntime.providers"] == "CPUExecutionProvider"
    assert env["onnxruntime.intra_op_num_threads"] == "1"
    assert env["onnxruntime.inter_op_num_threads"] == "1"
    assert env["threads"] == "1" and env["python"] and env["platform"]


def test_corrupt_onnx_is_a_model_load_error(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelLoadError, match=r"onnxruntime could not load corrupt\.onnx") as info:
        measure("onnxruntime", corrupt)
    assert "\n" not in str(info.value)


def test_missing_and_empty_models_are_model_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        measure("onnxruntime", tmp_path / "absent.onnx")
    empty = tmp_path / "empty.onnx"
    empty.touch()
    with pytest.raises(ModelLoadError, match="empty"):
        measure("onnxruntime", empty)


def test_unavailable_execution_provider(digits: DigitsBundle) -> None:
    with pytest.raises(BackendUnavailable, match="NoSuchExecutionProvider"):
        measure(
            "onnxruntime",
            digits.model_path,
            options={"execution_provider": "NoSuchExecutionProvider"},
        )


@pytest.mark.parametrize(("how", "signal_name"), [("segv", "SIGSEGV"), ("abort", "SIGABRT")])
def test_crashing_child_is_a_backend_crash(dummy_model: Path, how: str, signal_name: str) -> None:
    with pytest.raises(BackendCrash, match=signal_name) as info:
        measure("noop", dummy_model, options={"noop_crash": how})
    assert "noop.py" in str(info.value)  # faulthandler's stack made it into the message


def test_child_without_result_is_a_backend_crash(dummy_model: Path) -> None:
    with pytest.raises(BackendCrash, match="exited with code 7 without a readable result") as info:
        measure("noop", dummy_model, options={"noop_exit": "7"})
    assert "noop: exiting with code 7 without a result" in str(info.value)  # stderr tail


def test_hanging_child_is_a_timeout(dummy_model: Path) -> None:
    settings = MeasureSettings(trials=1, min_iterations=1, min_duration_s=0.0, timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(TaskTimeout, match="1 s"):
        measure("noop", dummy_model, settings, options={"noop_sleep_s": "60"})
    assert time.monotonic() - started < 15


def test_child_errors_keep_their_type(dummy_model: Path) -> None:
    with pytest.raises(BackendUnavailable, match="unknown backend 'tflite'"):
        measure("tflite", dummy_model)
    with pytest.raises(TaskError, match="unknown noop option"):
        measure("noop", dummy_model, options={"noop_crahs": "segv"})


def test_noop_measures_the_farm_overhead(dummy_model: Path) -> None:
    settings = MeasureSettings(
        warmup_iterations=3, min_iterations=200, min_duration_s=0.0, trials=1
    )
    report = measure("noop", dummy_model, settings)
    (trial,) = report.trials
    assert trial.valid and len(trial.samples_ms) == 200
    assert np.median(trial.samples_ms) < 1.0  # a no-op call is far under a millisecond
    assert report.backend_version == edgefarm.__version__
    assert report.environment["noop.model_size_bytes"] == "128"


def test_noop_predict_is_one_hot_of_the_first_ten_features() -> None:
    batch = np.zeros((3, 12), dtype=np.float32)
    batch[0, 4] = 1.0
    batch[1, 9] = 2.0
    batch[2, 11] = 5.0  # beyond the first ten features: ignored, argmax of zeros is 0
    out = NoopBackend().predict(batch)
    assert out.shape == (3, 10)
    np.testing.assert_array_equal(np.argmax(out, axis=1), [4, 9, 0])
    np.testing.assert_array_equal(out.sum(axis=1), [1, 1, 1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killed_agent_leaves_no_orphan(tmp_path: Path, dummy_model: Path) -> None:
    script = (
        "import asyncio, pathlib\n"
        "from agent.runner import run_measurement\n"
        "from edgefarm.domain import MeasureSettings\n"
        f"asyncio.run(run_measurement('noop', 'fp32', pathlib.Path({str(dummy_model)!r}), None,\n"
        "    MeasureSettings(trials=1, timeout_s=120), {'noop_sleep_s': '120'}))\n"
    )
    agent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 20
        children: list[psutil.Process] = []
        while not children and time.monotonic() < deadline:
            time.sleep(0.1)
            children = psutil.Process(agent.pid).children()
        assert children, "the measuring child never started"
        agent.kill()
        agent.wait(10)
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, "the measuring child outlived its agent"
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)


def test_child_environment_pins_threads() -> None:
    env = child_environment(3)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        assert env[var] == "3"
    assert str(Path(__file__).resolve().parents[2]) in env["PYTHONPATH"].split(os.pathsep)


def test_registry() -> None:
    assert get_backend("noop") is NoopBackend
    assert get_backend("onnxruntime").NAME == "onnxruntime"
    with pytest.raises(BackendUnavailable, match=r"unknown backend 'nope'.*noop, onnxruntime"):
        get_backend("nope")
    found = installed_backends()
    assert found["noop"] == edgefarm.__version__
    assert found["onnxruntime"] == importlib.metadata.version("onnxruntime")


def test_agent_imports_stay_light() -> None:
    """The agent side never imports the coordinator's stack; listing backends imports no runtime."""
    code = (
        "import sys\n"
        "import agent.runner, agent.trial, agent.backends.onnxruntime, agent.backends.noop\n"
        "from agent.backends import installed_backends\n"
        "installed_backends()\n"
        "bad = ('ray', 'sqlalchemy', 'sklearn', 'coordinator', 'results', 'onnxruntime', 'onnx')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_runtime_names_the_extra() -> None:
    class Absent(OnnxRuntimeBackend):
        MODULE = "edgefarm_no_such_runtime"
        EXTRA = "no-such-extra"

    assert Absent.installed_version() is None
    with pytest.raises(MissingExtra, match=r"edgefarm\[no-such-extra\]"):
        Absent.require()
