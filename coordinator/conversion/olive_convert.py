"""Microsoft Olive as a conversion step: an Olive CLI command or an Olive workflow applied
to a model's ONNX file, offline, in a child process.

A campaign names Olive for a scheme of the ``onnxruntime`` backend whose name starts with
``olive-`` (``coordinator.spec``), with exactly one of two conversion parameters:

- ``olive``: an Olive CLI command and its arguments, e.g. ``quantize --implementation
  ort --precision int8`` or ``quantize --implementation olive --precision int4``
  (commands: :data:`OLIVE_COMMANDS`). The farm adds the input (``-m MODEL.onnx``) and the
  output (``-o``); options that name an input, an output, a hub dataset or remote code
  are refused (:data:`REFUSED_OPTIONS`).
- ``olive_workflow``: ``file:PATH`` of an Olive workflow (JSON, at most
  :data:`MAX_WORKFLOW_BYTES`): its passes run by ``olive run --config``, with
  ``input_model`` set to the model's ONNX and ``output_dir``, ``cache_dir`` set to
  folders of the step's own.

Olive runs through :mod:`coordinator.conversion.olive_child`: its telemetry stubbed out
and every network attempt refused and logged. A step whose Olive process attempted the
network fails (:class:`ConversionError` naming the first attempt), as does an Olive
failure (quoting Olive's last error line), a run past its time limit, or a run that
leaves no ONNX model. The output is the produced ``.onnx`` (with its external data files),
measured by the onnxruntime backend; the provenance records Olive's version, the command
or workflow (and its sha256), the input's sha256, the network attempts (0) and how
telemetry was kept off.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from coordinator.conversion.files import file_sha256, folder_manifest
from coordinator.conversion.hf_to_gguf import _log_tail, _run_logged, last_error_line
from edgefarm.errors import ConversionError, MissingExtra, UsageError

TOOL = "olive"
SCHEME_PREFIX = "olive-"
COMMAND_PARAM = "olive"
WORKFLOW_PARAM = "olive_workflow"
OLIVE_COMMANDS = ("quantize", "auto-opt", "optimize")
# Options the farm sets itself, or that would reach a hub or run remote code.
REFUSED_OPTIONS = frozenset(
    {
        "-m", "--model_name_or_path", "-o", "--output_path", "-d", "--data_name",
        "--adapter_path", "--trust_remote_code", "--account_name", "--container_name",
        "--dry_run", "--save_config_file", "--disable_telemetry", "--task",
    }
)  # fmt: skip
MAX_COMMAND_TOKENS = 64
MAX_WORKFLOW_BYTES = 1 << 20
DEFAULT_TIMEOUT_S = 3600.0
TELEMETRY = "olive.telemetry replaced by a no-op module before import; network refused"
_OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "OLIVE_DISABLE_TELEMETRY": "1",
}


def parse_command(text: str) -> list[str]:
    """The arguments of an ``olive`` parameter (``ValueError`` saying what is wrong)."""
    try:
        args = shlex.split(text)
    except ValueError as err:
        raise ValueError(f"cannot split the Olive command: {err}") from None
    if not args:
        raise ValueError("the Olive command is empty")
    if args[0] not in OLIVE_COMMANDS:
        raise ValueError(
            f"unknown Olive command {args[0]!r:.60} (expected one of {', '.join(OLIVE_COMMANDS)};"
            f" a workflow goes in {WORKFLOW_PARAM})"
        )
    if len(args) > MAX_COMMAND_TOKENS:
        raise ValueError(f"the Olive command has {len(args)} words (limit {MAX_COMMAND_TOKENS})")
    for arg in args[1:]:
        option = arg.split("=", 1)[0]
        if option in REFUSED_OPTIONS:
            raise ValueError(
                f"option {option} is not allowed in an Olive command: the farm sets the input "
                "and output itself and Olive steps never reach a hub"
            )
    return args


def olive_request(params: dict[str, Any]) -> dict[str, Any]:
    """Which Olive run ``params`` (a scheme's conversion parameters) asks for:
    ``{"command": [...]}`` or ``{"workflow_path": PATH}`` (``ValueError`` otherwise)."""
    given = [key for key in (COMMAND_PARAM, WORKFLOW_PARAM) if key in params]
    extra = sorted(set(params) - {COMMAND_PARAM, WORKFLOW_PARAM})
    if len(given) != 1:
        raise ValueError(
            f"an {SCHEME_PREFIX}* scheme needs exactly one of {COMMAND_PARAM} (an Olive command) "
            f"and {WORKFLOW_PARAM} (file:PATH of a workflow)"
        )
    if extra:
        raise ValueError(f"unknown Olive conversion parameter {extra[0]!r:.60}")
    value = params[given[0]]
    if not isinstance(value, str):
        raise ValueError(f"{given[0]} must be text")
    if given[0] == COMMAND_PARAM:
        return {"command": parse_command(value)}
    if not value.startswith("file:") or not value[5:].strip():
        raise ValueError(f"{WORKFLOW_PARAM} must be 'file:PATH', got {value!r:.60}")
    return {"workflow_path": value.removeprefix("file:")}


def read_workflow(path: Path) -> dict[str, Any]:
    """An Olive workflow file: a JSON object with ``passes`` (``UsageError`` naming the
    file otherwise)."""
    try:
        size = path.stat().st_size
        if size > MAX_WORKFLOW_BYTES:
            raise UsageError(
                f"Olive workflow {path.name}: {size} bytes is too large "
                f"(limit {MAX_WORKFLOW_BYTES >> 10} KiB)"
            )
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UsageError(f"Olive workflow {path}: {err.strerror or err}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"Olive workflow {path.name}: not JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("passes"), dict) or not data["passes"]:
        raise UsageError(f"Olive workflow {path.name}: expected a JSON object with 'passes'")
    return data


def workflow_sha256(workflow: dict[str, Any]) -> str:
    """A workflow's identity: the sha256 of its canonical JSON."""
    return hashlib.sha256(json.dumps(workflow, sort_keys=True).encode()).hexdigest()


def run_olive(
    model: Path,
    out_dir: Path,
    *,
    command: list[str] | None = None,
    workflow: dict[str, Any] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """Apply an Olive command or workflow to the ONNX file ``model``; the produced model
    (``model.onnx`` and its data files) is written into ``out_dir`` (absent or empty).
    Returns the provenance."""
    if (command is None) == (workflow is None):
        raise UsageError("run_olive needs a command or a workflow")
    if importlib.util.find_spec("olive") is None:
        raise MissingExtra("olive", "olive")
    model = Path(model).absolute()  # not resolved: a link keeps its .onnx name
    if not model.is_file():
        raise UsageError(f"ONNX model not found: {model}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UsageError(f"output folder is not empty: {out_dir}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model = _named_input(model, work)
        produced = work / "out"
        if command is not None:
            args = [*command, "-m", str(model), "-o", str(produced)]
        else:
            assert workflow is not None
            config = {
                **workflow,
                "input_model": {"type": "ONNXModel", "model_path": str(model)},
                "output_dir": str(produced),
                "cache_dir": str(work / "cache"),
            }
            (work / "workflow.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
            args = ["run", "--config", str(work / "workflow.json")]
        network_log = work / "network.log"
        network_log.touch()
        log = work / "olive.log"
        started = time.monotonic()
        code, peak_rss, peak_anon = _run_logged(
            [sys.executable, "-m", "coordinator.conversion.olive_child", str(network_log), *args],
            _environment(work),
            log,
            timeout_s,
            work,
        )
        wall_s = time.monotonic() - started
        attempts = network_log.read_text(encoding="utf-8").splitlines()
        if attempts:
            raise ConversionError(
                f"Olive tried to reach the network on {model.name} ({len(attempts)} attempt(s), "
                f"first: {attempts[0][:200]}); Olive steps run offline"
            )
        if code == "timeout":
            raise ConversionError(f"Olive ran past its {timeout_s:.0f} s limit on {model.name}")
        if code != 0:
            raise ConversionError(f"Olive failed on {model.name}: {_olive_message(_log_tail(log))}")
        graph = _produced_model(produced, model.name, log)
        input_sha256 = file_sha256(model)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(graph.parent, out_dir)
        if graph.name != "model.onnx":
            (out_dir / graph.name).rename(out_dir / "model.onnx")
        for stray in ("model_config.json", "run_history.txt", "footprint.json"):
            (out_dir / stray).unlink(missing_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    files = folder_manifest(out_dir)
    run: dict[str, Any] = (
        {"olive_command": shlex.join(command)}
        if command is not None
        else {"olive_workflow": workflow, "olive_workflow_sha256": workflow_sha256(workflow or {})}
    )
    return {
        "tool": TOOL,
        "tool_versions": _versions(),
        **run,
        "input_sha256": input_sha256,
        "network_attempts": 0,
        "telemetry": TELEMETRY,
        "op_types": _op_types(out_dir / "model.onnx"),
        "files": files,
        "size_bytes": sum(f["size_bytes"] for f in files),
        "wall_s": round(wall_s, 3),
        "peak_rss_bytes": peak_rss,
        "peak_anon_rss_bytes": peak_anon,
    }


def _named_input(model: Path, work: Path) -> Path:
    """``model`` as a real file with its own name: Olive resolves a symbolic link (the
    store's links point at content-addressed files without an ``.onnx`` extension), so a
    link is replaced by a hard link (a copy across filesystems) inside ``work``."""
    if not model.is_symlink():
        return model
    named = work / "input" / model.name
    named.parent.mkdir()
    try:
        os.link(model.resolve(), named)
    except OSError:
        shutil.copyfile(model.resolve(), named)
    return named


def _environment(work: Path) -> dict[str, str]:
    """The Olive child's environment: offline switches, caches inside ``work``, and this
    checkout importable (the child module lives in it)."""
    env = dict(os.environ)
    env.update(_OFFLINE)
    env["XDG_CACHE_HOME"] = str(work / "xdg-cache")
    env["PYTHONUNBUFFERED"] = "1"
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _olive_message(tail: list[str]) -> str:
    """Olive's own message: the child's ``olive error:`` line, else the last error line."""
    for line in reversed(tail):
        if line.startswith("olive error: "):
            return line.removeprefix("olive error: ")[:300]
    return last_error_line(tail)


def _produced_model(produced: Path, name: str, log: Path) -> Path:
    """The one ONNX model Olive wrote under ``produced``."""
    graphs = sorted(produced.rglob("*.onnx")) if produced.is_dir() else []
    if len(graphs) != 1:
        found = "no ONNX model" if not graphs else f"{len(graphs)} ONNX models"
        raise ConversionError(
            f"Olive left {found} for {name} (last output: {last_error_line(_log_tail(log))})"
        )
    return graphs[0]


def _op_types(path: Path) -> dict[str, int]:
    """How many nodes of each operator type the produced graph holds (weights not loaded)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(sorted(Counter(node.op_type for node in graph.node).items()))


def _versions() -> dict[str, str]:
    out = {}
    for name in ("olive-ai", "onnxruntime", "onnx"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out
