"""Spec files reach the coordinator as uploads; the coordinator reads no spec paths.

A real coordinator gRPC server (no Ray needed to start it) runs in a background thread;
the CLI side is :func:`coordinator.uploads.upload_spec_files` over a ControlClient.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from coordinator.artifacts import STAGING, ArtifactStore
from coordinator.client import ControlClient
from coordinator.server import CoordinatorConfig, create_server
from coordinator.spec import CampaignSpec
from coordinator.uploads import CHUNK_BYTES, resolve_spec_files, upload_spec_files
from edgefarm.errors import SpecError, UsageError
from protos.edgefarm.v1 import control_pb2

TOKEN = "upload-test-token"


class Coordinator:
    """create_server's gRPC server on its own event loop thread."""

    def __init__(self, home: Path, model_root: Path | None = None) -> None:
        config = CoordinatorConfig(
            listen="127.0.0.1:0",
            store_url=f"sqlite:///{home / 'results.sqlite'}",
            home=home,
            token=TOKEN,
            model_root=model_root,
        )
        self.home = home
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        future = asyncio.run_coroutine_threadsafe(create_server(config), self.loop)
        self.server, self.port, self.scheduler = future.result(60)
        self.address = f"127.0.0.1:{self.port}"
        self.artifacts = ArtifactStore(home / "artifacts")

    def staging_files(self) -> list[Path]:
        staging = self.artifacts.root / STAGING
        return [p for p in staging.rglob("*") if p.is_file()] if staging.exists() else []

    def stored(self) -> set[str]:
        return {
            p.name for p in self.artifacts.root.glob("??/*") if p.is_file() and len(p.name) == 64
        }

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.scheduler.store.close()


@pytest.fixture()
def coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    coord = Coordinator(tmp_path / "coordinator")
    yield coord
    coord.close()


@pytest.fixture()
def client(coordinator: Coordinator) -> Iterator[ControlClient]:
    with ControlClient(coordinator.address, TOKEN) as control:
        yield control


def _chunks(sha: str, size: int, data: bytes, token: str = TOKEN) -> Iterator[Any]:
    yield control_pb2.UploadArtifactChunk(token=token, sha256=sha, size_bytes=size, name="x.bin")
    for start in range(0, len(data), CHUNK_BYTES):
        yield control_pb2.UploadArtifactChunk(data=data[start : start + CHUNK_BYTES])


def _details(error: grpc.RpcError) -> str:
    return str(error.details() or "")  # type: ignore[attr-defined]


