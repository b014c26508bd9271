"""The fleet's data: declared devices (from the inventory YAML), live agents, merged devices."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from edgefarm.domain import DeviceCapabilities
from edgefarm.selectors import parse_selector

FleetState = Literal["online", "busy", "missing", "never_seen"]

_DEVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _to_selector(value: Any) -> Any:
    """Accept a mapping or a list of ``key=value`` strings."""
    if value is None:
        return {}
    if isinstance(value, dict | list | str):
        return parse_selector(value)
    return value


def _to_labels(value: Any) -> Any:
    """Label values may be written as YAML numbers or booleans; keep them as text."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        return value
    out: dict[Any, Any] = {}
    for key, item in value.items():
        if isinstance(item, bool):
            item = "true" if item else "false"
        elif isinstance(item, int | float):
            item = str(item)
        out[key] = item
    return out


SelectorField = Annotated[dict[str, str], BeforeValidator(_to_selector)]
LabelsField = Annotated[dict[str, str], BeforeValidator(_to_labels)]


class DeclaredDevice(BaseModel):
    """A device the operator expects in the fleet.

    It is recognised among live agents by ``device_id`` when given, else by
    ``selector`` (over :func:`edgefarm.selectors.device_facts`), else by ``name``
    equal to the agent's device name or hostname.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    device_id: str | None = None
    selector: SelectorField = Field(default_factory=dict)
    labels: LabelsField = Field(default_factory=dict)
    description: str = ""

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _DEVICE_NAME.match(value):
            raise ValueError(
                f"invalid device name {value!r} (use letters, digits, '.', '_' and '-')"
            )
        return value

    @field_validator("device_id")
    @classmethod
    def _check_device_id(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("device_id is empty (leave it out to match by selector or name)")
        return value.strip() if value is not None else None

    @model_validator(mode="after")
    def _one_way_to_match(self) -> DeclaredDevice:
        if self.device_id and self.selector:
            raise ValueError("give either device_id or selector, not both")
        return self


class Inventory(BaseModel):
    """The declared fleet file: ``devices: [...]``."""

    model_config = ConfigDict(extra="forbid")

    devices: list[DeclaredDevice] = Field(default_factory=list)

    @field_validator("devices", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value

    @field_validator("devices")
    @classmethod
    def _unique_names(cls, devices: list[DeclaredDevice]) -> list[DeclaredDevice]:
        seen: set[str] = set()
        for device in devices:
            if device.name in seen:
                raise ValueError(f"device name {device.name!r} is declared twice")
            seen.add(device.name)
        return devices


@dataclass
class LiveAgent:
    """An agent the coordinator has seen, with its current liveness."""

    agent_id: str
    agent_name: str
    device_id: str
    device_name: str
    capabilities: DeviceCapabilities
    labels: dict[str, str] = field(default_factory=dict)
    online: bool = False
    busy: bool = False
    last_heartbeat: float = 0.0
    enrolment: str = ""  # "enrolled", "revoked", or "" (seen before enrolment existed)


@dataclass
class FleetDevice:
    """One device of the fleet: declared, live, or both."""

    name: str
    device_id: str | None
    state: FleetState
    last_heartbeat: float | None
    agents: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    capabilities: DeviceCapabilities | None = None
    declared: bool = False
    enrolment: dict[str, str] = field(default_factory=dict)  # agent name -> state
