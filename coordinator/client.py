"""A synchronous client of the Control service, for the CLI and tests."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc

from coordinator.interleave import RunShape
from edgefarm.errors import AuthError, ConnectionFailed, EdgefarmError, UsageError
from edgefarm.transport import ClientTls, sync_channel, unreachable_message
from protos.edgefarm.v1 import common_pb2, control_pb2, control_pb2_grpc

_USER_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: UsageError,
    grpc.StatusCode.NOT_FOUND: UsageError,
    grpc.StatusCode.FAILED_PRECONDITION: UsageError,
    grpc.StatusCode.UNAUTHENTICATED: AuthError,
    grpc.StatusCode.UNAVAILABLE: ConnectionFailed,
    grpc.StatusCode.DEADLINE_EXCEEDED: ConnectionFailed,
}


def _translate(error: grpc.RpcError, address: str, tls: ClientTls | None = None) -> EdgefarmError:
    code = error.code()  # type: ignore[attr-defined]
    details = error.details()  # type: ignore[attr-defined]
    cls = _USER_ERRORS.get(code, EdgefarmError)
    if cls is ConnectionFailed:
        return ConnectionFailed(unreachable_message(address, tls, details or code.name))
    return cls(details or code.name)


class ControlClient:
    """Calls the coordinator's Control service; gRPC errors become EdgefarmErrors."""

    def __init__(
        self, address: str, token: str, timeout_s: float = 30.0, tls: ClientTls | None = None
    ) -> None:
        self.address = address
        self.token = token
        self.timeout_s = timeout_s
        self.tls = tls
        self.channel = sync_channel(
            address, tls, options=[("grpc.max_receive_message_length", 256 << 20)]
        )
        self.stub = control_pb2_grpc.ControlStub(self.channel)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(
        self,
        spec_yaml: str,
        spec_name: str,
        fresh: bool = False,
        timeout_s: float = 1800.0,
        shape: RunShape | None = None,
        files: Mapping[str, control_pb2.SpecFile] | None = None,
        submission_id: str = "",
    ) -> control_pb2.SubmitCampaignResponse:
        """Submit a campaign (waits while its variants are prepared); ``shape``: a
        nightly run's baseline replay and interleaving; ``files``: the spec's ``file:``
        references, as written, and their uploads (:mod:`coordinator.uploads`);
        ``submission_id``: the same id again attaches to the campaign it created."""
        shape = shape or RunShape()
        try:
            return self.stub.SubmitCampaign(
                control_pb2.SubmitCampaignRequest(
                    token=self.token,
                    spec_yaml=spec_yaml,
                    spec_name=spec_name,
                    fresh=fresh,
                    baseline_campaign_id=shape.baseline_campaign_id,
                    blocks=shape.blocks,
                    series=sorted(shape.series),
                    seed=shape.seed,
                    files=dict(files or {}),
                    submission_id=submission_id,
                ),
                timeout=timeout_s,
            )
        except grpc.RpcError as error:
            raise _translate(error, self.address, self.tls) from None

    def watch(self, campaign_id: str) -> Iterator[control_pb2.CampaignProgress]:
        """Progress snapshots until the campaign finishes."""
        try:
            yield from self.stub.WatchCampaign(
                control_pb2.WatchCampaignRequest(token=self.token, campaign_id=campaign_id)
            )
        except grpc.RpcError as error:
            raise _translate(error, self.address, self.tls) from None

    def list_campaigns(self, limit: int = 50) -> list[control_pb2.CampaignSummary]:
        """Campaigns, newest first."""
        try:
            reply = self.stub.ListCampaigns(
                control_pb2.ListCampaignsRequest(token=self.token, limit=limit),
                timeout=self.timeout_s,
            )
        except grpc.RpcError as error:
            raise _translate(error, self.address, self.tls) from None
        return list(reply.campaigns)

    def list_devices(
        self, state: str = "", selector: str = "", page_size: int = 0
    ) -> list[control_pb2.DeviceStatus]:
        """The fleet (every page), or the devices in ``state`` matching ``selector``."""
        out: list[control_pb2.DeviceStatus] = []
        token = ""
        while True:
            request = control_pb2.ListDevicesRequest(
                token=self.token,
                state=state,
                selector=selector,
                page_size=page_size,
                page_token=token,
            )
            try:
                reply = self.stub.ListDevices(request, timeout=self.timeout_s)
            except grpc.RpcError as error:
                raise _translate(error, self.address, self.tls) from None
            out.extend(reply.devices)
            token = reply.next_page_token
            if not token:
                return out

    def results(
        self,
        campaign_id: str = "",
        model: str = "",
        backend: str = "",
        device: str = "",
        limit: int = 0,
        samples: bool = False,
    ) -> list[dict[str, Any]]:
        """Stored result rows; ``samples``: with their raw samples (``samples_ms``)."""
        try:
            reply = self.stub.QueryResults(
                control_pb2.QueryResultsRequest(
                    token=self.token,
                    campaign_id=campaign_id,
                    model=model,
                    backend=backend,
                    device=device,
                    limit=limit,
                    include_samples=samples,
                ),
                timeout=self.timeout_s,
            )
        except grpc.RpcError as error:
            raise _translate(error, self.address, self.tls) from None
        return [json.loads(row) for row in reply.rows_json]

    def revoke(self, name: str) -> list[str]:
        """Revoke the credentials of device or agent ``name``: its streams are closed, its
        leases re-queued, and it is refused from then on. Returns the revoked agent ids."""
        try:
            reply = self.stub.RevokeAgent(
                control_pb2.RevokeAgentRequest(token=self.token, name=name),
                timeout=self.timeout_s,
            )
        except grpc.RpcError as error:
            raise _translate(error, self.address, self.tls) from None
        return list(reply.agent_ids)

    def has_artifact(self, sha256: str) -> bool:
        """Whether the coordinator's artifact store holds ``sha256``."""
        try:
            reply = self.stub.HasArtifact(
                control_pb2.HasArtifactRequest(token=self.token, sha256=sha256),
                timeout=self.timeout_s,
            )
        except grpc.RpcError as error:
            raise _translate(error, self.address, self.tls) from None
        return bool(reply.present)

    def upload_artifact(
        self, path: Path, sha256: str, size_bytes: int, name: str
    ) -> common_pb2.ArtifactRef:
        """Stream the file at ``path`` (1 MiB chunks) into the coordinator's artifact
        store; it is refused unless it hashes to ``sha256`` and has ``size_bytes``."""
        from coordinator.uploads import read_chunks

        def chunks() -> Iterator[control_pb2.UploadArtifactChunk]:
            yield control_pb2.UploadArtifactChunk(
                token=self.token, sha256=sha256, size_bytes=size_bytes, name=name
            )
            for data in read_chunks(path):
                yield control_pb2.UploadArtifactChunk(data=data)

        try:
            reply: common_pb2.ArtifactRef = self.stub.UploadArtifact(chunks())
        except grpc.RpcError as error:
            raise _translate(error, self.address, self.tls) from None
        return reply
