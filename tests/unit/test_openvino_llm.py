"""SmolLM2-135M as an OpenVINO IR with a KV cache: the LLM mode of the openvino backend.

Built once per module from the packaged Q4_1 GGUF: the HF folder, its ONNX export, the
IR in fp32 and int4-asym (convert_openvino + pack_ir, the artifact store's tar) and a
llama.cpp reference (the F16 GGUF's log-probs on the first 256 tokens of the project's
eval text, chunks of 128). Both IRs are measured through the real trial children with
backend ``openvino``, at the default (f32) inference precision.
"""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ov = pytest.importorskip("openvino", reason="openvino is not installed (the openvino extra)")
pytest.importorskip("nncf", reason="nncf (OpenVINO weight compression) is not installed")
pytest.importorskip("torch", reason="torch is not installed (the hf extra)")
pytest.importorskip("transformers", reason="transformers is not installed (the hf extra)")
onnx = pytest.importorskip("onnx", reason="onnx is not installed")
pytest.importorskip("gguf", reason="gguf is not installed (the llama-cpp extra)")
pytest.importorskip("llama_cpp", reason="llama-cpp-python (the reference) is not installed")

from agent.backends.openvino import OpenVinoBackend, pack_ir  # noqa: E402
from agent.backends.openvino_llm import OpenVinoLlmBackend, OvDecodeStep  # noqa: E402
from agent.llm_fidelity import log_softmax  # noqa: E402
from agent.runner import TrialsReport, run_measurement  # noqa: E402
from coordinator.conversion.openvino_schemes import convert_openvino  # noqa: E402
from edgefarm.domain import MeasureSettings  # noqa: E402
from edgefarm.errors import TaskError  # noqa: E402
from tests.unit.conftest import REF_TOKENS  # noqa: E402

