"""Every agent the coordinator knows, in memory: what ``devices list`` answers from.

Loaded from the store once when the coordinator starts (off the event loop), then kept
up to date by registrations, enrolments and revocations; live state (online, busy,
last heartbeat) comes from the scheduler's sessions. Answering a device list reads no
store and decodes nothing. An agent not heard from for ``forget_after_s`` drops out
of the view (it stays in the store, and comes back when it registers again), so a
fleet's history costs nothing here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Protocol

from edgefarm.domain import DeviceCapabilities
from inventory.model import LiveAgent
from results.records import AgentIdentity, DeviceSeen

FORGET_AFTER_S = 30 * 24 * 3600.0  # a month without a heartbeat
_CAPABILITY_FIELDS = frozenset(f.name for f in fields(DeviceCapabilities))


@dataclass
class _Known:
    """An agent as last registered (the live state is the scheduler's)."""

    agent_id: str
    agent_name: str
    device_id: str
    device_name: str
    capabilities: DeviceCapabilities
    labels: dict[str, str]
    last_heartbeat: float


class LiveSession(Protocol):
    """What the view needs of a scheduler session (an AgentSession)."""

    device_name: str
    capabilities: DeviceCapabilities
    labels: dict[str, str]
    connected: bool
    lease_id: str | None
    last_heartbeat: float


class FleetView:
    """Known agents and their enrolment; merged with live sessions on demand."""

    def __init__(self, forget_after_s: float = FORGET_AFTER_S) -> None:
        self.forget_after_s = forget_after_s
        self._known: dict[str, _Known] = {}
        self._enrolment: dict[str, str] = {}

    def load(self, seen: Iterable[DeviceSeen], identities: Iterable[AgentIdentity]) -> None:
        """Fill the view from the store's records (at start)."""
        for record in seen:
            self.saw(record)
        for identity in identities:
            self.enrolled(identity.agent_id, revoked=identity.revoked)

    def saw(self, record: DeviceSeen) -> None:
        """An agent registered (or was read from the store)."""
        caps = dict(record.capabilities)
        device_name = str(caps.pop("device_name", "") or record.device_id)
        known = {k: v for k, v in caps.items() if k in _CAPABILITY_FIELDS}
        known.setdefault("device_id", record.device_id)
        capabilities = DeviceCapabilities(**known)
        self._known[record.agent_id] = _Known(
            agent_id=record.agent_id,
            agent_name=record.agent_name,
            device_id=record.device_id,
            device_name=device_name,
            capabilities=capabilities,
            labels=dict(record.labels),
            last_heartbeat=record.last_heartbeat,
        )

    def enrolled(self, agent_id: str, revoked: bool = False) -> None:
        """An agent's identity was enrolled (or revoked)."""
        self._enrolment[agent_id] = "revoked" if revoked else "enrolled"

    def __len__(self) -> int:
        return len(self._known)

    def agents(self, sessions: Mapping[str, LiveSession], now: float) -> list[LiveAgent]:
        """Every agent heard from within ``forget_after_s``, with its live state, by
        device id then agent id; agents forgotten here are dropped from the view."""
        out: list[LiveAgent] = []
        forgotten = []
        for agent_id, known in self._known.items():
            session = sessions.get(agent_id)
            last = session.last_heartbeat if session is not None else known.last_heartbeat
            if session is None and now - last > self.forget_after_s:
                forgotten.append(agent_id)
                continue
            out.append(
                LiveAgent(
                    agent_id=agent_id,
                    agent_name=known.agent_name,
                    device_id=known.device_id,
                    device_name=session.device_name if session else known.device_name,
                    capabilities=session.capabilities if session else known.capabilities,
                    labels=session.labels if session else known.labels,
                    online=bool(session and session.connected),
                    busy=bool(session and session.lease_id),
                    last_heartbeat=last,
                    enrolment=self._enrolment.get(agent_id, ""),
                )
            )
        for agent_id in forgotten:
            del self._known[agent_id]
        out.sort(key=lambda a: (a.device_id, a.agent_id))
        return out
