"""The files a campaign spec names (``file:`` references), on both sides of the wire.

The coordinator reads no paths from a submitted spec. The CLI, on the machine where
the spec is, reads every file a ``file:`` reference names (relative to the spec's
folder) and uploads it to the coordinator's artifact store (:func:`upload_spec_files`):
a file as it is, a Hugging Face checkpoint folder as one deterministic tar of the files
the farm reads (the bytes :class:`~coordinator.preparation.Preparer` stores for it, so
the sha256s match); nothing is uploaded that the coordinator already holds. The
submission then maps each reference, as written, to its artifact.

The coordinator (:func:`resolve_spec_files`) turns that map into paths of its own: an
uploaded file is reached through a link named like the original (readers go by the
suffix), an uploaded folder is unpacked once in the store. A reference that was not
uploaded resolves only under the operator's ``--model-root`` folder (after following
symbolic links and ``..``); anything else is refused, naming the spec line and field.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.backends.archive import write_folder_tar
from coordinator.conversion.olive_convert import WORKFLOW_PARAM
from coordinator.spec import CampaignSpec, resolve_file_ref
from edgefarm.errors import EdgefarmError, SpecError
from edgefarm.yamlfile import format_path, load_yaml_with_lines, locate
from protos.edgefarm.v1 import common_pb2, control_pb2

if TYPE_CHECKING:
    from coordinator.artifacts import ArtifactStore
    from coordinator.client import ControlClient

CHUNK_BYTES = 1 << 20
FIELDS = ("source", "eval", "calibration")


@dataclass(frozen=True)
class FileRef:
    """A ``file:`` reference of a spec: the text as written, its field and line."""

    ref: str
    field: str  # e.g. "models[0].source"
    line: int

    @property
    def is_source(self) -> bool:
        """A model source (a file or a folder); eval and calibration are files."""
        return self.field.endswith(".source")

    def where(self, spec_name: str) -> str:
        """``FILE:LINE: FIELD`` for messages."""
        return f"{spec_name}:{self.line}: {self.field}"


def file_refs(spec: CampaignSpec, spec_text: str, spec_name: str) -> list[FileRef]:
    """Every ``file:`` reference of ``spec``, in spec order, with its line: the models'
    files, then the Olive workflows of conversion parameters."""
    _, lines = load_yaml_with_lines(spec_text, spec_name)
    found = []
    for index, model in enumerate(spec.models):
        for name in FIELDS:
            value = getattr(model, name)
            if isinstance(value, str) and value.startswith("file:"):
                line, shown = locate(("models", index, name), lines)
                found.append(FileRef(value, format_path(shown), line))
    for index, backend in enumerate(spec.backends):
        for scheme, params in backend.convert.items():
            value = params.get(WORKFLOW_PARAM)
            if isinstance(value, str) and value.startswith("file:"):
                path = ("backends", index, "convert", scheme, WORKFLOW_PARAM)
                line, shown = locate(path, lines)
                found.append(FileRef(value, format_path(shown), line))
    return found


# ----- the CLI side ---------------------------------------------------------------


def upload_spec_files(
    client: ControlClient,
    spec_path: Path,
    spec_text: str,
    echo: Callable[[str], None] = lambda _: None,
) -> dict[str, control_pb2.SpecFile]:
    """Upload every local file or folder the spec's ``file:`` references name (skipping
    what the coordinator already holds); returns the request's ``files`` map.

    A reference naming nothing on this machine is left out (with a warning): the
    coordinator then looks for it under its model root, or refuses it.
    """
    spec_name = str(spec_path)
    spec = CampaignSpec.from_text(spec_text, spec_name)
    files: dict[str, control_pb2.SpecFile] = {}
    for item in file_refs(spec, spec_text, spec_name):
        if item.ref in files:
            continue
        path = resolve_file_ref(item.ref, spec_path.parent)
        if not path.exists():
            echo(
                f"warning: {item.where(spec_name)}: {item.ref}: no such file here; the "
                "coordinator must find it under its model root"
            )
            continue
        if path.is_dir() and not item.is_source:
            raise SpecError(f"{item.where(spec_name)}: {path} is a folder, not a file")
        try:
            files[item.ref] = _upload(client, item, path, echo)
        except SpecError as error:  # not a checkpoint, not a GGUF file
            raise SpecError(f"{item.where(spec_name)}: {error}") from None
    return files


def _upload(
    client: ControlClient, item: FileRef, path: Path, echo: Callable[[str], None]
) -> control_pb2.SpecFile:
    if path.is_dir():
        from coordinator.models.sources import checkpoint_files, resolve_llm_source

        # A checkpoint folder, or a folder holding one GGUF file (uploaded itself).
        local = resolve_llm_source(f"file:{path}", path.parent, path.parent)
        if local.is_dir():
            names = {name for name, _ in checkpoint_files(local)}
            with _folder_tar(local, lambda rel: rel in names) as tar:
                return _send(client, tar, f"{local.name}.tar", True, echo)
        path = local
    return _send(client, path, path.name, False, echo)


def _send(
    client: ControlClient, path: Path, name: str, folder: bool, echo: Callable[[str], None]
) -> control_pb2.SpecFile:
    sha, size = file_sha256(path)
    ref = common_pb2.ArtifactRef(sha256=sha, size_bytes=size, name=name)
    if client.has_artifact(sha):
        echo(f"{name}: already on the coordinator")
    else:
        echo(f"uploading {name} ({size / 2**20:.1f} MiB)")
        ref = client.upload_artifact(path, sha, size, name)
    return control_pb2.SpecFile(artifact=ref, folder=folder)


def file_sha256(path: Path) -> tuple[str, int]:
    """A file's sha256 and size, read in chunks."""
    digest, size = hashlib.sha256(), 0
    for chunk in read_chunks(path):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def read_chunks(path: Path) -> Iterator[bytes]:
    """A file's bytes in :data:`CHUNK_BYTES` pieces."""
    with Path(path).open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            yield chunk


