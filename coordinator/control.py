"""The Control gRPC service: what the CLI calls (campaigns, devices, results)."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from coordinator.artifacts import ArtifactWriter, safe_name
from coordinator.campaigns import CampaignPlanner
from coordinator.fleet_view import FleetView
from coordinator.identity import token_ok
from coordinator.interleave import RunShape
from coordinator.spec import CampaignSpec
from coordinator.uploads import resolve_spec_files
from edgefarm.domain import FINISHED_TASK_STATUSES, DeviceCapabilities, TaskStatus
from edgefarm.errors import ArtifactError, EdgefarmError, SpecError, UsageError
from edgefarm.gc_pause import gc_paused
from edgefarm.selectors import parse_selector
from edgefarm.wire_limits import MAX_NAME_BYTES, MAX_STRING_BYTES
from inventory.fleet import FLEET_STATES, FleetDevice, load_inventory, merge_fleet, select_fleet
from inventory.model import DeclaredDevice, LiveAgent
from protos.convert import capabilities_to_pb
from protos.edgefarm.v1 import common_pb2, control_pb2, control_pb2_grpc
from results.store import ResultsStore

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_BAD_SHA256 = "sha256 must be 64 lowercase hex digits"
_SUBMISSION_ID = re.compile(r"[\x21-\x7e]{0,64}")


def live_agents_from_store(store: ResultsStore) -> list[LiveAgent]:
    """Every agent the store has seen; without a coordinator none counts as online."""
    view = FleetView(forget_after_s=math.inf)
    view.load(store.list_devices_seen(), store.agent_identities())
    return view.agents({}, time.time())


MAX_SERIES = 10_000  # series a nightly run may restrict itself to
DEVICES_PAGE = 1000  # devices per ListDevices page by default...
MAX_DEVICES_PAGE = 5000  # ...and at most
LISTING_REUSE_S = 10.0  # how long later pages of a device listing reuse its snapshot


def _page_offset(token: str) -> int | None:
    """The offset a page token stands for (empty: 0); None for a token not ours."""
    if not token:
        return 0
    return int(token) if token.isdigit() and len(token) <= 9 else None


class CapabilitiesCache:
    """Each agent's capabilities as protobuf, built once (a registration's capabilities
    object does not change; building its message was a quarter of a 5,000-device
    listing). Entries unused for two listings are dropped, so it holds at most two
    fleets' worth."""

    def __init__(self) -> None:
        self._current: dict[int, tuple[DeviceCapabilities, common_pb2.DeviceCapabilities]] = {}
        self._previous: dict[int, tuple[DeviceCapabilities, common_pb2.DeviceCapabilities]] = {}

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)

    def new_listing(self) -> None:
        """A new listing starts: what the one before last used may go."""
        self._previous, self._current = self._current, {}

    def message(self, caps: DeviceCapabilities) -> common_pb2.DeviceCapabilities:
        """The message of ``caps`` (keyed by identity, checked: ids are reused)."""
        key = id(caps)
        entry = self._current.get(key) or self._previous.get(key)
        if entry is None or entry[0] is not caps:
            entry = (caps, capabilities_to_pb(caps))
        self._current[key] = entry
        return entry[1]


def _add_device_status(
    page: control_pb2.ListDevicesResponse, d: FleetDevice, caps: CapabilitiesCache
) -> None:
    """Append ``d`` to the page (built in place: a message built apart is copied in)."""
    status = page.devices.add(
        name=d.name,
        device_id=d.device_id or "",
        state=d.state,
        last_heartbeat_unix=d.last_heartbeat or 0.0,
        agents=d.agents,
        labels=d.labels,
        declared=d.declared,
        enrolment=d.enrolment,
    )
    if d.capabilities is not None:
        status.capabilities.CopyFrom(caps.message(d.capabilities))


class InventoryCache:
    """The declared-fleet file, read again (off the event loop) only when it changed."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._devices: list[DeclaredDevice] = []

    async def refresh(self) -> None:
        """Re-read the file if its size or modification time changed."""
        if self.path is None:
            return
        try:
            info = await asyncio.to_thread(self.path.stat)
            stamp = (info.st_mtime_ns, info.st_size)
        except OSError:
            stamp = (0, -1)
        if stamp != self._stamp:
            inventory = await asyncio.to_thread(load_inventory, self.path)
            self._devices, self._stamp = inventory.devices, stamp

    def devices(self) -> list[DeclaredDevice]:
        """The declared devices as last read."""
        return self._devices


def _spec_name(name: str) -> str:
    """The client's name for its spec, fit for one-line error messages."""
    if not name:
        return "<spec>"
    clean = "".join(ch if ch.isprintable() else "?" for ch in name[: MAX_NAME_BYTES * 2])
    return clean if len(name) <= MAX_NAME_BYTES * 2 else clean + "..."


