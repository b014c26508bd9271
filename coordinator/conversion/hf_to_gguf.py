"""Hugging Face checkpoint folder -> GGUF, with llama.cpp's own ``convert_hf_to_gguf.py``.

The converter (:mod:`coordinator.conversion.llama_converter`) runs in a child process,
offline, with its bundled gguf-py first on the path, its output in a log file and under
a time limit. It reads the safetensors lazily (memory-mapped, one tensor materialised at
a time while writing), so its memory stays near one tensor plus the mapped pages.

The user's folder is never modified: the converter reads a staging folder of symlinks to
the checkpoint's files with a normalised copy of ``config.json`` (:func:`normalized_config`:
transformers 5 writes ``rope_parameters`` where hub checkpoints and older tools use
``rope_theta``/``rope_scaling``/``rope_local_base_freq``; both spellings are written, the
same values). The GGUF is written next to ``out`` and renamed into place.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from coordinator.conversion.files import maxrss_bytes
from coordinator.conversion.llama_converter import SCRIPT, ConverterInfo, find_converter
from edgefarm.errors import ConversionError, MissingExtra, UnsupportedArchitecture, UsageError

TOOL = "llama.cpp convert_hf_to_gguf.py"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_TIMEOUT_S = 3600.0  # a 4B model converts in minutes; this only stops a hang
_POLL_S = 0.05
_LOG_TAIL_BYTES = 64 * 1024
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# llama.cpp marks '</s>' specially in any model whose general.name contains these, and
# fails to load one whose vocabulary lacks it.
_PHI3_NAMES = re.compile(r"phi-?3", re.IGNORECASE)
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception)\b|ERROR:|error:)")
# Converter classes that choose their tokenizer path by ``tokenizer_class``: a fast
# (tokenizer.json) tokenizer must be named so, while transformers 5 saves every fast
# tokenizer as 'TokenizersBackend' (Phi-3's class would look for tokenizer.model).
_FAST_TOKENIZER_CLASS = {"Phi3ForCausalLM": "GPT2Tokenizer"}


def converter_version() -> str:
    """The converter's identity for cache keys: ``llama-cpp-python==V+sha256:<12 hex>``."""
    info = find_converter()
    return f"llama-cpp-python=={info.version}+sha256:{info.script_sha256[:12]}"


def convert_checkpoint(
    folder: Path,
    out: Path,
    outtype: str = "f16",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    model_name: str | None = None,
    log_path: Path | None = None,
) -> dict[str, Any]:
    """Convert the checkpoint ``folder`` to the GGUF ``out`` (``outtype`` f16 by default).

    ``model_name`` becomes ``general.name`` (default: the folder's name). The converter's
    output goes to ``log_path`` (default: a temporary file, removed afterwards). Returns
    provenance: tool, converter version and script sha256, outtype, architectures, tensor
    count, output size, wall seconds and the converter's peak RSS (all, and anonymous).

    Raises :class:`UnsupportedArchitecture` when llama.cpp's converter has no class for
    the architecture, :class:`ConversionError` for anything else (a missing config.json,
    the converter's own last error line, a timeout), :class:`MissingExtra` without the
    converter's modules or the converter itself (``ConverterMissing``), :class:`UsageError`
    for an unknown ``outtype``.
    """
    if outtype not in OUTTYPES:
        raise UsageError(f"unknown GGUF outtype '{outtype}' (known: {', '.join(OUTTYPES)})")
    folder, out = Path(folder), Path(out)
    config = read_config(folder)
    architecture = _architecture(config, folder)
    info = find_converter()
    supported = supported_architectures(info.folder / "conversion" / "__init__.py")
    if supported is not None and architecture not in supported:
        raise UnsupportedArchitecture(_unsupported(architecture, info))
    _require_modules(folder)
    name = _safe_model_name(model_name or folder.resolve().name or "model", folder)

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        staging = work / (folder.resolve().name or "model")
        changed = stage_checkpoint(folder, staging, config)
        partial = work / "out.gguf"
        log = log_path or work / "convert.log"
        command = [
            sys.executable,
            str(info.script),
            str(staging),
            "--outfile",
            str(partial),
            "--outtype",
            outtype,
            "--model-name",
            name,
        ]
        started = time.monotonic()
        code, peak_rss, peak_anon = _run_logged(command, converter_env(info), log, timeout_s, work)
        wall_s = time.monotonic() - started
        if code == "timeout":
            raise ConversionError(
                f"llama.cpp's converter ran past its {timeout_s:.0f} s limit on {folder.name}"
            )
        if code != 0 or not partial.is_file():
            _raise_failure(log, architecture, info, folder)
        summary = _check_output(partial, folder)
        os.replace(partial, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "tool": TOOL,
        "converter_version": info.version,
        "llama_cpp_commit": info.llama_cpp_commit,
        "script_sha256": info.script_sha256,
        "outtype": outtype,
        "architecture": architecture,
        "gguf_architecture": summary.architecture,
        "model_name": name,
        "tensor_count": summary.tensor_count,
        "size_bytes": out.stat().st_size,
        "wall_s": round(wall_s, 3),
        "peak_rss_bytes": peak_rss,
        "peak_anon_rss_bytes": peak_anon,
        "staged_changes": changed,
    }