LAYERS = 30  # SmolLM2-135M
SCHEMES = ("fp32", "int4-asym")
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
def irs(
    smollm2_onnx: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Each scheme's IR tar (as the artifact store holds it) and its provenance."""
    work = tmp_path_factory.mktemp("openvino-llm")
    found = {}
    for scheme in SCHEMES:
        xml = work / scheme / "model.xml"
        prov = convert_openvino(smollm2_onnx[0], xml, scheme, None, None)
        tar = work / f"{scheme}.tar"
        tar.write_bytes(pack_ir(xml))
        xml.with_suffix(".bin").unlink()  # the tar holds it: keep the disk use down
        found[scheme] = (tar, prov)
    return found


@pytest.fixture(scope="module")
def reference(smollm2_reference: Path) -> Path:
    return smollm2_reference


@pytest.fixture(scope="module")
def measured(
    irs: dict[str, tuple[Path, dict[str, Any]]], reference: Path
) -> dict[str, TrialsReport]:
    return {
        scheme: asyncio.run(run_measurement("openvino", scheme, tar, reference, TINY, {}))
        for scheme, (tar, _prov) in irs.items()
    }


def test_weight_compression_applies_to_every_projection(
    irs: dict[str, tuple[Path, dict[str, Any]]],
) -> None:
    fp32, int4 = irs["fp32"][1]["weight_storage"], irs["int4-asym"][1]["weight_storage"]
    weights = 7 * LAYERS + 2  # 7 projections per layer, the embedding and the LM head
    assert fp32["f32"] == weights
    # NNCF's default keeps the first and last weights (embedding, LM head) in INT8
    assert int4["u4/g64"] == 7 * LAYERS
    assert int4["u8"] == 2
    assert "f32" not in int4
    sizes = {scheme: tar.stat().st_size for scheme, (tar, _) in irs.items()}
    assert sizes["int4-asym"] < sizes["fp32"] / 4


def test_decode_steps_continue_the_prompt_share_the_cache_and_rewind_exactly(
    irs: dict[str, tuple[Path, dict[str, Any]]],
) -> None:
    settings = MeasureSettings(
        warmup_iterations=0, min_iterations=8, threads=1, prompt_tokens=8, context_tokens=16
    )
    backend = OpenVinoBackend()  # the campaign's backend: it routes to the LLM mode
    backend.load(irs["fp32"][0], settings, {})
    llm = backend._llm
    assert isinstance(llm, OpenVinoLlmBackend)
    tokens = np.asarray(backend.make_inputs(None, 1))  # the LLM mode's token stream
    step = backend.timed_call(tokens)
    assert isinstance(step, OvDecodeStep)
    passes: list[list[np.ndarray]] = [[], []]
    for i in range(16):
        step()
        passes[i // 8].append(step.logits.data[0, -1].copy())
        if i % 8:  # this step's past is the other request's present: the same memory
            mine, other = step.requests[(8 + i) % 2], step.requests[(7 + i) % 2]
            for past, present in zip(step.past, step.present, strict=True):
                shared = other.get_output_tensor(present).data.ctypes.data
                assert mine.get_input_tensor(past).data.ctypes.data == shared
        assert step.cache[0].shape[2] == 8 + i % 8 + 1  # the cache grows by one token
    # the cached steps give the logits of one forward over the whole context
    full = next(llm.chunk_logprobs(tokens, 16))  # log-softmax of rows 0..14
    for offset, logits in enumerate(passes[0][:-1]):
        np.testing.assert_allclose(log_softmax(logits), full[8 + offset], atol=2e-3)
    # after the rewind each position is recomputed from the prompt's cache: same logits
    for first, second in zip(*passes, strict=True):
        np.testing.assert_array_equal(second, first)
    env = backend.environment()
    assert env["openvino.kv_cache"] == "true"
    assert env["openvino.inference_precision"] == "f32"
    assert env["openvino.inference_num_threads"] == "1"


def test_fp32_and_int4_are_measured_and_scored_against_llama_cpp(
    measured: dict[str, TrialsReport], irs: dict[str, tuple[Path, dict[str, Any]]]
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
        assert env["openvino.task"] == "llm"
        assert env["openvino.kv_cache"] == "true"
        assert env["openvino.inference_precision_requested"] == "f32"
        assert env["openvino.inference_precision"] == "f32"  # not this CPU's bf16 default
        assert env["openvino.inference_num_threads"] == str(TINY.threads)
        assert report.accuracy["examples"] == REF_TOKENS - 2
        assert report.model_size_bytes == irs[scheme][0].stat().st_size
        speeds = [1000.0 / statistics.fmean(t.samples_ms) for t in report.trials]
        print(f"\n{scheme}: gen tok/s {speeds}, metrics {report.trials[0].metrics}")
    fp32, int4 = measured["fp32"].accuracy, measured["int4-asym"].accuracy
    print(f"fp32 {fp32}\nint4-asym {int4}")
    # fp32 OpenVINO vs llama.cpp F16: the same model, numerically slightly different
    assert abs(fp32["ppl_ratio"] - 1.0) < 0.01
    assert fp32["kld_mean"] < 0.01
    assert fp32["top1_agreement"] >= 0.97
    # 4-bit weights (and 8-bit dynamic activations) on top of a Q4_1 source: further off
    assert int4["kld_mean"] > 10 * fp32["kld_mean"]
    assert int4["ppl_ratio"] > fp32["ppl_ratio"]
    assert int4["top1_agreement"] < fp32["top1_agreement"]


def test_an_llm_reference_needs_the_llm_mode(
    irs: dict[str, tuple[Path, dict[str, Any]]], reference: Path
) -> None:
    tar = irs["int4-asym"][0]
    settings = MeasureSettings(threads=1, prompt_tokens=8, context_tokens=128)
    backend = OpenVinoBackend()
    tokens = backend.read_eval_inputs(reference, settings)
    assert len(tokens) == REF_TOKENS
    with pytest.raises(TaskError, match="eval file is an LLM reference"):
        backend.load(tar, settings, {"task": "classify"})
    with pytest.raises(TaskError, match="unknown openvino task 'chat'"):
        OpenVinoBackend().load(tar, settings, {"task": "chat"})


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
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(tmp_path / "bigram.onnx"))
    xml = tmp_path / "bigram.xml"
    ov.save_model(ov.convert_model(str(tmp_path / "bigram.onnx")), str(xml))
    tar = tmp_path / "bigram.tar"
    tar.write_bytes(pack_ir(xml))
    with pytest.raises(TaskError, match="needs a KV-cache graph"):
        OpenVinoBackend().load(tar, MeasureSettings(prompt_tokens=8), {})
    with pytest.raises(TaskError, match="needs a KV-cache graph"):
        OpenVinoLlmBackend().load(tar, MeasureSettings(prompt_tokens=8), {})
