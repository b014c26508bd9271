"""Microsoft Olive as a conversion step (coordinator.conversion.olive_convert): the spec's
``olive-*`` schemes, the command and workflow checks, and real Olive runs on the digit
classifier with the network refused: a step that makes any DNS lookup or connection
fails, and the control run with Olive's real telemetry shows the guard sees it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.conversion.olive_convert import (
    olive_request,
    parse_command,
    read_workflow,
    run_olive,
)
from coordinator.spec import CampaignSpec
from edgefarm.errors import ConversionError, SpecError, UsageError

ROOT = Path(__file__).resolve().parents[2]
INT8 = "quantize --implementation ort --precision int8"
INT4 = "quantize --implementation olive --precision int4"


def test_commands_are_checked() -> None:
    assert parse_command(INT8) == ["quantize", "--implementation", "ort", "--precision", "int8"]
    bad = [
        ("", "empty"),
        ("quantize 'unterminated", "cannot split"),
        ("run --config x.json", "unknown Olive command 'run'"),
        ("rm -rf /", "unknown Olive command 'rm'"),
        (f"{INT8} -o /tmp/elsewhere", "option -o is not allowed"),
        (f"{INT8} --model_name_or_path=org/model", "option --model_name_or_path is not allowed"),
        (f"{INT8} -d some/hub-dataset", "option -d is not allowed"),
        (f"{INT8} --trust_remote_code", "option --trust_remote_code is not allowed"),
        ("quantize " + "x " * 80, "words"),
    ]
    for text, message in bad:
        with pytest.raises(ValueError, match=message):
            parse_command(text)
    assert olive_request({"olive": INT4})["command"][0] == "quantize"
    assert olive_request({"olive_workflow": "file:w.json"}) == {"workflow_path": "w.json"}
    for params, message in [
        ({}, "exactly one of"),
        ({"olive": INT8, "olive_workflow": "file:w.json"}, "exactly one of"),
        ({"olive": INT8, "block_size": 32}, "unknown Olive conversion parameter 'block_size'"),
        ({"olive": 8}, "must be text"),
        ({"olive_workflow": "w.json"}, "must be 'file:PATH'"),
    ]:
        with pytest.raises(ValueError, match=message):
            olive_request(params)


def test_workflow_files_are_checked(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"passes": {"q": {"type": "OnnxDynamicQuantization"}}}))
    assert read_workflow(good)["passes"]["q"]["type"] == "OnnxDynamicQuantization"
    cases = {
        "notjson.json": (b"{passes", "not JSON"),
        "list.json": (b"[1, 2]", "expected a JSON object with 'passes'"),
        "nopasses.json": (b'{"passes": {}}', "expected a JSON object with 'passes'"),
        "binary.json": (b"\xff\xfe\x00", "not JSON"),
        "huge.json": (b" " * ((1 << 20) + 1), "too large"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UsageError, match=message) as info:
            read_workflow(tmp_path / name)
        assert name in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UsageError, match="No such file"):
        read_workflow(tmp_path / "absent.json")


SPEC = """name: olive
models:
  - name: digits-mlp
    source: builtin:digits-mlp
backends:
  - name: onnxruntime
    schemes: [fp32, SCHEME]