def _checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(os.urandom(3 * CHUNK_BYTES // 2))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "notes.txt").write_text("not part of a checkpoint")  # left out
    return folder


def _spec(path: Path, models: str) -> Path:
    path.write_text(
        f"name: uploads\nmodels:\n{models}backends:\n  - name: noop\n    schemes: [none]\n"
    )
    return path


def _resolve(
    spec_path: Path,
    files: dict[str, control_pb2.SpecFile],
    artifacts: ArtifactStore,
    model_root: Path | None = None,
) -> dict[str, Path]:
    text = spec_path.read_text()
    spec = CampaignSpec.from_text(text, spec_path.name)
    return resolve_spec_files(spec, text, spec_path.name, files, artifacts, model_root)


# ----- uploads --------------------------------------------------------------------


def test_file_upload_round_trip(coordinator: Coordinator, client: ControlClient) -> None:
    data = os.urandom(2 * CHUNK_BYTES + 123)  # three chunks
    sha = hashlib.sha256(data).hexdigest()
    assert not client.has_artifact(sha)
    path = coordinator.home.parent / "model.bin"
    path.write_bytes(data)
    ref = client.upload_artifact(path, sha, len(data), "model.bin")
    assert (ref.sha256, ref.size_bytes, ref.name) == (sha, len(data), "model.bin")
    assert client.has_artifact(sha)
    assert coordinator.artifacts.path(sha).read_bytes() == data
    assert coordinator.staging_files() == []


def test_spec_files_upload_and_resolve(
    coordinator: Coordinator, client: ControlClient, tmp_path: Path
) -> None:
    here = tmp_path / "cli"
    _checkpoint(here / "ckpt")
    (here / "m.gguf").write_bytes(b"GGUF" + os.urandom(1000))
    (here / "data").mkdir()
    (here / "data" / "eval.txt").write_text("some evaluation text\n")
    spec = _spec(
        here / "spec.yaml",
        "  - name: ckpt\n    source: file:ckpt\n    eval: file:data/eval.txt\n"
        "  - name: gguf\n    source: file:m.gguf\n    eval: file:data/eval.txt\n",
    )
    lines: list[str] = []
    files = upload_spec_files(client, spec, spec.read_text(), echo=lines.append)
    assert set(files) == {"file:ckpt", "file:m.gguf", "file:data/eval.txt"}
    assert files["file:ckpt"].folder and not files["file:m.gguf"].folder
    assert sum(line.startswith("uploading") for line in lines) == 3
    assert coordinator.staging_files() == []

    paths = _resolve(spec, files, coordinator.artifacts)
    folder = paths["file:ckpt"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert (folder / "model.safetensors").read_bytes() == (
        here / "ckpt" / "model.safetensors"
    ).read_bytes()
    # Preparation re-packs the unpacked folder with the same filter: the same artifact.
    names = {"config.json", "model.safetensors", "tokenizer.json"}
    repacked = coordinator.artifacts.put_folder(folder, "c.tar", lambda rel: rel in names)
    assert repacked.sha256 == files["file:ckpt"].artifact.sha256
    gguf = paths["file:m.gguf"]
    assert gguf.name == "m.gguf" and gguf.read_bytes() == (here / "m.gguf").read_bytes()
    assert paths["file:data/eval.txt"].read_text() == "some evaluation text\n"
    # An uploaded file is stored once: putting it again copies nothing.
    before = coordinator.stored()
    assert coordinator.artifacts.put_file(gguf, "m.gguf").sha256 == (
        files["file:m.gguf"].artifact.sha256
    )
    assert coordinator.stored() == before


def test_upload_is_skipped_when_present(
    coordinator: Coordinator, client: ControlClient, tmp_path: Path, monkeypatch: Any
) -> None:
    (tmp_path / "model.onnx").write_bytes(os.urandom(5000))
    spec = _spec(tmp_path / "spec.yaml", "  - name: m\n    source: file:model.onnx\n")
    first = upload_spec_files(client, spec, spec.read_text())
    uploads: list[str] = []
    monkeypatch.setattr(
        client,
        "upload_artifact",
        lambda *args: uploads.append(args[3]),  # type: ignore[misc]
    )
    lines: list[str] = []
    again = upload_spec_files(client, spec, spec.read_text(), echo=lines.append)
    assert uploads == []
    assert lines == ["model.onnx: already on the coordinator"]
    assert again == first


def test_sha_mismatch_is_refused_and_leaves_nothing(
    coordinator: Coordinator, client: ControlClient
) -> None:
    data = os.urandom(CHUNK_BYTES + 10)
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(grpc.RpcError) as caught:
        client.stub.UploadArtifact(_chunks(wrong, len(data), data))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sha256" in _details(caught.value) and "\n" not in _details(caught.value)
    sha = hashlib.sha256(data).hexdigest()
    for size in (len(data) - 1, len(data) + 1):  # longer, shorter than declared
        with pytest.raises(grpc.RpcError) as caught:
            client.stub.UploadArtifact(_chunks(sha, size, data))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "declared" in _details(caught.value)
    assert coordinator.staging_files() == []
    assert coordinator.stored() == set()
    # The client's own method translates the refusal into one line.
    path = coordinator.home.parent / "f.bin"
    path.write_bytes(data)
    with pytest.raises(UsageError, match="sha256"):
        client.upload_artifact(path, wrong, len(data), "f.bin")


def test_bad_headers_are_refused(coordinator: Coordinator, client: ControlClient) -> None:
    data = b"abc"
    sha = hashlib.sha256(data).hexdigest()
    cases = [
        (_chunks("not-a-hash", 3, data), grpc.StatusCode.INVALID_ARGUMENT, "sha256"),
        (_chunks(sha, 1 << 62, data), grpc.StatusCode.INVALID_ARGUMENT, "does not fit"),
        (_chunks(sha, 3, data, token="wrong"), grpc.StatusCode.UNAUTHENTICATED, "token"),
        (iter([]), grpc.StatusCode.INVALID_ARGUMENT, "empty upload"),
    ]
    for chunks, code, text in cases:
        with pytest.raises(grpc.RpcError) as caught:
            client.stub.UploadArtifact(chunks)
        assert caught.value.code() == code
        assert text in _details(caught.value)
    with pytest.raises(grpc.RpcError) as caught:
        client.stub.HasArtifact(control_pb2.HasArtifactRequest(token=TOKEN, sha256="../x"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert coordinator.staging_files() == []
    assert coordinator.stored() == set()


def test_cancelled_upload_leaves_nothing(coordinator: Coordinator, client: ControlClient) -> None:
    data = os.urandom(4 * CHUNK_BYTES)
    sha = hashlib.sha256(data).hexdigest()
    hold = threading.Event()

    def chunks() -> Iterator[Any]:
        yield control_pb2.UploadArtifactChunk(
            token=TOKEN, sha256=sha, size_bytes=len(data), name="big.bin"
        )
        yield control_pb2.UploadArtifactChunk(data=data[:CHUNK_BYTES])
        hold.wait(30)

    call = client.stub.UploadArtifact.future(chunks())
    deadline = time.monotonic() + 10
    while not coordinator.staging_files() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert coordinator.staging_files(), "the upload never started"
    call.cancel()
    hold.set()
    deadline = time.monotonic() + 10
    while coordinator.staging_files() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert coordinator.staging_files() == []
    assert coordinator.stored() == set()


# ----- what the coordinator reads -------------------------------------------------


def test_remote_spec_naming_a_coordinator_file_is_refused(
    coordinator: Coordinator, client: ControlClient, tmp_path: Path
) -> None:
    secret = tmp_path / "secret" / "model.onnx"
    secret.parent.mkdir()
    secret.write_bytes(b"the coordinator's own file")
    for models, field in [
        (f"  - name: m\n    source: file:{secret}\n", "models[0].source"),
        (
            f"  - name: m\n    source: builtin:digits-mlp\n    eval: file:{secret}\n",
            "models[0].eval",
        ),
        ("  - name: m\n    source: file:../secret/model.onnx\n", "models[0].source"),
    ]:
        text = _spec(tmp_path / "remote.yaml", models).read_text()
        with pytest.raises(grpc.RpcError) as caught:
            client.stub.SubmitCampaign(
                control_pb2.SubmitCampaignRequest(
                    token=TOKEN, spec_yaml=text, spec_name="remote.yaml"
                )
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = _details(caught.value)
        assert details.startswith(f"remote.yaml:{4 + field.endswith('eval')}: {field}: ")
        assert "was not uploaded" in details and "--model-root" in details
        assert "\n" not in details
    assert hashlib.sha256(secret.read_bytes()).hexdigest() not in coordinator.stored()
    # A files map naming an artifact that was never uploaded does not help either.
    fake = control_pb2.SpecFile()
    fake.artifact.sha256 = hashlib.sha256(secret.read_bytes()).hexdigest()
    text = _spec(tmp_path / "remote.yaml", f"  - name: m\n    source: file:{secret}\n").read_text()
    with pytest.raises(grpc.RpcError) as caught:
        client.stub.SubmitCampaign(
            control_pb2.SubmitCampaignRequest(
                token=TOKEN, spec_yaml=text, spec_name="r.yaml", files={f"file:{secret}": fake}
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "was not uploaded" in _details(caught.value)


def test_model_root_allows_inside_only(tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "m.onnx").write_bytes(b"inside")
    _checkpoint(root / "ckpt")
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"outside")
    (root / "escape.onnx").symlink_to(outside)
    (root / "escape-dir").symlink_to(tmp_path)
    artifacts = ArtifactStore(tmp_path / "artifacts")
    spec_dir = tmp_path / "elsewhere"
    spec_dir.mkdir()

    def resolve(ref: str, field: str = "source") -> Path:
        models = "  - name: m\n    source: builtin:digits-mlp\n"
        if field == "source":
            models = f"  - name: m\n    source: {ref}\n"
        else:
            models += f"    {field}: {ref}\n"
        spec = _spec(spec_dir / "s.yaml", models)
        return _resolve(spec, {}, artifacts, root)[ref]

    assert resolve("file:sub/m.onnx") == (root / "sub" / "m.onnx").resolve()
    assert resolve(f"file:{root}/sub/m.onnx") == (root / "sub" / "m.onnx").resolve()
    assert resolve("file:ckpt") == (root / "ckpt").resolve()
    assert resolve("file:sub/m.onnx", "calibration") == (root / "sub" / "m.onnx").resolve()
    for ref, problem in [
        (f"file:{outside}", "outside the coordinator's model root"),
        ("file:../outside.onnx", "outside"),
        ("file:sub/../../outside.onnx", "outside"),
        ("file:escape.onnx", "outside"),
        ("file:escape-dir/outside.onnx", "outside"),
        ("file:/etc/passwd", "outside"),
        ("file:absent.onnx", "names no file or folder under"),
    ]:
        with pytest.raises(SpecError, match=problem) as caught:
            resolve(ref)
        assert str(caught.value).startswith("s.yaml:4: models[0].source: ")
    with pytest.raises(SpecError, match="names no file under"):
        resolve("file:ckpt", "eval")
    assert artifacts.root.exists() and not any(artifacts.root.glob("??/*"))


def test_model_root_reaches_preparation_over_grpc(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    (root / "m.onnx").write_bytes(b"inside")
    coord = Coordinator(tmp_path / "coordinator", model_root=root)
    try:
        with ControlClient(coord.address, TOKEN) as control:
            inside = _spec(tmp_path / "in.yaml", "  - name: m\n    source: file:m.onnx\n")
            # Past path resolution: refused only because no agent is online.
            with pytest.raises(UsageError, match="no online device"):
                control.submit(inside.read_text(), "in.yaml")
            outside = _spec(tmp_path / "out.yaml", "  - name: m\n    source: file:../x.onnx\n")
            with pytest.raises(UsageError, match=r"out.yaml:4: models\[0\].source: .*outside"):
                control.submit(outside.read_text(), "out.yaml")
    finally:
        coord.close()


def test_eval_folder_and_missing_local_files(
    coordinator: Coordinator, client: ControlClient, tmp_path: Path
) -> None:
    (tmp_path / "d").mkdir()
    spec = _spec(
        tmp_path / "s.yaml", "  - name: m\n    source: builtin:digits-mlp\n    eval: file:d\n"
    )
    with pytest.raises(SpecError, match=r"s.yaml:5: models\[0\].eval: .* is a folder"):
        upload_spec_files(client, spec, spec.read_text())
    spec = _spec(tmp_path / "s.yaml", "  - name: m\n    source: file:gone.onnx\n")
    lines: list[str] = []
    assert upload_spec_files(client, spec, spec.read_text(), echo=lines.append) == {}
    assert lines and lines[0].startswith("warning: ") and "model root" in lines[0]
