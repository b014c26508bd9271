"""The coordinator's content-addressed artifact store: files and folders go in streamed
and hashed while written, steps hand finished files over by rename, folder artifacts
unpack once, and hostile archives are refused."""

from __future__ import annotations

import hashlib
import io
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from agent.backends.archive import extract_tar, write_folder_tar
from coordinator.artifacts import ArtifactStore
from edgefarm.errors import ArtifactError, ModelLoadError


def _folder(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 64)
    return root


def test_put_file_hashes_while_copying_and_is_idempotent(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF" + bytes(3 << 20))
    ref = store.put_file(source, "model.gguf")
    assert ref.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    assert ref.size_bytes == source.stat().st_size and ref.name == "model.gguf"
    assert store.path(ref.sha256).read_bytes() == source.read_bytes()
    assert store.put_file(source, "again.gguf").sha256 == ref.sha256
    assert not any((tmp_path / "store" / ".staging").iterdir())  # no temp file left behind


def test_put_file_memory_does_not_grow_with_the_file(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    big = tmp_path / "big.bin"
    with big.open("wb") as handle:
        handle.truncate(64 << 20)  # 64 MiB, sparse
    tracemalloc.start()
    store.put_file(big, "big.bin")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 << 20, f"{peak} bytes allocated for a 64 MiB file"


def test_folder_tar_is_deterministic_and_unpacks_once(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "hf")
    store = ArtifactStore(tmp_path / "store")
    ref = store.put_folder(folder, "hf.tar")
    again = store.put_folder(folder, "hf.tar")
    assert again.sha256 == ref.sha256
    buffer = io.BytesIO()
    write_folder_tar(folder, buffer)
    assert hashlib.sha256(buffer.getvalue()).hexdigest() == ref.sha256
    with tarfile.open(store.path(ref.sha256)) as tar:
        assert tar.getnames() == ["config.json", "sub/weights.bin"]
        assert {m.mtime for m in tar.getmembers()} == {0}
    unpacked = store.folder(ref.sha256)
    assert (unpacked / "sub" / "weights.bin").read_bytes() == (
        folder / "sub" / "weights.bin"
    ).read_bytes()
    assert store.folder(ref.sha256) == unpacked


def test_put_folder_include_filter(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "hf")
    store = ArtifactStore(tmp_path / "store")
    ref = store.put_folder(folder, "c.tar", include=lambda rel: rel == "config.json")
    with tarfile.open(store.path(ref.sha256)) as tar:
        assert tar.getnames() == ["config.json"]


def test_adopt_moves_a_staged_file_into_place(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    staging = store.staging()
    out = staging / "F16.gguf"
    out.write_bytes(b"GGUF-f16")
    ref = store.adopt(out, "F16.gguf")
    assert not out.exists() and store.has(ref.sha256)
    assert store.existing(ref).read_bytes() == b"GGUF-f16"


@pytest.mark.parametrize(
    ("member", "kind"),
    [("../escape.txt", tarfile.REGTYPE), ("/abs.txt", tarfile.REGTYPE), ("link", tarfile.SYMTYPE)],
)
def test_hostile_archives_are_refused(tmp_path: Path, member: str, kind: bytes) -> None:
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo(member)
        info.type = kind
        if kind == tarfile.SYMTYPE:
            info.linkname = "/etc/passwd"
            tar.addfile(info)
        else:
            data = b"x"
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ModelLoadError, match=r"bad\.tar"):
        extract_tar(archive, tmp_path / "out", archive.name)
    assert not (tmp_path / "escape.txt").exists()


def test_missing_and_malformed_artifacts(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(ArtifactError, match="not a sha256"):
        store.path("../../etc/passwd")
    with pytest.raises(ArtifactError, match="not in the store"):
        store.folder("0" * 64)
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x00not a tar" * 100)
    with pytest.raises(ModelLoadError, match="not a readable model folder archive"):
        extract_tar(garbage, tmp_path / "out", garbage.name)
