"""Hugging Face checkpoint -> GGUF with llama.cpp's own converter, on tiny random-weight
checkpoints of the four architectures: the F16 GGUF's logits against transformers' fp32
logits, its tokenizer against the checkpoint's, its RoPE bases against config.json; the
converter's fetch, lookup and typed one-line errors.

The conversions (and one failing one) run in parallel in a module fixture: each converter
child spends most of its time importing torch and transformers.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.conversion import hf_to_gguf as h2g
from coordinator.conversion import llama_converter as lc
from coordinator.conversion.logit_check import TOLERANCES, logit_difference
from edgefarm.errors import ConversionError, MissingExtra, UnsupportedArchitecture

ARCHS = ("llama", "qwen3", "phi3", "gemma3")
GGUF_ARCH = {"llama": "llama", "qwen3": "qwen3", "phi3": "phi3", "gemma3": "gemma3"}
TEXT = "The quick brown fox jumps over the lazy dog. Edge devices run 12345 small models."
N_TOKENS = 16
# The logit check's measure (RMS |diff| / std of the logits) of the F16 GGUF against
# transformers fp32, measured on these checkpoints and TEXT: llama 7.3e-4, qwen3 2.6e-3,
# phi3 8.9e-4, gemma3 1.3e-2 (their sharp attention amplifies rounding); a wrong RoPE base
# measures 1.2e-1 to 8.1e-1 (logit_check's docstring). Gemma 3's F16 GGUF flips one
# near-tied argmax of 16 (top-1 agreement 94%); a wrong RoPE base keeps 16-81%.
MAX_REL_DIFF = TOLERANCES["gguf-f16"]
MIN_TOP1 = 0.9
PARAMS_ONLY = "gemma3"  # converted from a config without the hub's RoPE keys
HUB_KEYS = ("rope_theta", "rope_scaling", "rope_local_base_freq", "partial_rotary_factor")


def _converter() -> lc.ConverterInfo:
    try:
        return lc.find_converter()
    except MissingExtra as err:
        pytest.skip(str(err))


def _params_only(src: Path, dst: Path) -> Path:
    """``src`` with transformers 5's ``rope_parameters`` only (no hub-style keys)."""
    dst.mkdir()
    for entry in src.iterdir():
        if entry.name != "config.json":
            (dst / entry.name).symlink_to(entry)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    (dst / "config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k not in HUB_KEYS}), encoding="utf-8"
    )
    return dst


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each tiny checkpoint, its F16 GGUF and provenance. Gemma 3 (two RoPE bases) is
    converted from a copy whose config.json has transformers 5's ``rope_parameters`` only;
    the other three from the builder's config (both spellings)."""
    pytest.importorskip("torch", reason="torch is not installed (the hf extra)")
    pytest.importorskip("transformers", reason="transformers is not installed (the hf extra)")
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    _converter()
    from coordinator.models import checkpoints

    root = tmp_path_factory.mktemp("hf2gguf")
    folders = {arch: root / arch for arch in ARCHS}
    sources = {**folders, PARAMS_ONLY: root / f"{PARAMS_ONLY}-params-only"}

    def convert(arch: str) -> Any:
        try:
            return h2g.convert_checkpoint(sources[arch], root / "out" / f"{arch}.gguf")
        except ConversionError as err:
            return err

    # each conversion starts as soon as its checkpoint is built (a build uses one core)
    with ThreadPoolExecutor(len(ARCHS)) as pool, pytest.MonkeyPatch.context() as patch:
        # reading SmolLM2's tokenizer from its GGUF is most of a tiny build: read it once
        patch.setattr(checkpoints, "_smollm2_tokenizer", cache(checkpoints._smollm2_tokenizer))
        futures = {}
        for arch in ARCHS:
            checkpoints.build_random_checkpoint(arch, folders[arch])
            if arch == PARAMS_ONLY:
                _params_only(folders[arch], sources[arch])
            futures[arch] = pool.submit(convert, arch)
        results = {arch: future.result() for arch, future in futures.items()}
    return {"root": root, "folders": folders, "sources": sources, "results": results}