def _check_shape(request: control_pb2.SubmitCampaignRequest) -> str | None:
    """A nightly run's shape fields are within what a campaign can hold (``blocks`` needs
    no bound: a task is split into at most as many blocks as it has trials)."""
    if len(request.series) > MAX_SERIES:
        return f"{len(request.series)} series (at most {MAX_SERIES})"
    if any(len(series) > MAX_STRING_BYTES for series in request.series):
        return f"a series name is longer than {MAX_STRING_BYTES} bytes"
    if len(request.baseline_campaign_id) > MAX_NAME_BYTES:
        return f"baseline_campaign_id is longer than {MAX_NAME_BYTES} bytes"
    if not _SUBMISSION_ID.fullmatch(request.submission_id):
        return "submission_id must be at most 64 printable ASCII characters"
    return None


class ControlService(control_pb2_grpc.ControlServicer):
    """Serves the CLI."""

    def __init__(
        self,
        planner: CampaignPlanner,
        token: str,
        inventory_path: Path | None,
        missing_after_s: float,
        model_root: Path | None = None,
    ) -> None:
        self.planner = planner
        self.artifacts = planner.preparer.artifacts
        self.model_root = model_root  # spec paths allowed on the coordinator (--model-root)
        self.scheduler = planner.scheduler
        self.store = planner.scheduler.store
        self.token = token
        self.inventory = InventoryCache(inventory_path)
        # the last device listing: (monotonic time, state, selector, devices)
        self._last_listing: tuple[float, str, str, list[FleetDevice]] | None = None
        self._capabilities = CapabilitiesCache()
        self.missing_after_s = missing_after_s

    async def _check(self, token: str, context: grpc.aio.ServicerContext) -> None:
        if not token_ok(self.token, token):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid fleet token")

    async def SubmitCampaign(
        self, request: control_pb2.SubmitCampaignRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.SubmitCampaignResponse:
        """Validate, prepare and queue a campaign."""
        await self._check(request.token, context)
        source = _spec_name(request.spec_name)
        if problem := _check_shape(request):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{source}: {problem}")
        try:
            # No base_dir: a submitted spec's paths are never looked at here; its file:
            # references resolve to their uploads (or under --model-root) only. Parsing
            # runs off the event loop that serves the agents.
            spec = await asyncio.to_thread(CampaignSpec.from_text, request.spec_yaml, source)
            files = await asyncio.to_thread(
                resolve_spec_files,
                spec,
                request.spec_yaml,
                source,
                request.files,
                self.artifacts,
                self.model_root,
            )
            shape = RunShape(
                baseline_campaign_id=request.baseline_campaign_id,
                blocks=max(1, request.blocks),
                series=frozenset(request.series),
                seed=request.seed,
            )
            outcome = await self.planner.submit(
                spec,
                request.spec_yaml,
                files,
                fresh=request.fresh,
                shape=shape,
                submission_id=request.submission_id,
            )
        except (SpecError, UsageError) as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except EdgefarmError as error:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        except Exception as error:  # a bug: one line to the user, the traceback to the log
            log.exception("submitting %s failed", source)
            first = (str(error).splitlines() or [""])[0]
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {first}")
        return control_pb2.SubmitCampaignResponse(
            campaign_id=outcome.campaign_id,
            tasks_total=outcome.tasks_total,
            tasks_reused=outcome.tasks_reused,
            conversions_run=outcome.conversions_run,
            conversions_cached=outcome.conversions_cached,
            warnings=outcome.warnings,
            tasks_baseline=outcome.tasks_baseline,
        )

    async def HasArtifact(
        self, request: control_pb2.HasArtifactRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.HasArtifactResponse:
        """Whether the artifact store holds a file (the CLI skips its upload then)."""
        await self._check(request.token, context)
        if not _SHA256.fullmatch(request.sha256):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _BAD_SHA256)
        path = self.artifacts.path(request.sha256)
        if not path.is_file():
            return control_pb2.HasArtifactResponse(present=False)
        return control_pb2.HasArtifactResponse(present=True, size_bytes=path.stat().st_size)

    async def UploadArtifact(
        self,
        request_iterator: AsyncIterator[control_pb2.UploadArtifactChunk],
        context: grpc.aio.ServicerContext,
    ) -> common_pb2.ArtifactRef:
        """Write an upload's chunks into a staging file of the artifact store, hashing as
        they come; store it only when its sha256 and size are those declared in the
        first chunk. A failed or cancelled upload leaves nothing behind."""
        writer: ArtifactWriter | None = None
        name = ""
        try:
            async for chunk in request_iterator:
                if writer is None:
                    await self._check(chunk.token, context)
                    writer = await self._start_upload(chunk, context)
                    name = safe_name(chunk.name or chunk.sha256[:12])
                if chunk.data:
                    await asyncio.to_thread(writer.write, chunk.data)
            if writer is None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty upload: no chunks")
            assert writer is not None
            ref = await asyncio.to_thread(writer.commit, name)
        except ArtifactError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except OSError as error:
            log.warning("upload %s failed: %s", name, error)
            code = grpc.StatusCode.INTERNAL
            if error.errno == errno.ENOSPC:
                code = grpc.StatusCode.RESOURCE_EXHAUSTED
            await context.abort(code, f"upload failed: {error.strerror or error}")
        finally:
            if writer is not None:
                writer.discard()
        log.info("upload %s stored as %s (%d bytes)", ref.name, ref.sha256[:12], ref.size_bytes)
        return common_pb2.ArtifactRef(sha256=ref.sha256, size_bytes=ref.size_bytes, name=ref.name)

    async def _start_upload(
        self, header: control_pb2.UploadArtifactChunk, context: grpc.aio.ServicerContext
    ) -> ArtifactWriter:
        """The staging file for an upload, after checking its declared hash and size."""
        if not _SHA256.fullmatch(header.sha256):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _BAD_SHA256)
        free = await asyncio.to_thread(self.artifacts.free_bytes)
        if header.size_bytes > free:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"upload of {header.size_bytes} bytes does not fit: {free} bytes are free in "
                "the coordinator's artifact store",
            )
        return await asyncio.to_thread(self.artifacts.writer, header.sha256, header.size_bytes)

    def _progress(self, campaign_id: str, message: str) -> control_pb2.CampaignProgress:
        campaign = self.store.get_campaign(campaign_id)
        counts = self.store.campaign_counts(campaign_id)
        done = counts.get(TaskStatus.DONE, 0) + counts.get(TaskStatus.REUSED, 0)
        status = str(campaign.status) if campaign else "unknown"
        if campaign is not None and campaign.error and not message:
            message = campaign.error
        return control_pb2.CampaignProgress(
            campaign_id=campaign_id,
            status=status,
            tasks_total=counts.get("total", 0),
            tasks_done=done,
            tasks_failed=counts.get(TaskStatus.FAILED, 0),
            tasks_running=counts.get(TaskStatus.ASSIGNED, 0),
            finished=status in {"done", "failed"},
            message=message,
        )

    async def WatchCampaign(
        self, request: control_pb2.WatchCampaignRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[control_pb2.CampaignProgress]:
        """A snapshot now and after every event, until the campaign finishes."""
        await self._check(request.token, context)
        campaign = self.store.get_campaign(request.campaign_id)
        if campaign is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no campaign {request.campaign_id}")
        assert campaign is not None
        queue = self.scheduler.watch(campaign.campaign_id)
        try:
            snapshot = self._progress(campaign.campaign_id, "")
            yield snapshot
            while not snapshot.finished:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=1.0)
                    message = event.message
                except TimeoutError:
                    message = ""
                snapshot = self._progress(campaign.campaign_id, message)
                yield snapshot
        finally:
            self.scheduler.unwatch(campaign.campaign_id, queue)

    async def ListCampaigns(
        self, request: control_pb2.ListCampaignsRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.ListCampaignsResponse:
        """Campaigns, newest first."""
        await self._check(request.token, context)

        def summaries() -> list[control_pb2.CampaignSummary]:
            out = []
            for c in self.store.list_campaigns(limit=request.limit or 50):
                counts = self.store.campaign_counts(c.campaign_id)
                out.append(
                    control_pb2.CampaignSummary(
                        campaign_id=c.campaign_id,
                        name=c.name,
                        status=str(c.status),
                        created_unix=c.created_at,
                        tasks_total=counts.get("total", 0),
                        tasks_done=sum(counts.get(s, 0) for s in FINISHED_TASK_STATUSES)
                        - counts.get(TaskStatus.FAILED, 0),
                        tasks_failed=counts.get(TaskStatus.FAILED, 0),
                    )
                )
            return out

        return control_pb2.ListCampaignsResponse(campaigns=await asyncio.to_thread(summaries))

    def fleet(self) -> list[FleetDevice]:
        """Declared devices merged with every agent known (from memory: no store read)."""
        now = time.time()
        agents = self.scheduler.fleet.agents(self.scheduler.sessions, now)
        return merge_fleet(self.inventory.devices(), agents, now, self.missing_after_s)

    async def _listing(
        self, state: str, text: str, selector: dict[str, str], later_page: bool
    ) -> list[FleetDevice]:
        """The filtered fleet; a later page of a listing reuses the snapshot its first
        page was cut from (for up to LISTING_REUSE_S), so pages neither overlap nor cost
        a merge each."""
        now = time.monotonic()
        kept = self._last_listing
        if later_page and kept and kept[1:3] == (state, text) and now - kept[0] < LISTING_REUSE_S:
            return kept[3]
        await self.inventory.refresh()  # the declared-fleet file, re-read when it changed
        self._capabilities.new_listing()
        with gc_paused():  # tens of thousands of short-lived objects: no collection midway
            chosen = select_fleet(self.fleet(), state, selector)
        self._last_listing = (now, state, text, chosen)
        return chosen

    async def ListDevices(
        self, request: control_pb2.ListDevicesRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.ListDevicesResponse:
        """One page of the fleet with each device's state, filtered by state and
        selector; answered from memory."""
        await self._check(request.token, context)
        problem = ""
        selector: dict[str, str] = {}
        try:
            selector = parse_selector(request.selector) if request.selector else {}
        except ValueError as error:
            problem = f"selector: {error}"
        if request.state and request.state not in FLEET_STATES:
            problem = f"state {request.state!r}: use one of {', '.join(FLEET_STATES)}"
        offset = _page_offset(request.page_token)
        if offset is None:
            problem = f"page_token {request.page_token[:40]!r} is not one this coordinator gave"
        if request.page_size > MAX_DEVICES_PAGE:
            problem = f"page_size {request.page_size} is over {MAX_DEVICES_PAGE}"
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        assert offset is not None
        chosen = await self._listing(request.state, request.selector, selector, offset > 0)
        size = request.page_size or DEVICES_PAGE
        page = chosen[offset : offset + size]
        more = offset + size < len(chosen)
        reply = control_pb2.ListDevicesResponse(
            next_page_token=str(offset + size) if more else "", total=len(chosen)
        )
        with gc_paused():
            for device in page:
                _add_device_status(reply, device, self._capabilities)
        return reply

    async def QueryResults(
        self, request: control_pb2.QueryResultsRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.QueryResultsResponse:
        """Stored rows as JSON (read and encoded off the event loop)."""
        await self._check(request.token, context)
        if request.campaign_id:
            campaign = await asyncio.to_thread(self.store.get_campaign, request.campaign_id)
            if campaign is None:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND, f"no campaign {request.campaign_id[:64]!r}"
                )

        def rows_json() -> list[str]:
            samples = request.include_samples
            if request.campaign_id:
                rows = self.store.iter_campaign_results(request.campaign_id, samples=samples)
            else:
                rows = self.store.iter_results(
                    model=request.model or None,
                    backend=request.backend or None,
                    device=request.device or None,
                    limit=request.limit or None,
                    samples=samples,
                )
            return [json.dumps(r) for r in rows]

        return control_pb2.QueryResultsResponse(rows_json=await asyncio.to_thread(rows_json))

    async def RevokeAgent(
        self, request: control_pb2.RevokeAgentRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.RevokeAgentResponse:
        """Revoke the credentials of the agents ``name`` names: stored first (so a
        re-registration is refused), then their streams close and their tasks move."""
        await self._check(request.token, context)
        identities = await asyncio.to_thread(self.store.agent_identities)
        agents = self.scheduler.fleet.agents(self.scheduler.sessions, time.time())
        on_device = {a.agent_id for a in agents if request.name in (a.device_name, a.device_id)}
        chosen = [
            i.agent_id
            for i in identities
            if request.name in (i.agent_id, i.agent_name) or i.agent_id in on_device
        ]
        if not chosen:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no enrolled agent or device named {request.name!r}",
            )
        for agent_id in chosen:
            await self.scheduler.writer.run(self.store.revoke_agent, agent_id, time.time())
            self.scheduler.revoke(agent_id)
            log.warning("revoked agent %s", agent_id)
        return control_pb2.RevokeAgentResponse(agent_ids=chosen)
