"""Llama, Qwen3, Phi-3 and Gemma 3 through onnxruntime, OpenVINO and MLX.

Once per module, for each architecture: a tiny random-weight checkpoint of its real
configuration (:func:`coordinator.models.checkpoints.build_random_checkpoint`), its
KV-cache ONNX export (checked against transformers inside the export: also a prompt
longer than Gemma 3's 64-token sliding window and one in Phi-3's long LongRoPE regime),
the OpenVINO IR of that export, and an LLM reference built from transformers' own
log-probabilities (one chunk of 80 tokens: past Gemma 3's window). The backends run in
this process (no trial children) with a few decode steps each.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch is not installed (the hf extra)")
pytest.importorskip("transformers", reason="transformers is not installed (the hf extra)")
onnx = pytest.importorskip("onnx", reason="onnx is not installed")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
pytest.importorskip("gguf", reason="gguf is not installed (the SmolLM2 tokenizer)")

from agent.backends.archive import write_folder_tar  # noqa: E402
from agent.backends.language_model import LanguageModelBackend  # noqa: E402
from agent.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from agent.llm_eval import save_llm_reference  # noqa: E402
from agent.llm_fidelity import log_softmax, top_k  # noqa: E402
from coordinator.conversion.hf_to_onnx import export_causal_lm  # noqa: E402
from coordinator.conversion.onnx_files import model_files, save_model  # noqa: E402
from coordinator.conversion.onnx_schemes import quantize_onnx  # noqa: E402
from coordinator.models import checkpoints  # noqa: E402
from edgefarm.domain import MeasureSettings  # noqa: E402
from edgefarm.errors import UnsupportedArchitecture  # noqa: E402

ARCHS = ("llama", "qwen3", "phi3", "gemma3")
REF_TOKENS = REF_CTX = 80  # one chunk, longer than Gemma 3's sliding window (64)
SETTINGS = MeasureSettings(
    warmup_iterations=1, min_iterations=4, threads=2, prompt_tokens=4, context_tokens=9
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """arch -> its checkpoint folder, ONNX export (+ provenance) and LLM reference."""
    work = tmp_path_factory.mktemp("archs")
    found: dict[str, dict[str, Any]] = {}
    for arch in ARCHS:  # the tokenizer is read from the packaged GGUF once per process
        folder = work / arch / "hf"
        checkpoints.build_random_checkpoint(arch, folder)
        onnx_path = work / arch / "onnx" / "model.onnx"
        found[arch] = {
            "hf": folder,
            "onnx": onnx_path,
            "export": export_causal_lm(folder, onnx_path),
            "reference": _reference(folder, work / arch / "ref.npz"),
        }
    return found


def _reference(folder: Path, out: Path) -> Path:
    """An LLM reference file from transformers' float32 log-probabilities."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokens = np.random.default_rng(7).integers(0, checkpoints.TOKENIZER_VOCAB, REF_TOKENS)
    rows = []
    with torch.inference_mode():
        for start in range(0, REF_TOKENS, REF_CTX):
            chunk = torch.from_numpy(tokens[start : start + REF_CTX][None])
            rows.append(log_softmax(model(chunk).logits[0, :-1].numpy()))
    logprobs = np.concatenate(rows)
    targets = np.concatenate(
        [tokens[s + 1 : s + REF_CTX] for s in range(0, REF_TOKENS, REF_CTX)]
    ).astype(np.int32)
    ids, values = top_k(logprobs, 16)
    save_llm_reference(
        out,
        {
            "tokens": tokens.astype(np.int32),
            "targets": targets,
            "ref_target_logprob": logprobs[np.arange(len(targets)), targets].astype(np.float32),
            "ref_topk_ids": ids.astype(np.int32),
            "ref_topk_logprob": values.astype(np.float32),
            "n_ctx": np.array(REF_CTX, dtype=np.int32),
            "top_k": np.array(16, dtype=np.int32),
        },
    )
    return out