def _hf_logits(folder: Path) -> tuple[list[int], np.ndarray, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = [int(i) for i in tokenizer.encode(TEXT, add_special_tokens=False)][:N_TOKENS]
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy().astype(np.float32)
    return ids, logits, tokenizer


def _gguf_metadata(path: Path) -> dict[str, str]:
    """The GGUF's metadata as llama.cpp reads it (values as strings)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        return dict(llm.metadata)
    finally:
        llm.close()


# ----- conversions -------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_f16_logits_match_transformers(arch: str, converted: dict[str, Any]) -> None:
    from agent.llm_eval import open_llama

    prov = converted["results"][arch]
    assert isinstance(prov, dict), prov
    ids, expected, tokenizer = _hf_logits(converted["folders"][arch])
    llm = open_llama(converted["root"] / "out" / f"{arch}.gguf", 32, 2, logits_all=True)
    try:
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        # the tokenizer path: llama.cpp splits the text exactly as the checkpoint does
        pieces = llm.tokenize(TEXT.encode(), add_bos=False, special=False)
    finally:
        llm.close()
    assert got.shape == expected.shape
    measured = logit_difference(expected, got)
    print(f"{arch}: {measured}")
    assert measured["relative"] < MAX_REL_DIFF
    assert measured["top1_agreement"] >= MIN_TOP1
    assert list(pieces) == [int(i) for i in tokenizer.encode(TEXT, add_special_tokens=False)]


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_rope_and_provenance(arch: str, converted: dict[str, Any]) -> None:
    prov = converted["results"][arch]
    assert isinstance(prov, dict), prov
    config = json.loads((converted["folders"][arch] / "config.json").read_text(encoding="utf-8"))
    meta = _gguf_metadata(converted["root"] / "out" / f"{arch}.gguf")
    name = GGUF_ARCH[arch]
    assert meta["general.architecture"] == name == prov["gguf_architecture"]
    assert float(meta[f"{name}.rope.freq_base"]) == pytest.approx(config["rope_theta"])
    if "rope_local_base_freq" in config:
        swa = float(meta[f"{name}.rope.freq_base_swa"])
        assert swa == pytest.approx(config["rope_local_base_freq"])
    assert prov["tool"] == h2g.TOOL and prov["outtype"] == "f16"
    assert prov["architecture"] == config["architectures"][0]
    assert prov["converter_version"] == lc.installed_version()
    assert len(prov["script_sha256"]) == 64
    assert prov["tensor_count"] > 0 and prov["size_bytes"] > 1_000_000
    assert prov["peak_rss_bytes"] > 50_000_000 and prov["wall_s"] > 0
    anon = prov["peak_anon_rss_bytes"]
    assert anon is None or 0 < anon <= prov["peak_rss_bytes"]
    # llama.cpp cannot load a model named like Phi-3 whose vocabulary lacks '</s>'
    assert "phi3" not in meta["general.name"].lower()


def test_rope_parameters_only_config(converted: dict[str, Any]) -> None:
    """A transformers-5 config.json without the hub's keys: the staged copy gets them back
    (the GGUF's bases are checked against the original config above)."""
    source = converted["sources"][PARAMS_ONLY]
    assert "rope_theta" not in json.loads((source / "config.json").read_text(encoding="utf-8"))
    prov = converted["results"][PARAMS_ONLY]
    assert isinstance(prov, dict), prov
    assert {"rope_theta", "rope_local_base_freq"} <= set(prov["staged_changes"])


def _scaling(value: Any) -> Any:
    """A rope_scaling dict without the keys that also stand at the top level."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in ("rope_theta", "partial_rotary_factor")}
    return value


@pytest.mark.parametrize("arch", ARCHS)
def test_normalized_config_restores_hub_keys(arch: str, converted: dict[str, Any]) -> None:
    config = json.loads((converted["folders"][arch] / "config.json").read_text(encoding="utf-8"))
    stripped = {k: v for k, v in config.items() if k not in HUB_KEYS}
    normalized, added = h2g.normalized_config(stripped)
    for key in HUB_KEYS:
        if config.get(key) is not None:
            assert _scaling(normalized[key]) == _scaling(config[key]), key
            assert key in added
    assert h2g.normalized_config(config)[1] == []  # a complete config is left as it is


# ----- errors (a stand-in converter where one must run) -------------------------------


def _fake_converter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, release: str = "9.9.9"
) -> Path:
    """A converter folder whose script runs ``body``; a checkpoint folder for it."""
    folder = tmp_path / "converter"
    (folder / "conversion").mkdir(parents=True)
    (folder / "conversion" / "__init__.py").write_text(
        "TEXT_MODEL_MAP = {'LlamaForCausalLM': 'llama', 'BrokenForCausalLM': 'broken'}\n"
    )
    (folder / lc.SCRIPT).write_text(f"import sys, time\n{body}\n")
    (folder / lc.MANIFEST).write_text(json.dumps({"llama_cpp_python": release}))
    monkeypatch.setenv(lc.ENV_FOLDER, str(folder))
    monkeypatch.setattr(lc, "installed_version", lambda: release)
    monkeypatch.setattr(h2g, "_require_modules", lambda folder: None)  # it needs no torch
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return checkpoint


def test_converter_failure_is_its_last_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = ("print('INFO:hf-to-gguf:Loading model: ckpt')\n"
            "raise ValueError('Error: Missing tokenizer.model')")
    checkpoint = _fake_converter(tmp_path, monkeypatch, body)
    with pytest.raises(ConversionError) as info:
        h2g.convert_checkpoint(checkpoint, tmp_path / "out" / "x.gguf")
    assert str(info.value) == (
        "llama.cpp's converter failed on ckpt (LlamaForCausalLM): "
        "ValueError: Error: Missing tokenizer.model"
    )
    assert list((tmp_path / "out").iterdir()) == []  # no partial output, no staging


def test_converter_refusing_the_architecture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = "print('ERROR:hf-to-gguf:Model LlamaForCausalLM is not supported'); sys.exit(1)"
    checkpoint = _fake_converter(tmp_path, monkeypatch, body)
    with pytest.raises(UnsupportedArchitecture, match="LlamaForCausalLM is not supported by llama"):
        h2g.convert_checkpoint(checkpoint, tmp_path / "x.gguf")


def test_timeout_is_a_conversion_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = _fake_converter(tmp_path, monkeypatch, "time.sleep(60)")
    with pytest.raises(ConversionError, match="ran past its 0 s limit"):
        h2g.convert_checkpoint(checkpoint, tmp_path / "out" / "x.gguf", timeout_s=0.3)
    assert list((tmp_path / "out").iterdir()) == []


def test_missing_config_is_a_conversion_error(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"no config\.json") as info:
        h2g.convert_checkpoint(tmp_path, tmp_path / "x.gguf")
    assert "\n" not in str(info.value)


def test_unknown_architecture(tmp_path: Path) -> None:
    """Refused from the converter's registry, before any child runs."""
    _converter()
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NoSuchLMForCausalLM"]}))
    with pytest.raises(UnsupportedArchitecture) as info:
        h2g.convert_checkpoint(tmp_path, tmp_path / "x.gguf")
    message = str(info.value)
    assert "NoSuchLMForCausalLM" in message and "llama.cpp" in message and "\n" not in message


def test_last_error_line() -> None:
    log = ["INFO:hf-to-gguf:Loading model: x", "Traceback (most recent call last):",
           '  File "a.py", line 1, in <module>', "ValueError: Error: Missing tokenizer.model",
           "", "Writing: 100%"]
    assert h2g.last_error_line(log) == "ValueError: Error: Missing tokenizer.model"
    assert h2g.last_error_line(["just this"]) == "just this"


def test_bundled_gguf_is_imported() -> None:
    info = _converter()
    done = subprocess.run(
        [sys.executable, "-c", "import gguf; print(gguf.__file__)"],
        env=h2g.converter_env(info), capture_output=True, text=True, check=True,
    )
    assert Path(done.stdout.strip()).is_relative_to(info.gguf_py)


def test_converter_version_names_the_release() -> None:
    info = _converter()
    assert h2g.converter_version() == (
        f"llama-cpp-python=={info.version}+sha256:{info.script_sha256[:12]}"
    )


# ----- fetching and finding the converter --------------------------------------------


def _sdist(path: Path, release: str, extra: dict[str, bytes] | None = None) -> Path:
    """A fake llama-cpp-python sdist holding a converter's skeleton (and ``extra``)."""
    top = f"llama_cpp_python-{release}"
    files = {
        f"{top}/vendor/llama.cpp/convert_hf_to_gguf.py": b"print('converter')\n",
        f"{top}/vendor/llama.cpp/conversion/__init__.py": b"TEXT_MODEL_MAP = {'A': 'a'}\n",
        f"{top}/vendor/llama.cpp/gguf-py/gguf/__init__.py": b"",
        f"{top}/vendor/llama.cpp/src/llama.cpp": b"// not kept\n",
        f"{top}/.git/modules/vendor/llama.cpp/HEAD": b"0c1e57098bba43ac29e6e3b677cdceebdd22334f\n",
        **(extra or {}),
    }
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
        link = tarfile.TarInfo(f"{top}/vendor/llama.cpp/conversion/link.py")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    return path


def test_fetch_extracts_only_the_converter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lc, "installed_version", lambda: "9.9.9")
    sdist = _sdist(tmp_path / "llama_cpp_python-9.9.9.tar.gz", "9.9.9")
    folder = lc.fetch_converter(tmp_path / "share", sdist=sdist)
    assert folder == tmp_path / "share" / "llama.cpp-converter-9.9.9"
    kept = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert kept == ["conversion/__init__.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py",
                    "manifest.json"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["llama_cpp_python"] == "9.9.9"
    assert manifest["llama_cpp_commit"].startswith("0c1e5709")
    info = lc.find_converter(tmp_path / "share")
    assert info.version == "9.9.9" and info.script == folder / lc.SCRIPT
    assert info.script_sha256 == manifest["script_sha256"]
    # a complete folder is reused: no archive is read the second time
    assert lc.fetch_converter(tmp_path / "share", sdist=tmp_path / "absent.tar.gz") == folder
    assert not list((tmp_path / "share").glob(".*"))  # no staging folders left


def test_fetch_refuses_path_traversal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lc, "installed_version", lambda: "9.9.9")
    evil = {"llama_cpp_python-9.9.9/vendor/llama.cpp/conversion/../../../../evil.py": b"x"}
    sdist = _sdist(tmp_path / "evil.tar.gz", "9.9.9", evil)
    with pytest.raises(MissingExtra, match="unsafe path"):
        lc.fetch_converter(tmp_path / "share", sdist=sdist)
    assert not (tmp_path / "evil.py").exists()
    assert not (tmp_path / "share" / "llama.cpp-converter-9.9.9").exists()


def test_fetch_leaves_a_users_folder_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lc, "installed_version", lambda: "9.9.9")
    mine = tmp_path / "llama.cpp"
    mine.mkdir()
    (mine / lc.SCRIPT).write_text("# a checkout\n")
    monkeypatch.setenv(lc.ENV_FOLDER, str(mine))
    sdist = _sdist(tmp_path / "llama_cpp_python-9.9.9.tar.gz", "9.9.9")
    assert lc.fetch_converter(sdist=sdist) == mine
    assert sorted(p.name for p in mine.iterdir()) == [lc.SCRIPT]


def test_missing_converter_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lc, "installed_version", lambda: "9.9.9")
    monkeypatch.setenv(lc.ENV_FOLDER, str(tmp_path / "nowhere"))
    with pytest.raises(MissingExtra) as info:
        lc.find_converter()
    message = str(info.value)
    assert "\n" not in message and "llama_converter fetch" in message


def test_converter_of_another_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lc, "installed_version", lambda: "9.9.9")
    folder = tmp_path / "conv"
    (folder / "conversion").mkdir(parents=True)
    (folder / lc.SCRIPT).write_text("")
    (folder / lc.MANIFEST).write_text(json.dumps({"llama_cpp_python": "0.1.0"}))
    monkeypatch.setenv(lc.ENV_FOLDER, str(folder))
    with pytest.raises(MissingExtra, match=r"0\.1\.0 but 9\.9\.9 is installed"):
        lc.find_converter()
