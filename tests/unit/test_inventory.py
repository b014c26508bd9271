"""The declared fleet: loading the inventory, merging it with live agents, showing it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgefarm.domain import DeviceCapabilities
from edgefarm.errors import SpecError
from inventory.fleet import (
    fleet_to_json,
    format_ago,
    load_inventory,
    merge_fleet,
    render_fleet_table,
)
from inventory.model import DeclaredDevice, LiveAgent

REPO = Path(__file__).resolve().parents[2]
NOW = 1_000_000.0


def _agent(
    agent_id: str,
    device_id: str,
    *,
    name: str = "",
    hostname: str = "",
    arch: str = "x86_64",
    online: bool = True,
    busy: bool = False,
    age: float = 1.0,
    labels: dict[str, str] | None = None,
) -> LiveAgent:
    caps = DeviceCapabilities(
        device_id=device_id,
        hostname=hostname,
        arch=arch,
        logical_cores=4,
        backends={"onnxruntime": "1.18"},
    )
    return LiveAgent(
        agent_id=agent_id,
        agent_name=agent_id,
        device_id=device_id,
        device_name=name or device_id,
        capabilities=caps,
        labels=labels or {},
        online=online,
        busy=busy,
        last_heartbeat=NOW - age,
    )


def test_no_inventory_is_empty(tmp_path: Path) -> None:
    assert load_inventory(None).devices == []
    assert load_inventory(tmp_path / "devices.yaml", missing_ok=True).devices == []
    with pytest.raises(SpecError, match=r"devices\.yaml: file not found"):
        load_inventory(tmp_path / "devices.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing declared yet\n")
    assert load_inventory(empty).devices == []


def test_example_inventory_loads() -> None:
    inventory = load_inventory(REPO / "inventory" / "devices.example.yaml")
    by_name = {d.name: d for d in inventory.devices}
    assert by_name["rpi5-01"].selector == {"arch": "arm64", "hostname": "rpi5-01"}
    assert by_name["jetson-orin"].device_id == "3f2a9c41d07be812"
    assert by_name["laptop-x86"].labels["rack"] == "desk"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "devices:\n  - name: a\n  - name: b\n    lables: {x: 1}\n",
            "inv.yaml:4: devices[1].lables: unknown field 'lables' (did you mean 'labels'?)",
        ),
        (
            "devices:\n  - name: a\n    device_id: abc\n    selector: [arch=x86_64]\n",
            "inv.yaml:2: devices[0]: give either device_id or selector, not both",
        ),
        (
            "devices:\n  - name: a\n  - name: a\n",
            "inv.yaml:1: devices: device name 'a' is declared twice",
        ),
        (
            "devices:\n  - name: a\n    selector: [archx86]\n",
            "inv.yaml:3: devices[0].selector: bad selector item 'archx86' "
            "(expected 'key=value' or 'key!=value')",
        ),
    ],
)
def test_bad_inventory_is_one_line(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_inventory(path)
    assert str(info.value) == f"{tmp_path}/{expected}"


def test_merge_states_and_matching() -> None:
    declared = [
        DeclaredDevice(name="by-id", device_id="d1"),
        DeclaredDevice(name="by-selector", selector={"hostname": "rpi"}),
        DeclaredDevice(name="orin", labels={"rack": "b"}),
        DeclaredDevice(name="ghost"),
        DeclaredDevice(name="gone", device_id="d4"),
        DeclaredDevice(name="stale", device_id="d5"),
    ]
    live = [
        _agent("a1", "d1", busy=True),
        _agent("a1b", "d1", age=3.0),
        _agent("a2", "d2", hostname="RPI.local", arch="arm64"),
        _agent("a3", "d3", hostname="orin", labels={"rack": "a", "gpu": "yes"}),
        _agent("a4", "d4", online=False, age=500.0),
        _agent("a5", "d5", age=100.0),
        _agent("a6", "d6", name="stray-box"),
    ]
    fleet = merge_fleet(declared, live, NOW, missing_after_s=30.0)
    by_name = {d.name: d for d in fleet}
    assert [d.name for d in fleet] == [
        "by-id", "by-selector", "orin", "ghost", "gone", "stale", "stray-box",
    ]  # fmt: skip
    assert by_name["by-id"].state == "busy"
    assert by_name["by-id"].agents == ["a1", "a1b"]
    assert by_name["by-id"].last_heartbeat == NOW - 1.0
    assert by_name["by-selector"].state == "online"
    assert by_name["by-selector"].device_id == "d2"
    assert by_name["orin"].agents == ["a3"]
    assert by_name["orin"].labels == {"rack": "b", "gpu": "yes"}  # declared labels win
    assert by_name["ghost"].state == "never_seen"
    assert by_name["ghost"].last_heartbeat is None
    assert by_name["ghost"].capabilities is None
    assert by_name["gone"].state == "missing"
    assert by_name["stale"].state == "missing"  # online flag, but heartbeat too old
    stray = by_name["stray-box"]
    assert (stray.declared, stray.state, stray.device_id) == (False, "online", "d6")
    assert all(d.declared for d in fleet[:-1])


def test_agent_is_claimed_by_one_declared_device_only() -> None:
    declared = [
        DeclaredDevice(name="first", selector={"arch": "x86_64"}),
        DeclaredDevice(name="second", selector={"arch": "amd64"}),
    ]
    fleet = merge_fleet(declared, [_agent("a1", "d1")], NOW, 30.0)
    assert [(d.name, d.agents) for d in fleet] == [("first", ["a1"]), ("second", [])]


def test_format_ago() -> None:
    assert format_ago(None, NOW) == "never"
    assert format_ago(NOW - 3.4, NOW) == "3s ago"
    assert format_ago(NOW - 125, NOW) == "2m ago"
    assert format_ago(NOW - 7300, NOW) == "2h ago"
    assert format_ago(NOW - 3 * 86400, NOW) == "3d ago"
    assert format_ago(NOW + 5, NOW) == "0s ago"


def test_render_table_and_json() -> None:
    declared = [DeclaredDevice(name="box", device_id="d1"), DeclaredDevice(name="ghost")]
    enrolled, revoked = _agent("a1", "d1"), _agent("a9", "d9")
    enrolled.agent_name, enrolled.enrolment = "pi-1", "enrolled"
    revoked.agent_name, revoked.enrolment = "pi-9", "revoked"
    fleet = merge_fleet(declared, [enrolled, revoked], NOW, 30.0)
    table = render_fleet_table(fleet, now=NOW).splitlines()
    header = ["NAME", "STATE", "LAST", "HEARTBEAT", "ARCH", "CORES", "BACKENDS", "AGENTS"]
    assert table[0].split() == header
    assert table[1].split() == ["box", "online", "1s", "ago", "x86_64", "4", "onnxruntime", "pi-1"]
    assert table[2].split() == ["ghost", "never_seen", "never", "-", "-", "-", "-"]
    assert table[3].split() == [
        "d9",
        "*",
        "online",
        "1s",
        "ago",
        "x86_64",
        "4",
        "onnxruntime",
        "pi-9!",
    ]
    assert table[4] == "* not declared in the inventory"
    assert table[5] == "! credential revoked"
    assert render_fleet_table([]) == "no devices (none declared, none seen)"

    rows = json.loads(json.dumps(fleet_to_json(fleet)))
    assert rows[0]["name"] == "box"
    assert rows[0]["capabilities"]["arch"] == "x86_64"
    assert rows[1]["capabilities"] is None
    assert rows[2]["declared"] is False
