"""Backends in their own environments (agent.backend_envs): a virtual environment made
here whose interpreter runs the onnxruntime backend's trial children, the probe asking it
for the backend's version, and the one-line refusals of bad --backend-env values."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from agent.backend_envs import BackendEnv, parse_backend_envs, probe_env_backends
from agent.probe import probe_device
from agent.runner import run_measurement
from edgefarm.domain import MeasureSettings
from edgefarm.errors import UsageError

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
pytest.importorskip("sklearn", reason="scikit-learn (the coordinator extra) is not installed")


def _venv(folder: Path, with_packages: bool) -> Path:
    """A fresh virtual environment (no pip); with ``with_packages`` it sees this
    environment's installed packages through a .pth file, nothing else of it."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    if with_packages:
        purelib = Path(sysconfig.get_paths()["purelib"])
        site = next((folder / "lib").glob("python3*/site-packages"))
        (site / "agent-packages.pth").write_text(f"{purelib}\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def side_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _venv(tmp_path_factory.mktemp("envs") / "ort-env", with_packages=True)


def test_parse_refusals(tmp_path: Path, side_env: Path) -> None:
    envs = parse_backend_envs([f"onnxruntime={side_env}"])
    assert envs["onnxruntime"].python == side_env / "bin" / "python"
    assert parse_backend_envs([f"onnxruntime={side_env}/bin/python"])["onnxruntime"].path
    for value, message in [
        ("onnxruntime", "expected NAME=PATH"),
        ("=x", "expected NAME=PATH"),
        (f"tensorflow={side_env}", "unknown backend 'tensorflow'"),
        (f"onnxruntime={tmp_path / 'absent'}", "no Python interpreter at"),
    ]:
        with pytest.raises(UsageError, match=message) as info:
            parse_backend_envs([value])
        assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="given twice"):
        parse_backend_envs([f"onnxruntime={side_env}", f"onnxruntime={side_env}"])


def test_probe_asks_the_environment(side_env: Path, tmp_path: Path) -> None:
    import onnxruntime

    found = probe_env_backends(parse_backend_envs([f"onnxruntime={side_env}"]))
    assert found["onnxruntime"]["version"] == onnxruntime.__version__
    assert found["onnxruntime"]["prefix"] == str(side_env)
    caps = probe_device(env_backends=found)
    assert caps.backends["onnxruntime"] == onnxruntime.__version__
    assert caps.extra["backend_env.onnxruntime"].startswith(str(side_env))

    bare = _venv(tmp_path / "bare", with_packages=False)
    with pytest.raises(UsageError, match=r"^--backend-env onnxruntime=.*bare: ") as info:
        probe_env_backends(parse_backend_envs([f"onnxruntime={bare}"]))
    assert "\n" not in str(info.value)


def test_trials_run_with_the_environments_interpreter(side_env: Path, tmp_path: Path) -> None:
    """The onnxruntime backend measured by children of the side environment's Python: the
    result says which environment, and the child's own sys.prefix proves it ran there."""
    import asyncio

    from coordinator.models.digits import build_digits_model

    bundle = build_digits_model(tmp_path / "digits")
    env = parse_backend_envs([f"onnxruntime={side_env}"])["onnxruntime"]
    assert isinstance(env, BackendEnv)
    settings = MeasureSettings(
        warmup_iterations=2,
        min_iterations=20,
        min_duration_s=0.01,
        trials=2,
        threads=1,
        timeout_s=120,
        max_other_cpu_cores=0.0,
    )
    report = asyncio.run(
        run_measurement(
            "onnxruntime", "fp32", bundle.model_path, bundle.eval_path, settings, {}, env=env
        )
    )
    assert len(report.trials) == 2 and all(t.valid for t in report.trials)
    assert report.accuracy["top1"] > 0.9
    assert report.environment["backend_env"] == str(side_env)
    assert report.environment["backend_env.python"].endswith(f" at {side_env}")