CONVERT"""


@pytest.mark.parametrize(
    ("scheme", "convert", "expected"),
    [
        ("olive-int8", "", "7: backends[0].schemes[1]: scheme 'olive-int8' needs convert"),
        (
            "olive-int8",
            "    convert:\n      olive-int8: {olive: 'quantize -o /x'}\n",
            "9: backends[0].convert.olive-int8: option -o is not allowed",
        ),
        (
            "olive-int8",
            "    convert:\n      olive-int8: {olive: 'transmogrify'}\n",
            "9: backends[0].convert.olive-int8: unknown Olive command 'transmogrify'",
        ),
        ("olive-Bad", "", "7: backends[0].schemes[1]: invalid scheme name 'olive-Bad'"),
        ("int3", "", "7: backends[0].schemes[1]: unknown scheme 'int3' for onnxruntime"),
    ],
)
def test_olive_schemes_in_a_spec(tmp_path: Path, scheme: str, convert: str, expected: str) -> None:
    path = tmp_path / "olive.yaml"
    path.write_text(SPEC.replace("SCHEME", scheme).replace("CONVERT", convert))
    with pytest.raises(SpecError) as info:
        CampaignSpec.load(path)
    assert str(info.value).startswith(f"{path}:{expected}")
    assert "\n" not in str(info.value)


def test_olive_scheme_with_a_command_is_a_variant(tmp_path: Path) -> None:
    path = tmp_path / "olive.yaml"
    convert = f"    convert:\n      olive-int8: {{olive: '{INT8}'}}\n"
    path.write_text(SPEC.replace("SCHEME", "olive-int8").replace("CONVERT", convert))
    variants = CampaignSpec.load(path).variants()
    assert [(v.scheme, v.convert) for v in variants] == [
        ("fp32", {}),
        ("olive-int8", {"olive": INT8}),
    ]


# ----- real Olive runs ------------------------------------------------------------------

olive_installed = pytest.mark.skipif(
    importlib.util.find_spec("olive") is None, reason="olive-ai (the olive extra) is not installed"
)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("sklearn", reason="scikit-learn (the coordinator extra) is not installed")
    from coordinator.models.digits import build_digits_model

    return build_digits_model(tmp_path_factory.mktemp("digits")).model_path


@olive_installed
@pytest.mark.timeout(300)
def test_olive_command_and_workflow_run_offline(digits: Path, tmp_path: Path) -> None:
    """int8 by an Olive command and int4 by an Olive workflow, each in a child whose
    every DNS lookup or connection would fail the step (run_olive raises on any)."""
    import onnxruntime

    made = run_olive(digits, tmp_path / "int8", command=parse_command(INT8))
    assert made["tool"] == "olive" and made["tool_versions"]["olive-ai"] == "0.13.0"
    assert made["olive_command"] == INT8 and made["network_attempts"] == 0
    assert made["op_types"].get("MatMulInteger", 0) + made["op_types"].get("QLinearMatMul", 0) > 0
    assert (tmp_path / "int8" / "model.onnx").is_file()
    onnxruntime.InferenceSession(str(tmp_path / "int8" / "model.onnx"))

    workflow = {"passes": {"int4": {"type": "OnnxBlockWiseRtnQuantization", "block_size": 32}}}
    made = run_olive(digits, tmp_path / "int4", workflow=workflow)
    assert made["olive_workflow"] == workflow and len(made["olive_workflow_sha256"]) == 64
    assert made["op_types"].get("MatMulNBits", 0) > 0, made["op_types"]
    assert made["network_attempts"] == 0
    onnxruntime.InferenceSession(str(tmp_path / "int4" / "model.onnx"))


@olive_installed
@pytest.mark.timeout(300)
def test_olive_failure_quotes_olive(digits: Path, tmp_path: Path) -> None:
    """Olive refuses int8 with its own implementation on an ONNX model: the step fails
    with Olive's message on one line and leaves nothing behind."""
    with pytest.raises(ConversionError) as info:
        run_olive(
            digits,
            tmp_path / "out",
            command=parse_command("quantize --implementation olive --precision int8"),
        )
    message = str(info.value)
    assert message.startswith("Olive failed on model.onnx: ") and "\n" not in message
    assert "not supported" in message or "Error" in message
    assert not (tmp_path / "out").exists()


@olive_installed
@pytest.mark.timeout(300)
def test_the_guard_sees_olives_real_telemetry(digits: Path, tmp_path: Path) -> None:
    """The control: with Olive's own telemetry left in place (only its documented
    switches set), the guard records the lookup of its collector, so the no-network
    checks above would fail if the stub stopped working."""
    log = tmp_path / "network.log"
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "XDG_CACHE_HOME": str(tmp_path / "xdg"),
        "OLIVE_DISABLE_TELEMETRY": "1",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [
            sys.executable, "-m", "coordinator.conversion.olive_child", str(log),
            "--real-telemetry", *parse_command(INT8), "--disable_telemetry",
            "-m", str(digits), "-o", str(tmp_path / "out"),
        ],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    attempts = log.read_text().splitlines()
    assert attempts, done.stderr[-2000:]
    assert any("events.data.microsoft.com" in line for line in attempts), attempts


def test_the_guard_refuses_and_logs_any_lookup_or_connection(tmp_path: Path) -> None:
    log = tmp_path / "network.log"
    code = (
        "import socket, sys\n"
        "from pathlib import Path\n"
        "from coordinator.conversion.olive_child import guard_network\n"
        "guard_network(Path(sys.argv[1]))\n"
        "for call in (lambda: socket.getaddrinfo('example.org', 443),\n"
        "             lambda: socket.socket().connect(('127.0.0.1', 9))):\n"
        "    try:\n"
        "        call()\n"
        "    except PermissionError as err:\n"
        "        print('refused', err)\n"
        "a, b = socket.socketpair(socket.AF_UNIX)\n"
        "a.sendall(b'x'); print('unix ok', b.recv(1))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(log)],
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("refused") == 2 and "unix ok b'x'" in done.stdout
    lines = log.read_text().splitlines()
    assert lines[0] == "socket.getaddrinfo example.org"
    assert lines[1].startswith("socket.connect ('127.0.0.1', 9)")


@olive_installed
@pytest.mark.timeout(120)
def test_an_olive_run_past_its_limit_is_killed(digits: Path, tmp_path: Path) -> None:
    """A hung or slow Olive is killed at the step's limit (importing Olive alone takes
    longer than the one second given here) and leaves nothing behind."""
    with pytest.raises(ConversionError, match=r"^Olive ran past its 1 s limit on model\.onnx$"):
        run_olive(digits, tmp_path / "out", command=parse_command(INT8), timeout_s=1.0)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []
