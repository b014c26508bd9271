"""Hostile specs and model files: each ends in one line and its exit code, never a
traceback, never unbounded memory or time.

The corpus lives in ``tests/fixtures/hostile``: every spec's first line is
``# expect: FRAGMENT``, a piece of the one error line that must follow ``error: FILE``
(usually ``:LINE: field: problem``; alternatives separated by `` || `` where libyaml
and PyYAML's own parser word it differently); ``models/expected.json`` maps each hostile model
file to a fragment of its error. Inputs too large to keep in the repository are made
here.
"""

from __future__ import annotations

import io
import json
import re
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from agent.backends import archive
from agent.backends.archive import extract_tar
from agent.backends.gguf_check import check_gguf
from coordinator.models.sources import MAX_CONFIG_BYTES, checkpoint_files
from coordinator.spec import MAX_VARIANTS, CampaignSpec
from edgefarm import yamlfile
from edgefarm.cli.main import main
from edgefarm.errors import ModelLoadError, SpecError
from edgefarm.wire_limits import MAX_SPEC_BYTES
from inventory.fleet import load_inventory

HOSTILE = Path(__file__).resolve().parents[1] / "fixtures" / "hostile"
SPECS = sorted((HOSTILE / "specs").glob("*.yaml"))
MODELS = json.loads((HOSTILE / "models" / "expected.json").read_text())
BASE = """\
name: hostile
models:
  - name: m
    source: builtin:digits-mlp
backends:
  - name: onnxruntime
    schemes: [fp32]
"""
# The billion-laughs and deep-nesting files also run in a child process with these.
MEMORY_LIMIT = 1536 << 20
TIME_LIMIT_S = 20.0


def _expected(path: Path) -> list[str]:
    first = path.read_bytes().split(b"\n", 1)[0].decode("utf-8")
    assert first.startswith("# expect: "), f"{path.name} has no '# expect:' first line"
    return first.removeprefix("# expect: ").split(" || ")


def _dry_run(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """``edgefarm campaign run PATH --dry-run`` in this process; its one error line."""
    with pytest.raises(SystemExit) as info:
        main(["campaign", "run", str(path), "--dry-run"])
    captured = capsys.readouterr()
    assert info.value.code == 3, captured.err
    assert captured.out == ""
    assert "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err[:2000]
    assert re.match(rf"error: {re.escape(str(path))}:\d+: ", lines[0]), lines[0][:300]
    assert len(lines[0]) < 1000
    return lines[0]


def test_the_corpus_is_there() -> None:
    assert len(SPECS) >= 30
    assert len(MODELS) >= 15


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_hostile_spec_is_one_line_and_exit_code_3(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _dry_run(path, capsys)
    assert any(line.startswith(f"error: {path}{want}") for want in _expected(path)), line[:300]


@pytest.mark.parametrize("parser", ["default", "pure-python"])
@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_hostile_spec_text_submitted_remotely_is_a_spec_error(
    path: Path, parser: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same bytes as text (what the coordinator validates): a SpecError, nothing
    else; also with PyYAML's own parser (used where PyYAML lacks libyaml)."""
    if parser == "pure-python":
        monkeypatch.setattr(yamlfile, "_Loader", yamlfile._PyLoader)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        pytest.skip("not text: only a file can hold it")
    with pytest.raises(SpecError) as info:
        CampaignSpec.from_text(text, "remote.yaml")
    message = str(info.value)
    assert "\n" not in message and len(message) < 1000
    assert any(message.startswith(f"remote.yaml{want}") for want in _expected(path)), message


def _generated(tmp_path: Path) -> dict[str, tuple[bytes, str]]:
    """Hostile specs too large to keep: name -> (bytes, expected fragment)."""
    every_backend = "\n".join(
        f"  - name: {name}\n    schemes: [{', '.join(schemes)}]"
        for name, schemes in [
            ("onnxruntime", ["fp32", "fp16", "int8-dynamic", "int8-static", "int4-weight"]),
            ("openvino", ["fp32", "fp16", "int8-weights", "int4-sym", "int4-asym", "int8-ptq"]),
            ("llama-cpp", ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_1", "Q4_K_M", "Q4_0", "Q3_K_M"]),
            ("qai-hub", ["fp32", "fp16", "int8", "int16", "w4a8", "w4a16"]),
            ("mlx", ["fp16", "q8", "q4"]),
            ("noop", ["none"]),
        ]
    )
    models = "".join(f"  - name: m{i}\n    source: builtin:digits-mlp\n" for i in range(350))
    return {
        "two-megabytes.yaml": (
            (BASE + "description: '" + "a" * (2 << 20) + "'\n").encode(),
            ":1: the file is larger than 1048576 bytes",
        ),
        "one-byte-too-many.yaml": (
            (BASE + "description: '" + "a" * MAX_SPEC_BYTES + "'\n").encode()[: MAX_SPEC_BYTES + 1],
            ":1: the file is larger than 1048576 bytes",
        ),
        "long-description.yaml": (
            (BASE + "description: '" + "d" * 70_000 + "'\n").encode(),
            ":8: description: text of 70000 bytes is too long (limit 65536)",
        ),
        "long-option-value.yaml": (
            (BASE + "    options: {mode: '" + "o" * 70_000 + "'}\n").encode(),
            ":8: backends[0].options.mode: text of 70000 bytes is too long (limit 65536)",
        ),
        "long-invalid-utf8.yaml": (
            (BASE + "description: '" + "u" * 500_000).encode() + b"\xc3\x28'\n",
            ":8: not a UTF-8 text file (byte 0xc3",
        ),
        "too-many-variants.yaml": (
            f"name: wide\nmodels:\n{models}backends:\n{every_backend}\n".encode(),
            f"models: the sweep has 10150 variants (models x backends x schemes; "
            f"limit {MAX_VARIANTS})",
        ),
        "too-many-models.yaml": (
            (
                "name: wide\nmodels:\n"
                + "".join(f"  - {{name: m{i}, source: 'builtin:x'}}\n" for i in range(1100))
                + "backends: [{name: noop, schemes: [none]}]\n"
            ).encode(),
            ":2: models: list should have at most 1024 items",
        ),
        "too-many-nodes.yaml": (
            (BASE + "description:\n" + "".join(f"  - {i}\n" for i in range(100_001))).encode(),
            "invalid YAML: more than 100000 values",
        ),
    }


def test_generated_hostile_specs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, (data, fragment) in _generated(tmp_path).items():
        path = tmp_path / name
        path.write_bytes(data)
        started = time.monotonic()
        line = _dry_run(path, capsys)
        assert fragment in line, (name, line[:300])
        assert time.monotonic() - started < TIME_LIMIT_S, name


def test_a_device_file_is_read_no_further_than_the_limit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """/dev/zero never ends: the spec reader stops after MAX_SPEC_BYTES + 1 bytes."""
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    line = _dry_run(Path("/dev/zero"), capsys)
    assert "the file is larger than" in line


@pytest.mark.parametrize(
    "name",
    [
        "billion-laughs-selector.yaml",
        "billion-laughs-description.yaml",
        "deep-nesting-flow-5000.yaml",
    ],
)
def test_bombs_stay_within_memory_and_time_in_a_child_process(name: str) -> None:
    """The CLI itself, as a user runs it, with its address space and time bounded."""
    path = HOSTILE / "specs" / name

    def limit() -> None:  # runs in the child before exec
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    code = "import sys; from edgefarm.cli.main import main; sys.exit(main(sys.argv[1:]))"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code, "campaign", "run", str(path), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=TIME_LIMIT_S,
        preexec_fn=limit,
        check=False,
    )
    assert time.monotonic() - started < TIME_LIMIT_S
    assert done.returncode == 3, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "MemoryError" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:"), done.stderr[-2000:]
    assert any(lines[0].startswith(f"error: {path}{want}") for want in _expected(path))


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (
            "devices:\n  - name: box\n    selector:\n"
            + "".join(
                f"      l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else "lol"] * 10) + "]\n"
                for i in range(10)
            ),
            "invalid YAML: more than 100000 values after alias expansion",
        ),
        ("devices:\n  - name: b\x07ox\n", ":2: invalid YAML: control character U+0007"),
        ("devices: " + "[" * 100 + "]" * 100 + "\n", ":1: invalid YAML: nested deeper than 32"),
        ("devices: &d\n  - *d\n", ":1: invalid YAML: the node anchored here contains an alias"),
    ],
)
def test_the_inventory_file_has_the_same_bounds(tmp_path: Path, body: str, fragment: str) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(body)
    with pytest.raises(SpecError) as info:
        load_inventory(path)
    message = str(info.value)
    assert message.startswith(f"{path}:") and fragment in message and "\n" not in message


# ----- model files -------------------------------------------------------------------------

GGUFS = sorted(name for name in MODELS if name.endswith(".gguf"))
CONFIGS = sorted(name for name in MODELS if name.endswith(".json"))


@pytest.mark.parametrize("name", GGUFS)
def test_hostile_gguf_headers_are_one_line_model_load_errors(name: str) -> None:
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        check_gguf(HOSTILE / "models" / name)
    message = str(info.value)
    assert MODELS[name] in message and "\n" not in message and name in message
    assert time.monotonic() - started < 5.0