def _decode_and_score(backend: LanguageModelBackend, reference: Path) -> dict[str, float]:
    """A few decode steps (through the context's end, so the rewind runs), then fidelity."""
    step = backend.timed_call(backend.make_inputs(None, 1))
    for _ in range(SETTINGS.context_tokens - SETTINGS.prompt_tokens + 2):
        step()
    assert backend.extra_metrics(SETTINGS)["prompt_tok_per_s"] > 0
    return backend.evaluate(reference, SETTINGS)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_onnx_export_matches_transformers(built: dict[str, dict[str, Any]], arch: str) -> None:
    prov = built[arch]["export"]
    check = prov["check"]
    assert check["relative"] <= check["tolerance_relative"] == 1e-3
    assert prov["files"] == ["model.onnx"] and not prov["external_data"]
    assert "Gemm" not in prov["op_types"]
    if arch == "gemma3":  # sliding layers: a banded mask, checked past the window
        assert prov["attention_masks"]["types"] == {"full_attention": None, "sliding_attention": 64}
        assert check["cases"]["past_sliding_window"]["prompt_tokens"] > 64
    if arch == "phi3":  # LongRoPE: both regimes in the graph, both checked
        assert prov["rope"]["kind"] == "longrope"
        assert check["cases"]["longrope_long"]["prompt_tokens"] > 512
    if arch == "qwen3":
        assert prov["model_head_dim"] == 64


@pytest.mark.parametrize("arch", ARCHS)
def test_onnxruntime_decodes_and_matches_the_reference(
    built: dict[str, dict[str, Any]], arch: str
) -> None:
    backend = OnnxRuntimeBackend()
    backend.load(built[arch]["onnx"], SETTINGS, {})
    llm = backend._llm
    assert isinstance(llm, LanguageModelBackend)
    fidelity = _decode_and_score(llm, built[arch]["reference"])
    assert fidelity["kld_mean"] < 1e-6, fidelity
    assert fidelity["top1_agreement"] == 1.0


@pytest.mark.parametrize("arch", ARCHS)
def test_openvino_decodes_and_matches_the_reference(
    built: dict[str, dict[str, Any]], arch: str, tmp_path: Path
) -> None:
    pytest.importorskip("openvino", reason="openvino is not installed")
    from agent.backends.openvino import pack_ir
    from agent.backends.openvino_llm import OpenVinoLlmBackend
    from coordinator.conversion.openvino_schemes import convert_openvino

    xml = tmp_path / "ir" / "model.xml"
    convert_openvino(built[arch]["onnx"], xml, "fp32", None)
    tar = tmp_path / "ir.tar"
    tar.write_bytes(pack_ir(xml))
    backend = OpenVinoLlmBackend()
    backend.load(tar, SETTINGS, {})
    fidelity = _decode_and_score(backend, built[arch]["reference"])
    assert fidelity["kld_mean"] < 1e-6, fidelity
    assert fidelity["top1_agreement"] == 1.0


@pytest.mark.parametrize("arch", ARCHS)
def test_mlx_fp16_converts_loads_and_matches_the_reference(
    built: dict[str, dict[str, Any]], arch: str, tmp_path: Path
) -> None:
    pytest.importorskip("mlx_lm", reason="mlx-lm is not installed")
    from agent.backends.mlx import MlxBackend
    from coordinator.conversion.mlx_convert import convert_mlx

    prov = convert_mlx(built[arch]["hf"], tmp_path / "mlx", "fp16")
    if arch == "phi3":  # mlx-lm's LongRoPE always takes long_factor: given the short one
        assert prov["config_normalisation"]["longrope"]["valid_up_to_tokens"] == 512
    backend = MlxBackend()
    backend.load(tmp_path / "mlx", SETTINGS, {})
    fidelity = _decode_and_score(backend, built[arch]["reference"])
    # float16 weights and activations, sharp attention: Gemma 3 ~3e-3 (mlx-lm's LongRoPE
    # as it is, long factors at 80 tokens, is off by 0.3-0.7 of the logits' range)
    assert fidelity["kld_mean"] < 1e-2, fidelity
    assert fidelity["top1_agreement"] >= 0.9
    if arch == "phi3":
        too_long = MeasureSettings(prompt_tokens=8, context_tokens=600)
        with pytest.raises(UnsupportedArchitecture, match=r"^phi3: .* up to 512 tokens"):
            MlxBackend().load(tmp_path / "mlx", too_long, {})


