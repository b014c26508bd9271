"""`devices list` from memory: the fleet view kept by registrations, enrolments and
revocations, filtered by state and selector, a page at a time; no store read."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from coordinator.control import ControlService
from coordinator.fleet_view import FleetView
from coordinator.scheduler import Scheduler
from protos.edgefarm.v1 import control_pb2
from results.records import DeviceSeen
from results.store import ResultsStore
from tests.unit.scheduler_doubles import Clock, caps


class Aborted(Exception):
    pass


class Context:
    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(f"{code.name}: {details}")


class NoReads:
    """A store that fails the test if a device list reads it."""

    def __init__(self, store: ResultsStore) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        if name in ("list_devices_seen", "agent_identities"):
            raise AssertionError(f"devices list read the store ({name})")
        return getattr(self._store, name)


@pytest.fixture
def service(tmp_path: Path) -> tuple[ControlService, Scheduler, Clock]:
    store = ResultsStore.open(f"sqlite:///{tmp_path / 'r.sqlite'}")
    clock = Clock(now=1_000_000.0)
    sched = Scheduler(NoReads(store), clock=clock)  # type: ignore[arg-type]
    planner = SimpleNamespace(scheduler=sched, preparer=SimpleNamespace(artifacts=None))
    svc = ControlService(planner, "tok", None, missing_after_s=6.0)  # type: ignore[arg-type]
    return svc, sched, clock


def ask(svc: ControlService, **fields: Any) -> control_pb2.ListDevicesResponse:
    request = control_pb2.ListDevicesRequest(token="tok", **fields)
    return asyncio.run(svc.ListDevices(request, Context()))  # type: ignore[arg-type]


def test_pages_filters_and_live_state(service: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    svc, sched, clock = service
    monkeypatch.setattr("coordinator.control.time.time", clock)
    for i in range(25):
        arch = "arm64" if i % 5 == 0 else "x86_64"
        session = sched.register(f"a{i:02d}", f"dev{i:02d}", {"rack": "r1"}, caps(f"d{i:02d}"))
        session.capabilities.arch = arch
        sched.fleet.saw(
            DeviceSeen(f"old{i}", "old", f"gone{i}", {"device_name": f"gone{i}"}, {}, 0.0, 1.0)
        )
        if i < 20:
            sched.connect(session)
    # agents last heard from long ago are forgotten by the view
    sched.fleet.forget_after_s = 3600.0
    first = ask(svc, page_size=10)
    assert first.total == 25 and len(first.devices) == 10 and first.next_page_token == "10"
    names = [d.name for d in first.devices]
    rest = ask(svc, page_size=10, page_token=first.next_page_token)
    last = ask(svc, page_size=10, page_token=rest.next_page_token)
    assert last.next_page_token == "" and len(last.devices) == 5
    every = names + [d.name for d in rest.devices] + [d.name for d in last.devices]
    assert every == [f"dev{i:02d}" for i in range(25)] and len(sched.fleet) == 25
    assert ask(svc, state="online").total == 20
    assert ask(svc, state="missing").total == 5  # registered, never connected
    arm = ask(svc, selector="arch=arm64")
    assert [d.name for d in arm.devices] == ["dev00", "dev05", "dev10", "dev15", "dev20"]
    assert ask(svc, selector="arch=arm64,label.rack=r2").total == 0
    sched.revoke(sched.sessions[next(iter(sched.sessions))].agent_id)
    assert "revoked" in ask(svc, page_size=1).devices[0].enrolment.values()


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"state": "asleep"}, "state 'asleep': use one of online, busy, missing, never_seen"),
        ({"selector": "arch"}, "selector:"),
        ({"page_token": "abc"}, "page_token 'abc' is not one this coordinator gave"),
        ({"page_size": 5001}, "page_size 5001 is over 5000"),
    ],
)
def test_bad_requests_are_one_line(service: Any, fields: dict[str, Any], expected: str) -> None:
    svc, _, _ = service
    with pytest.raises(Aborted, match=f"^INVALID_ARGUMENT: {expected}"):
        ask(svc, **fields)


def test_the_view_loads_from_the_store_records() -> None:
    view = FleetView(forget_after_s=100.0)
    seen = DeviceSeen("ag-1", "a", "dev", {"device_name": "bench", "arch": "arm64"}, {}, 0.0, 50.0)
    view.load([seen], [])
    (agent,) = view.agents({}, now=120.0)
    assert (agent.device_name, agent.capabilities.arch, agent.online) == ("bench", "arm64", False)
    assert view.agents({}, now=151.0) == [] and len(view) == 0  # unseen too long: dropped


def test_the_cli_filters_the_store_fleet_and_says_when_nothing_matches(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgefarm.cli.main import cli

    url = f"sqlite:///{tmp_path / 'r.sqlite'}"
    with ResultsStore.open(url) as store:
        store.upsert_device_seen(
            DeviceSeen("ag-1", "a", "d1", {"device_name": "pi", "arch": "arm64"}, {}, 1.0, 1.0)
        )
    run = CliRunner().invoke
    listed = run(cli, ["devices", "list", "--store", url, "--selector", "arch=arm64"])
    assert listed.exit_code == 0 and "pi" in listed.output and "missing" in listed.output
    none = run(cli, ["devices", "list", "--store", url, "--state", "online"])
    assert none.exit_code == 0 and none.output.strip() == (
        "no devices online (of those declared or seen)"
    )
    bad = run(cli, ["devices", "list", "--store", url, "--selector", "=x"])
    assert bad.exit_code != 0 and "--selector: bad selector item '=x'" in str(bad.exception)


@pytest.mark.parametrize("rate", ["5", "0/5", "a/b", "inf/1"])
def test_a_bad_register_rate_is_refused_before_the_coordinator_starts(rate: str) -> None:
    from click.testing import CliRunner

    from edgefarm.cli.main import cli

    result = CliRunner().invoke(cli, ["coordinator", "serve", "--register-rate", rate])
    assert result.exit_code != 0
    assert f"--register-rate {rate!r}: give BURST/PER_S, e.g. 60/5" in str(result.exception)
