"""llama.cpp's own Hugging Face -> GGUF converter, at the version llama-cpp-python compiled.

The llama-cpp-python source distribution vendors llama.cpp (``vendor/llama.cpp/``), so
the converter that matches the compiled library is in the sdist of the installed version.
:func:`fetch_converter` downloads that sdist with pip (``make install`` runs it) and
extracts only the converter: ``convert_hf_to_gguf.py``, its ``conversion/`` package, the
bundled ``gguf-py`` (which differs from PyPI's ``gguf`` of the same version number), the
chat templates and two built-in vocabularies some model classes read, into
``llama.cpp-converter-<version>/`` with a ``manifest.json`` (versions, llama.cpp commit,
hashes). :func:`find_converter` locates it and refuses a version mismatch.

The converter folder is ``$EDGEFARM_LLAMA_CONVERTER`` when set (a folder that directly
holds ``convert_hf_to_gguf.py``), else ``<sys.prefix>/share/edgefarm/llama.cpp-converter-
<version>``. CLI: ``python -m coordinator.conversion.llama_converter fetch [--sdist FILE]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePosixPath
from typing import IO, Any

from coordinator.conversion.files import file_sha256
from edgefarm.errors import EdgefarmError, MissingExtra, exit_code_for

DISTRIBUTION = "llama-cpp-python"
ENV_FOLDER = "EDGEFARM_LLAMA_CONVERTER"
SCRIPT = "convert_hf_to_gguf.py"
MANIFEST = "manifest.json"
FETCH_TIMEOUT_S = 900.0  # pip prepares the sdist's metadata (build requirements) too
FETCH_HINT = "run `make install` or `python -m coordinator.conversion.llama_converter fetch`"

# What is kept from the sdist's vendor/llama.cpp/: whole folders, and single files.
_KEEP_PREFIXES = ("conversion/", "gguf-py/gguf/", "models/templates/")
_KEEP_FILES = frozenset(
    {
        SCRIPT,
        "LICENSE",
        "gguf-py/LICENSE",
        "gguf-py/pyproject.toml",
        "requirements/requirements-convert_hf_to_gguf.txt",
        "requirements/requirements-convert_legacy_llama.txt",
        "models/ggml-vocab-gpt-neox.gguf",  # built-in vocabularies (Mamba, OpenELM)
        "models/ggml-vocab-llama-spm.gguf",
    }
)
_VENDOR = "vendor/llama.cpp/"
_SUBMODULE_HEAD = ".git/modules/vendor/llama.cpp/HEAD"
_MAX_MEMBER_BYTES = 64 * 1024 * 1024  # the largest converter file is well under 1 MB
_CHUNK = 1 << 20


class ConverterMissing(MissingExtra):
    """llama.cpp's converter is absent, incomplete, or for another llama-cpp-python."""

    def __init__(self, message: str) -> None:
        EdgefarmError.__init__(self, message)
        self.extra = "llama-cpp"
        self.module = SCRIPT


@dataclass(frozen=True)
class ConverterInfo:
    """A usable converter folder and what it is."""

    folder: Path
    script: Path
    gguf_py: Path  # put first on PYTHONPATH so the bundled gguf is the one imported
    version: str  # llama-cpp-python version it came from ('local' for an unlabelled folder)
    script_sha256: str
    llama_cpp_commit: str | None = None


def installed_version() -> str:
    """The installed llama-cpp-python version; MissingExtra when it is not installed."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError as err:
        raise MissingExtra("llama-cpp", "llama_cpp") from err


def default_root() -> Path:
    """Where fetched converters live by default: inside the running environment."""
    return Path(sys.prefix) / "share" / "edgefarm"


def converter_folder(dest: Path | None = None, release: str | None = None) -> Path:
    """The converter folder for ``release`` (default: the installed version): under
    ``dest`` when given, else ``$EDGEFARM_LLAMA_CONVERTER``, else under :func:`default_root`."""
    if dest is None and os.environ.get(ENV_FOLDER):
        return Path(os.environ[ENV_FOLDER]).expanduser()
    release = release or installed_version()
    return (dest if dest is not None else default_root()) / f"llama.cpp-converter-{release}"


def find_converter(dest: Path | None = None) -> ConverterInfo:
    """The converter for the installed llama-cpp-python; :class:`ConverterMissing` (one
    line, saying how to fetch it) when it is absent or was fetched for another version."""
    release = installed_version()
    folder = converter_folder(dest, release)
    script = folder / SCRIPT
    if not script.is_file() or not (folder / "conversion").is_dir():
        raise ConverterMissing(f"llama.cpp's converter is not in {folder}: {FETCH_HINT}")
    manifest = _read_manifest(folder)
    fetched = str(manifest.get("llama_cpp_python", "local")) if manifest else "local"
    if manifest is not None and fetched != release:
        raise ConverterMissing(
            f"llama.cpp's converter in {folder} is from llama-cpp-python {fetched} but "
            f"{release} is installed: {FETCH_HINT}"
        )
    commit = manifest.get("llama_cpp_commit") if manifest else None
    return ConverterInfo(
        folder=folder,
        script=script,
        gguf_py=folder / "gguf-py",
        version=fetched,
        script_sha256=file_sha256(script),
        llama_cpp_commit=str(commit) if commit else None,
    )


def fetch_converter(
    dest: Path | None = None, *, sdist: Path | None = None, timeout_s: float = FETCH_TIMEOUT_S
) -> Path:
    """Make sure the converter of the installed llama-cpp-python is present; its folder.

    Reuses a complete folder and leaves a folder it did not fetch (no manifest) alone;
    otherwise downloads the sdist with pip (or reads ``sdist``, a local
    ``llama_cpp_python-<version>.tar.gz``) and extracts the converter atomically.
    Raises :class:`ConverterMissing` when the download or the archive fails.
    """
    release = installed_version()
    target = converter_folder(dest, release)
    if _is_complete(target, release):
        return target
    if target.exists() and _read_manifest(target) is None:
        if (target / SCRIPT).is_file():
            return target  # a converter folder the user keeps (a llama.cpp checkout): theirs
        raise ConverterMissing(
            f"{target} exists but holds no llama.cpp converter fetched by edgefarm: "
            f"remove it or point {ENV_FOLDER} elsewhere"
        )
    if sdist is not None:
        return extract_converter(Path(sdist), target, release)
    with tempfile.TemporaryDirectory(prefix="edgefarm-llama-sdist-") as tmp:
        return extract_converter(download_sdist(release, Path(tmp), timeout_s), target, release)


def download_sdist(release: str, into: Path, timeout_s: float = FETCH_TIMEOUT_S) -> Path:
    """``pip download`` the llama-cpp-python ``release`` sdist into ``into``; its path."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--no-binary",
        ":all:",
        f"{DISTRIBUTION}=={release}",
        "--dest",
        str(into),
    ]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise ConverterMissing(
            f"pip download of {DISTRIBUTION}=={release} ran past {timeout_s:.0f} s"
        ) from err
    if done.returncode != 0:
        raise ConverterMissing(
            f"pip download of {DISTRIBUTION}=={release} failed: {_last_line(done.stderr)}"
        )
    found = sorted(into.glob("*.tar.gz"))
    if len(found) != 1:
        raise ConverterMissing(
            f"pip download of {DISTRIBUTION}=={release} gave no single sdist in {into}"
        )
    return found[0]


def extract_converter(sdist: Path, target: Path, release: str) -> Path:
    """Extract the converter pieces of ``sdist`` into ``target`` (replaced atomically);
    ``target``. Only regular files under the kept paths are written, streamed, each
    checked to stay inside the folder; links and everything else are skipped."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        commit, count = _extract_members(sdist, staging)
        if not (staging / SCRIPT).is_file() or not (staging / "conversion").is_dir():
            raise ConverterMissing(f"{sdist.name} does not hold vendor/llama.cpp/{SCRIPT}")
        if not (staging / "gguf-py" / "gguf" / "__init__.py").is_file():
            raise ConverterMissing(f"{sdist.name} does not hold vendor/llama.cpp/gguf-py")
        manifest = {
            "llama_cpp_python": release,
            "llama_cpp_commit": commit,
            "script_sha256": file_sha256(staging / SCRIPT),
            "sdist": sdist.name,
            "sdist_sha256": file_sha256(sdist),
            "tree_sha256": tree_sha256(staging),
            "files": count,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _replace_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _extract_members(sdist: Path, into: Path) -> tuple[str | None, int]:
    """Stream through the archive once, writing the kept files; (llama.cpp commit, files)."""
    commit: str | None = None
    count = 0
    root = into.resolve()
    try:
        with tarfile.open(sdist, mode="r|gz") as archive:
            for member in archive:
                parts = PurePosixPath(member.name).parts
                if len(parts) < 2 or not member.isfile():
                    continue
                inner = "/".join(parts[1:])  # below the sdist's top folder
                if inner == _SUBMODULE_HEAD:
                    commit = _read_commit(archive.extractfile(member))
                    continue
                if not inner.startswith(_VENDOR):
                    continue
                relative = inner[len(_VENDOR) :]
                if not _kept(relative):
                    continue
                _write_member(archive, member, root, relative)
                count += 1
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ConverterMissing(f"cannot read {sdist.name}: {err}") from err
    return commit, count


def _kept(relative: str) -> bool:
    if relative in _KEEP_FILES:
        return True
    return relative.startswith(_KEEP_PREFIXES) and "/__pycache__/" not in relative


def _write_member(archive: tarfile.TarFile, member: tarfile.TarInfo, root: Path, rel: str) -> None:
    pure = PurePosixPath(rel)
    if pure.is_absolute() or any(part in ("", ".", "..") for part in pure.parts):
        raise ConverterMissing(f"unsafe path in the sdist: {member.name}")
    if member.size > _MAX_MEMBER_BYTES:
        raise ConverterMissing(f"unexpectedly large file in the sdist: {member.name}")
    destination = root.joinpath(*pure.parts)
    if not destination.resolve().is_relative_to(root):
        raise ConverterMissing(f"unsafe path in the sdist: {member.name}")
    source = archive.extractfile(member)
    if source is None:
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    with source, destination.open("wb") as sink:
        shutil.copyfileobj(source, sink, _CHUNK)
    destination.chmod(0o644)


def _read_commit(handle: IO[bytes] | None) -> str | None:
    if handle is None:
        return None
    with handle:
        text = handle.read(256).decode("ascii", "replace").strip()
    return text if re.fullmatch(r"[0-9a-f]{40}", text) else None


def _replace_folder(staging: Path, target: Path) -> None:
    """Swap ``staging`` in as ``target``: a rename, with any old folder moved aside first."""
    old: Path | None = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(folder: Path, release: str) -> bool:
    manifest = _read_manifest(folder)
    script = folder / SCRIPT
    return (
        manifest is not None
        and manifest.get("llama_cpp_python") == release
        and script.is_file()
        and (folder / "conversion" / "__init__.py").is_file()
        and (folder / "gguf-py" / "gguf" / "__init__.py").is_file()
        and manifest.get("script_sha256") == file_sha256(script)
    )


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def tree_sha256(folder: Path) -> str:
    """One sha256 over every converter file (names and contents, sorted)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    """``fetch`` the converter (or ``show`` where it is); one line out, exit 0 or not."""
    parser = argparse.ArgumentParser(prog="python -m coordinator.conversion.llama_converter")
    parser.add_argument("action", choices=("fetch", "show"))
    parser.add_argument("--dest", type=Path, default=None, help="parent folder of the converter")
    parser.add_argument("--sdist", type=Path, default=None, help="a local llama-cpp-python sdist")
    args = parser.parse_args(argv)
    try:
        if args.action == "fetch":
            fetch_converter(args.dest, sdist=args.sdist)
        info = find_converter(args.dest)
    except EdgefarmError as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_code_for(err)
    commit = f", llama.cpp {info.llama_cpp_commit[:10]}" if info.llama_cpp_commit else ""
    print(f"llama.cpp converter (llama-cpp-python {info.version}{commit}): {info.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