def test_an_onnx_model_with_external_data_is_one_folder_artifact(
    built: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """model.onnx + model.onnx.data: quantized, converted and measured as one tar."""
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    files = save_model(onnx.load(str(built["qwen3"]["onnx"])), src, external=True)
    assert [p.name for p in files] == ["model.onnx", "model.onnx.data"]
    int4 = tmp_path / "int4" / "model.onnx"
    prov = quantize_onnx(src, int4, "int4-weight", None)
    assert prov["files"] == ["model.onnx", "model.onnx.data"]
    assert sorted(p.name for p in int4.parent.iterdir()) == prov["files"]  # no scratch left
    assert prov["size_bytes"] == sum(p.stat().st_size for p in model_files(int4))
    tar = tmp_path / "int4.onnx.tar"
    with tar.open("wb") as out:
        write_folder_tar(int4.parent, out)
    backend = OnnxRuntimeBackend()
    backend.load(tar, SETTINGS, {})
    assert backend.environment()["onnxruntime.model_layout"] == "folder archive"
    llm = backend._llm
    assert isinstance(llm, LanguageModelBackend)
    fidelity = _decode_and_score(llm, built["qwen3"]["reference"])
    assert 0 < fidelity["kld_mean"] < 0.5  # 4-bit weights: near, not equal

    pytest.importorskip("openvino", reason="openvino is not installed")
    from coordinator.conversion.openvino_schemes import convert_openvino

    ir = convert_openvino(src, tmp_path / "ir" / "model.xml", "fp32", None)
    assert ir["weight_storage"]["f32"] > 0


def test_a_folder_artifact_must_hold_one_onnx_file(tmp_path: Path) -> None:
    from edgefarm.errors import ModelLoadError

    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("a.onnx", "b.onnx"):
        (folder / name).write_bytes(b"x")
    buffer = io.BytesIO()
    write_folder_tar(folder, buffer)
    tar = tmp_path / "two.onnx.tar"
    tar.write_bytes(buffer.getvalue())
    with pytest.raises(ModelLoadError, match=r"exactly one \.onnx file"):
        OnnxRuntimeBackend().load(tar, SETTINGS, {})


def test_scattered_external_data_is_gathered_into_one_file(tmp_path: Path) -> None:
    """What a >2 GB export looks like (one file per tensor) becomes model.onnx + .data."""
    import onnxruntime

    from coordinator.conversion.onnx_files import consolidate_external_data

    helper, rng = onnx.helper, np.random.default_rng(0)
    weights = [rng.standard_normal((8, 8)).astype(np.float32) for _ in range(3)]
    nodes = [helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"]) for i in range(3)]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("h0", onnx.TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("h3", onnx.TensorProto.FLOAT, [1, 8])],
        [onnx.numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    scattered = tmp_path / "export" / "model.onnx"
    scattered.parent.mkdir()
    onnx.save_model(
        model,
        str(scattered),
        save_as_external_data=True,
        all_tensors_to_one_file=False,
        size_threshold=0,
    )
    assert len(model_files(scattered)) == 4
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    files = consolidate_external_data(scattered, out)
    assert [p.name for p in files] == ["model.onnx", "model.onnx.data"]
    assert model_files(out) == files
    x = rng.standard_normal((1, 8)).astype(np.float32)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        session.run(None, {"h0": x})[0], x @ weights[0] @ weights[1] @ weights[2], rtol=1e-5
    )


def test_what_a_backend_cannot_take_is_a_typed_one_line_reason(tmp_path: Path) -> None:
    """Dynamic (NTK) RoPE cannot be traced; a graph OpenVINO cannot read names its arch."""
    import transformers

    from coordinator.conversion.onnx_files import set_metadata

    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=128,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "dynamic")
    with pytest.raises(UnsupportedArchitecture, match=r"^llama \(LlamaForCausalLM\): dynamic"):
        export_causal_lm(tmp_path / "dynamic", tmp_path / "out" / "model.onnx")
    assert not any((tmp_path / "out").iterdir())

    pytest.importorskip("openvino", reason="openvino is not installed")
    from coordinator.conversion.openvino_schemes import convert_openvino

    helper = onnx.helper
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"], domain="org.example")],
        "custom",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("org.example", 1)],
        ir_version=8,
    )
    set_metadata(model, {"edgefarm.model_type": "newarch", "edgefarm.architecture": "NewLM"})
    src = tmp_path / "custom.onnx"
    onnx.save(model, str(src))
    with pytest.raises(UnsupportedArchitecture, match=r"^newarch \(NewLM\): .*\(openvino\)") as err:
        convert_openvino(src, tmp_path / "ir" / "model.xml", "fp32", None)
    assert "\n" not in str(err.value)
