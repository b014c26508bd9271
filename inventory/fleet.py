"""The fleet view: declared devices merged with live agents, as a table or JSON."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgefarm.domain import DeviceCapabilities
from edgefarm.selectors import device_facts, matches
from edgefarm.yamlfile import load_file
from inventory.model import DeclaredDevice, FleetDevice, FleetState, Inventory, LiveAgent

__all__ = [
    "FleetDevice",
    "fleet_to_json",
    "format_ago",
    "load_inventory",
    "merge_fleet",
    "render_fleet_table",
    "select_fleet",
]


def load_inventory(path: Path | None, *, missing_ok: bool = False) -> Inventory:
    """Read a declared-fleet YAML file.

    ``None`` gives an empty inventory, and so does a missing file when ``missing_ok``
    (use it for a default location); otherwise a missing or invalid file raises
    :class:`~edgefarm.errors.SpecError` naming file, line and field.
    """
    if path is None or (missing_ok and not path.exists()):
        return Inventory()
    return load_file(Inventory, path)


def merge_fleet(
    declared: list[DeclaredDevice],
    live: list[LiveAgent],
    now: float,
    missing_after_s: float,
) -> list[FleetDevice]:
    """Declared devices (in declared order), then live devices nobody declared (by name).

    Each agent belongs to at most one declared device: the first whose device_id
    equals the agent's, else the first whose selector matches it, else the first
    whose name is the agent's device name or hostname.
    """
    claimed: dict[int, list[LiveAgent]] = {index: [] for index in range(len(declared))}
    undeclared: dict[str, list[LiveAgent]] = {}
    for agent in live:
        owner = _owner(declared, agent)
        if owner is None:
            undeclared.setdefault(agent.device_id, []).append(agent)
        else:
            claimed[owner].append(agent)
    fleet = [
        _declared_device(device, claimed[index], now, missing_after_s)
        for index, device in enumerate(declared)
    ]
    extra = [_live_device(agents, now, missing_after_s) for agents in undeclared.values()]
    return fleet + sorted(extra, key=lambda d: (d.name, d.device_id or ""))


FLEET_STATES: tuple[FleetState, ...] = ("online", "busy", "missing", "never_seen")


def select_fleet(
    fleet: list[FleetDevice], state: str = "", selector: Mapping[str, str] | None = None
) -> list[FleetDevice]:
    """The devices in ``state`` (any when empty) matching ``selector`` (any when empty;
    matched against each device's capabilities, labels and name)."""
    out = []
    for device in fleet:
        if state and device.state != state:
            continue
        if selector:
            caps = device.capabilities or DeviceCapabilities(
                device_id=device.device_id or "", hostname=""
            )
            if not matches(selector, device_facts(caps, device.labels, device.name)):
                continue
        out.append(device)
    return out


def _owner(declared: list[DeclaredDevice], agent: LiveAgent) -> int | None:
    """Index of the declared device an agent belongs to, or None."""
    if not declared:
        return None
    for index, device in enumerate(declared):
        if device.device_id and device.device_id == agent.device_id:
            return index
    facts = device_facts(agent.capabilities, agent.labels, agent.device_name)
    for index, device in enumerate(declared):
        if not device.device_id and device.selector and matches(device.selector, facts):
            return index
    host = agent.capabilities.hostname.lower()
    names = {agent.device_name.lower(), host, host.split(".", 1)[0]} - {""}
    for index, device in enumerate(declared):
        if not device.device_id and not device.selector and device.name.lower() in names:
            return index
    return None


def _latest(agents: list[LiveAgent]) -> LiveAgent | None:
    return max(agents, key=lambda a: a.last_heartbeat, default=None)


def _state(agents: list[LiveAgent], now: float, missing_after_s: float) -> FleetState:
    if not agents:
        return "never_seen"
    alive = [a for a in agents if a.online and now - a.last_heartbeat <= missing_after_s]
    if not alive:
        return "missing"
    return "busy" if any(a.busy for a in alive) else "online"


def _declared_device(
    device: DeclaredDevice, agents: list[LiveAgent], now: float, missing_after_s: float
) -> FleetDevice:
    latest = _latest(agents)
    labels = dict(latest.labels) if latest else {}
    labels.update(device.labels)
    return FleetDevice(
        name=device.name,
        device_id=device.device_id or (latest.device_id if latest else None),
        state=_state(agents, now, missing_after_s),
        last_heartbeat=latest.last_heartbeat if latest else None,
        agents=sorted(a.agent_id for a in agents),
        labels=labels,
        capabilities=latest.capabilities if latest else None,
        declared=True,
        enrolment=_enrolment(agents),
    )


def _live_device(agents: list[LiveAgent], now: float, missing_after_s: float) -> FleetDevice:
    latest = _latest(agents)
    assert latest is not None
    name = latest.device_name or latest.capabilities.hostname or latest.device_id
    return FleetDevice(
        name=name,
        device_id=latest.device_id,
        state=_state(agents, now, missing_after_s),
        last_heartbeat=latest.last_heartbeat,
        agents=sorted(a.agent_id for a in agents),
        labels=dict(latest.labels),
        capabilities=latest.capabilities,
        declared=False,
        enrolment=_enrolment(agents),
    )


def _enrolment(agents: list[LiveAgent]) -> dict[str, str]:
    return {a.agent_name: a.enrolment for a in agents if a.enrolment}


def format_ago(then: float | None, now: float) -> str:
    """``"3s ago"``, ``"5m ago"``, ``"2h ago"``, ``"4d ago"``, or ``"never"``."""
    if then is None or then <= 0:
        return "never"
    seconds = max(0, int(now - then))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def render_fleet_table(devices: list[FleetDevice], now: float | None = None) -> str:
    """A plain-text table: name, state, last heartbeat, arch, cores, backends, and the
    enrolment of each agent (``name`` enrolled, ``name!`` revoked).

    Devices not in the inventory are marked with ``*`` after their name.
    """
    if not devices:
        return "no devices (none declared, none seen)"
    now = time.time() if now is None else now
    header = ("NAME", "STATE", "LAST HEARTBEAT", "ARCH", "CORES", "BACKENDS", "AGENTS")
    rows = [header]
    for device in devices:
        caps = device.capabilities
        rows.append(
            (
                device.name + ("" if device.declared else " *"),
                device.state,
                format_ago(device.last_heartbeat, now),
                caps.arch if caps and caps.arch else "-",
                str(caps.logical_cores) if caps and caps.logical_cores else "-",
                ",".join(sorted(caps.backends)) if caps and caps.backends else "-",
                _agents_cell(device.enrolment),
            )
        )
    widths = [max(len(row[col]) for row in rows) for col in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    if any(not d.declared for d in devices):
        lines.append("* not declared in the inventory")
    if any("revoked" in d.enrolment.values() for d in devices):
        lines.append("! credential revoked")
    return "\n".join(lines)


def _agents_cell(enrolment: dict[str, str]) -> str:
    marks = {"revoked": "!"}
    return ",".join(name + marks.get(state, "") for name, state in sorted(enrolment.items())) or "-"


def fleet_to_json(devices: list[FleetDevice]) -> list[dict[str, Any]]:
    """JSON-ready dicts (capabilities as a nested dict or null)."""
    return [asdict(device) for device in devices]
