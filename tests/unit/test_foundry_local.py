"""The Foundry Local backend in its own environment: foundry-local-sdk installed into a
virtual environment of its own (it pins another onnxruntime and protobuf), the agent's
probe asking it for the SDK's version, and the onnxruntime-genai int4 build of a tiny
Qwen3 checkpoint measured through the SDK in-process, by that environment's Python.

The environment is $EDGEFARM_FOUNDRY_ENV when set, else built once under
~/.cache/edgefarm (pip, from the package registry); the tests skip when it cannot be."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.backend_envs import parse_backend_envs, probe_env_backends
from agent.runner import run_measurement
from edgefarm.domain import MeasureSettings
from edgefarm.errors import ModelLoadError

pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
pytest.importorskip("transformers", reason="transformers is not installed (the hf extra)")

SDK = "foundry-local-sdk==2.2.1"
SETTINGS = MeasureSettings(
    warmup_iterations=2,
    min_iterations=20,
    min_duration_s=0.05,
    trials=2,
    threads=1,
    context_tokens=256,
    timeout_s=240,
    max_other_cpu_cores=0.0,
)


@pytest.fixture(scope="module")
def foundry_env() -> Path:
    given = os.environ.get("EDGEFARM_FOUNDRY_ENV")
    if given:
        return Path(given)
    env = Path.home() / ".cache" / "edgefarm" / "foundry-env-2.2.1"
    python = env / "bin" / "python"
    if not (python.exists() and _has_sdk(python)):
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True)
        try:
            done = subprocess.run(
                [str(python), "-m", "pip", "install", "-q", SDK, "numpy", "psutil"],
                capture_output=True,
                text=True,
                timeout=900,
            )
        except subprocess.TimeoutExpired:
            pytest.skip(f"{SDK} could not be installed in 15 minutes")
        if done.returncode != 0:
            pytest.skip(f"{SDK} could not be installed: {done.stderr.strip()[-300:]}")
    return env


def _has_sdk(python: Path) -> bool:
    return (
        subprocess.run([str(python), "-c", "import foundry_local_sdk"], check=False).returncode == 0
    )


@pytest.fixture(scope="module")
def genai_int4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from agent.backends.archive import write_folder_tar
    from coordinator.conversion.hf_to_genai import convert_genai
    from coordinator.models.checkpoints import build_random_checkpoint

    work = tmp_path_factory.mktemp("foundry")
    build_random_checkpoint("qwen3", work / "qwen3", seed=1)
    convert_genai(work / "qwen3", work / "int4", "int4")
    tar = work / "qwen3.genai-int4.tar"
    with tar.open("wb") as out:
        write_folder_tar(work / "int4", out)
    return tar


@pytest.mark.timeout(1200)
def test_measured_through_the_sdk_in_its_own_environment(
    foundry_env: Path, genai_int4: Path
) -> None:
    envs = parse_backend_envs([f"foundry-local={foundry_env}"])
    found = probe_env_backends(envs)
    assert found["foundry-local"]["version"] == "2.2.1"
    report = asyncio.run(
        run_measurement(
            "foundry-local", "int4", genai_int4, None, SETTINGS, {}, env=envs["foundry-local"]
        )
    )
    assert len(report.trials) == 2 and all(t.valid for t in report.trials), report.trials
    metrics = report.trials[0].metrics
    assert metrics["ttft_ms"] > 0 and metrics["prompt_tokens"] > 0
    assert metrics["prompt_tok_per_s"] > 0 and metrics["context_tokens"] == 256
    assert min(report.trials[0].samples_ms) > 0
    assert report.backend_version == "2.2.1"
    assert report.environment["backend_env"] == str(foundry_env)
    assert report.environment["fidelity"].startswith("not available")
    assert report.environment["foundry_local.threads"] == "1"
    assert report.accuracy == {}


def test_a_bad_folder_is_a_typed_load_error(foundry_env: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "genai_config.json").write_text("{not json")
    envs = parse_backend_envs([f"foundry-local={foundry_env}"])
    with pytest.raises(ModelLoadError, match=r"genai_config\.json is not JSON") as info:
        asyncio.run(
            run_measurement(
                "foundry-local", "int4", folder, None, SETTINGS, {}, env=envs["foundry-local"]
            )
        )
    assert "\n" not in str(info.value)
