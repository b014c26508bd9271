"""SmolLM2-135M as ONNX with a KV cache: export, quantization and the onnxruntime LLM mode.

Built once per module from the packaged Q4_1 GGUF: the HF folder, its ONNX export,
an INT4 (MatMulNBits) variant and a llama.cpp reference (the F16 GGUF's log-probs on
the first 256 tokens of the project's eval text, chunks of 128). The variants are
measured through the real trial children with backend ``onnxruntime``.
"""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch is not installed (the hf extra)")
pytest.importorskip("transformers", reason="transformers is not installed (the hf extra)")
onnx = pytest.importorskip("onnx", reason="onnx is not installed")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
pytest.importorskip("gguf", reason="gguf is not installed (the llama-cpp extra)")
pytest.importorskip("llama_cpp", reason="llama-cpp-python (the reference) is not installed")

from agent.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from agent.backends.onnxruntime_llm import (  # noqa: E402
    KvGraph,
    OnnxRuntimeLlmBackend,
    OrtDecodeStep,
)
from agent.llm_fidelity import log_softmax  # noqa: E402
from agent.runner import TrialsReport, run_measurement  # noqa: E402
from coordinator.conversion.onnx_schemes import quantize_onnx  # noqa: E402
from edgefarm.domain import MeasureSettings  # noqa: E402
from edgefarm.errors import TaskError  # noqa: E402
from tests.unit.conftest import REF_TOKENS  # noqa: E402

LAYERS = 30  # SmolLM2-135M
TINY = MeasureSettings(
    max_other_cpu_cores=0.0,  # record only: these tests are not about the busy-host guard
    warmup_iterations=2,
    min_iterations=8,
    min_duration_s=0.0,
    trials=2,
    threads=2,
    prompt_tokens=32,
    context_tokens=64,
    timeout_s=240.0,
)