@contextmanager
def _folder_tar(folder: Path, include: Callable[[str], bool]) -> Iterator[Path]:
    """A folder's deterministic tar in a temporary file, removed afterwards."""
    fd, name = tempfile.mkstemp(prefix="edgefarm-upload-", suffix=".tar")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            write_folder_tar(folder, out, include)
        yield path
    finally:
        path.unlink(missing_ok=True)


# ----- the coordinator side -------------------------------------------------------


def resolve_spec_files(
    spec: CampaignSpec,
    spec_text: str,
    spec_name: str,
    uploaded: Mapping[str, control_pb2.SpecFile],
    artifacts: ArtifactStore,
    model_root: Path | None,
) -> dict[str, Path]:
    """Each ``file:`` reference of a submitted spec -> a path on the coordinator: its
    upload in the artifact store, or a file or folder under ``model_root``.

    Raises :class:`SpecError` (``FILE:LINE: FIELD: problem``) for anything else. Runs
    file-system work (unpacking an uploaded folder once): call it off the event loop.
    """
    paths: dict[str, Path] = {}
    for item in file_refs(spec, spec_text, spec_name):
        where = item.where(spec_name)
        upload = uploaded.get(item.ref)
        if upload is not None:
            paths[item.ref] = _uploaded_path(upload, artifacts, where, item)
        elif model_root is not None:
            paths[item.ref] = _under_root(item, model_root, where)
        else:
            raise SpecError(
                f"{where}: {item.ref} was not uploaded; the coordinator reads no paths from "
                "submitted specs (an operator may allow a folder with --model-root)"
            )
    return paths


def _uploaded_path(
    upload: control_pb2.SpecFile, artifacts: ArtifactStore, where: str, item: FileRef
) -> Path:
    sha = upload.artifact.sha256
    try:
        if not artifacts.has(sha):
            raise SpecError(f"{where}: {item.ref}: artifact {sha[:12]} was not uploaded")
        if upload.folder:
            if not item.is_source:
                raise SpecError(f"{where}: {item.ref} was uploaded as a folder, not a file")
            return artifacts.folder(sha).absolute()
        return artifacts.named(sha, upload.artifact.name or item.ref).absolute()
    except SpecError:
        raise
    except EdgefarmError as error:  # a malformed hash, an upload that is not a tar
        raise SpecError(f"{where}: {item.ref}: {error}") from None


def _under_root(item: FileRef, model_root: Path, where: str) -> Path:
    root = model_root.resolve()
    raw = Path(item.ref.removeprefix("file:")).expanduser()
    path = (raw if raw.is_absolute() else root / raw).resolve()
    if not path.is_relative_to(root):
        raise SpecError(
            f"{where}: {item.ref} was not uploaded and is outside the coordinator's "
            f"model root {root}"
        )
    if not (path.is_file() or (item.is_source and path.is_dir())):
        raise SpecError(
            f"{where}: {item.ref} was not uploaded and names no "
            f"{'file or folder' if item.is_source else 'file'} under the coordinator's "
            f"model root {root}"
        )
    return path