def read_config(folder: Path) -> dict[str, Any]:
    """The checkpoint's ``config.json``; ConversionError when absent or not a JSON object."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConversionError(f"no config.json in {folder}: not a Hugging Face checkpoint folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConversionError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise ConversionError(f"{path} is not a JSON object")
    return data


def normalized_config(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``config`` with the hub's top-level RoPE keys filled in from transformers 5's
    ``rope_parameters`` (where they are missing); the new config and the keys added.

    ``rope_parameters`` is either one dict (``rope_type``, ``rope_theta``, scaling fields)
    or, for models with sliding and global layers, one dict per layer type. The hub form:
    ``rope_theta`` (global), ``rope_local_base_freq`` (sliding layers), ``rope_scaling``
    (the scaling fields of the global layers, or null for plain RoPE).
    """
    params = config.get("rope_parameters")
    if not isinstance(params, dict):
        return dict(config), []
    per_type = {k: v for k, v in params.items() if isinstance(v, dict)}
    if per_type and set(per_type) <= {"full_attention", "sliding_attention"}:
        full = per_type.get("full_attention") or {}
        local = (per_type.get("sliding_attention") or {}).get("rope_theta")
    else:
        full, local = params, None
    derived: dict[str, Any] = {}
    if full.get("rope_theta") is not None:
        derived["rope_theta"] = full["rope_theta"]
    if local is not None:
        derived["rope_local_base_freq"] = local
    scaling = {k: v for k, v in full.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling.get("rope_type", "default") != "default":
        derived["rope_scaling"] = scaling
    if full.get("partial_rotary_factor") is not None:
        derived["partial_rotary_factor"] = full["partial_rotary_factor"]
    added = sorted(k for k in derived if config.get(k) is None)
    return {**config, **{k: derived[k] for k in added}}, added


def stage_checkpoint(folder: Path, staging: Path, config: dict[str, Any]) -> list[str]:
    """A folder of symlinks to ``folder``'s entries with a normalised ``config.json``
    (and, where the converter needs it, ``tokenizer_config.json``); what was changed."""
    staging.mkdir(parents=True)
    source = Path(folder).resolve()
    tokenizer_config = _staged_tokenizer_config(source, config)
    rewritten = {"config.json"} | ({"tokenizer_config.json"} if tokenizer_config else set())
    for entry in source.iterdir():
        if entry.name not in rewritten:
            (staging / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    normalized, changed = normalized_config(config)
    _write_json(staging / "config.json", normalized)
    if tokenizer_config is not None:
        _write_json(staging / "tokenizer_config.json", tokenizer_config)
        changed.append("tokenizer_class")
    return changed


def _staged_tokenizer_config(source: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """A copy of ``tokenizer_config.json`` naming the fast tokenizer class the converter
    expects for this architecture, or None when the original serves as is."""
    names = config.get("architectures") or [""]
    wanted = _FAST_TOKENIZER_CLASS.get(str(names[0]))
    path = source / "tokenizer_config.json"
    if wanted is None or not path.is_file() or (source / "tokenizer.model").is_file():
        return None
    if not (source / "tokenizer.json").is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("tokenizer_class") == wanted:
        return None
    return {**data, "tokenizer_class": wanted}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def converter_env(info: ConverterInfo) -> dict[str, str]:
    """The converter's environment: bundled gguf-py first on PYTHONPATH, offline."""
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    paths = [str(info.gguf_py), *filter(None, [env.get("PYTHONPATH")])]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(_OFFLINE)
    env["PYTHONUNBUFFERED"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


@lru_cache(maxsize=4)
def supported_architectures(registry: Path) -> frozenset[str] | None:
    """The architectures in the converter's ``TEXT_MODEL_MAP`` (read, not imported);
    None when the registry cannot be read that way."""
    try:
        tree = ast.parse(registry.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        target: ast.expr
        if isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP" and value is not None:
            try:
                names = ast.literal_eval(value)
            except ValueError:
                return None
            return frozenset(names) if isinstance(names, dict) else None
    return None


def _require_modules(folder: Path) -> None:
    """The converter's own imports (checked, not imported): torch and transformers always,
    sentencepiece for a checkpoint with a ``tokenizer.model``."""
    needed = ["torch", "transformers"]
    if (folder / "tokenizer.model").is_file():
        needed.append("sentencepiece")
    for module in needed:
        if importlib.util.find_spec(module) is None:
            raise MissingExtra("hf", module)


def _architecture(config: dict[str, Any], folder: Path) -> str:
    names = config.get("architectures")
    if not isinstance(names, list) or not names or not isinstance(names[0], str):
        raise ConversionError(f"config.json in {folder} names no architecture ('architectures')")
    return names[0]


def _unsupported(architecture: str, info: ConverterInfo) -> str:
    return (
        f"architecture {architecture} is not supported by llama.cpp's converter "
        f"(llama-cpp-python {info.version})"
    )


def _safe_model_name(name: str, folder: Path) -> str:
    """``name``, unless llama.cpp would treat it as Phi-3's and the vocabulary lacks the
    '</s>' token that treatment needs (the model would not load): then 'phi_3'."""
    if _PHI3_NAMES.search(name) and not _vocab_has(folder, "</s>"):
        return _PHI3_NAMES.sub(lambda m: m.group(0)[:3] + "_3", name)
    return name


def _vocab_has(folder: Path, token: str) -> bool:
    path = folder / "tokenizer.json"
    if not path.is_file():
        return True  # a sentencepiece vocabulary: llama.cpp's Phi-3 handling is written for it
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    vocab = (data.get("model") or {}).get("vocab") or {}
    added = {t.get("content") for t in data.get("added_tokens") or [] if isinstance(t, dict)}
    return token in added or (isinstance(vocab, dict) and token in vocab)


def _run_logged(
    command: list[str], env: dict[str, str], log: Path, timeout_s: float, cwd: Path
) -> tuple[int | str, int, int | None]:
    """Run ``command`` with its output in ``log``: (exit code or 'timeout', peak RSS bytes,
    peak anonymous RSS bytes sampled every 50 ms, None where /proc cannot tell).

    The peak RSS counts the memory-mapped safetensors pages the converter has touched
    (file-backed, reclaimable); the anonymous peak is what the converter itself holds."""
    with log.open("wb") as sink:
        child = subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout_s
    peak_anon: int | None = None
    try:
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                child.returncode = os.waitstatus_to_exitcode(status)
                return child.returncode, maxrss_bytes(usage.ru_maxrss), peak_anon
            anon = _anon_rss(child.pid)
            if anon is not None:
                peak_anon = max(peak_anon or 0, anon)
            if time.monotonic() > deadline:
                break
            time.sleep(_POLL_S)
    except BaseException:
        _kill(child)
        raise
    usage = _kill(child)
    return "timeout", maxrss_bytes(usage.ru_maxrss) if usage else 0, peak_anon


def _anon_rss(pid: int) -> int | None:
    """The process's current anonymous RSS (Linux /proc), else None."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _kill(child: subprocess.Popen[bytes]) -> Any:
    """Kill the child's process group and reap it; its resource usage (None if reaped)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    try:
        _, status, usage = os.wait4(child.pid, 0)
    except ChildProcessError:
        return None
    child.returncode = os.waitstatus_to_exitcode(status)
    return usage


def _raise_failure(log: Path, architecture: str, info: ConverterInfo, folder: Path) -> None:
    tail = _log_tail(log)
    refused = re.compile(rf"(Model|Architecture) '?{re.escape(architecture)}'? (is )?not supported")
    if any(refused.search(line) for line in tail):
        raise UnsupportedArchitecture(_unsupported(architecture, info))
    raise ConversionError(
        f"llama.cpp's converter failed on {folder.name} ({architecture}): {last_error_line(tail)}"
    )


def _log_tail(log: Path) -> list[str]:
    try:
        with log.open("rb") as handle:
            handle.seek(max(0, log.stat().st_size - _LOG_TAIL_BYTES))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return []
    # tqdm progress bars redraw with carriage returns: keep the last state of each line
    return [line.split("\r")[-1].strip() for line in text.splitlines()]


def last_error_line(lines: list[str]) -> str:
    """The converter's last meaningful line: the final exception or ERROR line, else the
    last non-empty line (at most 300 characters)."""
    meaningful = [line for line in lines if line]
    for line in reversed(meaningful):
        if _ERROR_LINE.match(line):
            return line[:300]
    return meaningful[-1][:300] if meaningful else f"no output (see {SCRIPT})"


def _check_output(path: Path, folder: Path) -> Any:
    from agent.backends.gguf_check import check_gguf
    from edgefarm.errors import ModelLoadError

    try:
        return check_gguf(path)
    except ModelLoadError as err:
        raise ConversionError(
            f"llama.cpp's converter wrote an invalid GGUF for {folder.name}: {err}"
        ) from err