@pytest.fixture(scope="module")
def exported(smollm2_onnx: tuple[Path, dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    return smollm2_onnx


@pytest.fixture(scope="module")
def int4(exported: tuple[Path, dict[str, Any]], smollm2_work: Path) -> tuple[Path, dict[str, Any]]:
    path = smollm2_work / "int4.onnx"
    return path, quantize_onnx(exported[0], path, "int4-weight", None)


@pytest.fixture(scope="module")
def reference(smollm2_reference: Path) -> Path:
    return smollm2_reference


@pytest.fixture(scope="module")
def measured(
    exported: tuple[Path, dict[str, Any]], int4: tuple[Path, dict[str, Any]], reference: Path
) -> dict[str, TrialsReport]:
    runs = {"fp32": exported[0], "int4-weight": int4[0]}
    return {
        scheme: asyncio.run(run_measurement("onnxruntime", scheme, path, reference, TINY, {}))
        for scheme, path in runs.items()
    }


def test_export_is_a_kv_cache_graph_of_matmuls_matching_transformers(
    exported: tuple[Path, dict[str, Any]],
) -> None:
    path, prov = exported
    assert prov["kv_cache"] is True
    assert prov["size_bytes"] == path.stat().st_size
    assert prov["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert len(prov["inputs"]) == 3 + 2 * LAYERS
    assert prov["outputs"][:3] == ["logits", "present.0.key", "present.0.value"]
    assert prov["model_layers"] == LAYERS
    assert "Gemm" not in prov["op_types"]
    # per layer: 7 projections + 2 attention products, and the LM head
    assert prov["op_types"]["MatMul"] == 9 * LAYERS + 1
    check = prov["check"]
    assert check["max_abs_diff_prompt"] <= 1e-3
    assert check["max_abs_diff_decode_step"] <= 1e-3
    graph = onnx.load(str(path), load_external_data=False)
    assert [i.name for i in graph.graph.input] == prov["inputs"]
    assert prov["tool_versions"]["onnx"] == onnx.__version__


def test_int4_replaces_every_weight_matmul(int4: tuple[Path, dict[str, Any]]) -> None:
    path, prov = int4
    assert prov["op_types"]["MatMulNBits"] == 7 * LAYERS + 1
    assert prov["op_types"]["MatMul"] == 2 * LAYERS  # activation x activation (attention)
    assert prov["size_bytes"] == path.stat().st_size


def test_decode_steps_continue_the_prompt_and_rewind_exactly(
    int4: tuple[Path, dict[str, Any]],
) -> None:
    settings = MeasureSettings(
        warmup_iterations=0, min_iterations=8, threads=1, prompt_tokens=8, context_tokens=16
    )
    backend = OnnxRuntimeBackend()  # the campaign's backend: it routes to the LLM mode
    backend.load(int4[0], settings, {})
    llm = backend._llm
    assert isinstance(llm, OnnxRuntimeLlmBackend)
    tokens = backend.make_inputs(None, 1)
    step = backend.timed_call(tokens)
    assert isinstance(step, OrtDecodeStep)
    passes: list[list[np.ndarray]] = [[], []]
    for i in range(16):
        step()
        passes[i // 8].append(step.logits.numpy()[0, -1])
    # the cached steps give the logits of one forward over the whole context
    full = next(llm.chunk_logprobs(tokens, 16))  # log-softmax of rows 0..14
    for offset, logits in enumerate(passes[0][:-1]):
        np.testing.assert_allclose(log_softmax(logits), full[8 + offset], atol=2e-3)
    # after the rewind each position is recomputed from the prompt's cache: same logits
    for first, second in zip(*passes, strict=True):
        np.testing.assert_array_equal(second, first)
    env = backend.environment()
    assert env["onnxruntime.kv_cache"] == "true"
    assert env["onnxruntime.intra_op_num_threads"] == "1"


def test_fp32_and_int4_are_measured_and_scored_against_llama_cpp(
    measured: dict[str, TrialsReport], exported: tuple[Path, dict[str, Any]]
) -> None:
    for scheme, report in measured.items():
        assert len(report.trials) == TINY.trials
        for trial in report.trials:
            assert trial.valid, (scheme, trial.invalid_reason)
            assert len(trial.samples_ms) >= TINY.min_iterations
            assert 1000.0 / statistics.fmean(trial.samples_ms) > 0  # generation tok/s
            assert trial.metrics["prompt_tok_per_s"] > 0
            assert trial.metrics["prompt_tokens"] == TINY.prompt_tokens
            assert trial.metrics["context_tokens"] == TINY.context_tokens
            # TTFT runs a 32-token prompt: longer than one decode step
            assert trial.metrics["ttft_ms"] > statistics.median(trial.samples_ms)
        env = report.environment
        assert env["onnxruntime.task"] == "llm"
        assert env["onnxruntime.kv_cache"] == "true"
        assert env["onnxruntime.intra_op_num_threads"] == str(TINY.threads)
        assert report.accuracy["examples"] == REF_TOKENS - 2
    fp32, int4 = measured["fp32"].accuracy, measured["int4-weight"].accuracy
    print(f"\nfp32 {fp32}\nint4 {int4}")
    # fp32 onnxruntime vs llama.cpp F16: the same model, numerically slightly different
    assert abs(fp32["ppl_ratio"] - 1.0) < 0.01
    assert fp32["kld_mean"] < 0.01
    assert fp32["top1_agreement"] >= 0.97
    # 4-bit weights on top of a Q4_1 source: visibly further from the reference
    assert int4["kld_mean"] > 10 * fp32["kld_mean"]
    assert int4["ppl_ratio"] > fp32["ppl_ratio"]
    assert int4["top1_agreement"] < fp32["top1_agreement"]
    sizes = {scheme: r.model_size_bytes for scheme, r in measured.items()}
    assert sizes["fp32"] == exported[0].stat().st_size
    assert sizes["int4-weight"] < sizes["fp32"] / 2


def test_an_llm_reference_needs_the_llm_mode(
    int4: tuple[Path, dict[str, Any]], reference: Path
) -> None:
    settings = MeasureSettings(threads=1, prompt_tokens=8, context_tokens=64)
    backend = OnnxRuntimeBackend()
    tokens = backend.read_eval_inputs(reference, settings)
    assert len(tokens) == REF_TOKENS
    with pytest.raises(TaskError, match="eval file is an LLM reference"):
        backend.load(int4[0], settings, {"task": "classify"})
    with pytest.raises(TaskError, match="unknown onnxruntime task 'chat'"):
        OnnxRuntimeBackend().load(int4[0], settings, {"task": "chat"})


def test_a_causal_lm_without_a_kv_cache_is_refused(tmp_path: Path) -> None:
    """A bigram "LM" (input_ids -> Gather -> logits): no past inputs, no decode steps."""
    helper = onnx.helper
    vocab = 8
    table = onnx.numpy_helper.from_array(np.eye(vocab, dtype=np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["logits"])],
        "bigram",
        [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [1, "seq"])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, "seq", vocab])],
        [table],
    )
    path = tmp_path / "bigram.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    with pytest.raises(TaskError, match="needs a KV-cache graph"):
        OnnxRuntimeBackend().load(path, MeasureSettings(prompt_tokens=8), {})
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with pytest.raises(TaskError, match="needs a KV-cache graph"):
        KvGraph.of(session)