def _checkpoint(folder: Path, config: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_bytes(config)
    (folder / "model.safetensors").write_bytes(b"{}")
    return folder


@pytest.mark.parametrize("name", CONFIGS)
def test_hostile_checkpoint_configs_are_one_line_spec_errors(tmp_path: Path, name: str) -> None:
    folder = _checkpoint(tmp_path / "ckpt", (HOSTILE / "models" / name).read_bytes())
    with pytest.raises(SpecError) as info:
        checkpoint_files(folder)
    message = str(info.value)
    assert MODELS[name] in message and "\n" not in message and len(message) < 500


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (b'{"x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "nests deeper than 64 levels"),
        (
            b'{"model_type": "llama", "pad": "' + b"p" * MAX_CONFIG_BYTES + b'"}',
            "larger than 4 MiB",
        ),
        (b'{"vocab_size": ' + b"9" * 5000 + b"}", "an integer of 5000 digits"),
    ],
)
def test_large_hostile_checkpoint_configs(tmp_path: Path, config: bytes, fragment: str) -> None:
    folder = _checkpoint(tmp_path / "ckpt", config)
    with pytest.raises(SpecError, match=re.escape(fragment)):
        checkpoint_files(folder)


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if info.isfile():
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buffer.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize(
    ("members", "fragment"),
    [
        ([(_member("../up.txt"), b"x")], "unsafe name"),
        ([(_member("a/../../up.txt"), b"x")], "unsafe name"),
        ([(_member("/etc/cron.d/x"), b"x")], "unsafe name"),
        ([(_member("a\\..\\..\\x"), b"x")], "unsafe name"),
        ([(_member("bell\x07.txt"), b"x")], "unsafe name"),
        ([(_member("link", tarfile.SYMTYPE, "/etc/passwd"), b"")], "not a plain file"),
        ([(_member("hard", tarfile.LNKTYPE, "/etc/passwd"), b"")], "not a plain file"),
        ([(_member("dev", tarfile.CHRTYPE), b"")], "not a plain file"),
        ([(_member("blk", tarfile.BLKTYPE), b"")], "not a plain file"),
        ([(_member("fifo", tarfile.FIFOTYPE), b"")], "not a plain file"),
        ([(_member("m.onnx"), b"1"), (_member("m.onnx"), b"2")], "twice"),
        ([(_member("Model.onnx"), b"1"), (_member("model.onnx"), b"2")], "twice"),
        ([(_member("a"), b"1"), (_member("a/b"), b"2")], "both a file and a folder"),
        ([(_member("a/b"), b"1"), (_member("a"), b"2")], "both a file and a folder"),
        ([(_member("x" * 2000), b"1")], "member name too long"),
        ([(_member("/".join(["d"] * 40)), b"1")], "folders deep"),
    ],
)
def test_hostile_archives_are_refused_before_anything_is_written(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]], fragment: str
) -> None:
    data = _tar(members)
    out = tmp_path / "out"
    with pytest.raises(ModelLoadError, match=re.escape(fragment)) as info:
        extract_tar(data, out, "hostile.tar")
    assert "hostile.tar" in str(info.value) and "\n" not in str(info.value)
    assert not out.exists() or not any(out.iterdir())
    assert not (tmp_path / "up.txt").exists()


def test_an_archive_claiming_more_bytes_than_it_holds(tmp_path: Path) -> None:
    data = bytearray(_tar([(_member("w.bin"), b"w" * 512)]))
    # rewrite the member's size field (octal, offset 124 of its header) to 1 GiB
    header = data.index(b"w.bin")
    start = header - header % 512
    data[start + 124 : start + 136] = b"%011o\x00" % (1 << 30)
    data[start + 148 : start + 156] = b"        "
    checksum = sum(data[start : start + 512])
    data[start + 148 : start + 156] = b"%06o\x00 " % checksum
    with pytest.raises(ModelLoadError, match=r"not a readable|more than the archive holds"):
        extract_tar(bytes(data), tmp_path / "out", "hostile.tar")
    assert not (tmp_path / "out").exists()


def test_an_archive_with_too_many_members(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive, "MAX_MEMBERS", 10)
    data = _tar([(_member(f"f{i}"), b"") for i in range(11)])
    with pytest.raises(ModelLoadError, match="more than 10 members"):
        extract_tar(data, tmp_path / "out", "many.tar")


def test_a_plain_folder_archive_still_unpacks(tmp_path: Path) -> None:
    data = _tar([(_member("sub", tarfile.DIRTYPE), b""), (_member("sub/w.bin"), b"ok")])
    out = extract_tar(data, tmp_path / "out", "good.tar")
    assert (out / "sub" / "w.bin").read_bytes() == b"ok"
