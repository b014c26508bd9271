"""Chaos fixtures: one farm per test module (a coordinator with short liveness settings,
agent ``px`` dialling through a proxy, agent ``b`` directly), healed before each test of
the modules that use ``healthy``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.chaos.harness import HEARTBEAT_S, LEASE_S, ChaosFarm, StoreProbe

PROXIED = "px"
DIRECT = "b"
AGENTS = [PROXIED, DIRECT]


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosFarm]:
    """The module's farm: coordinator, ``px`` (through its proxy), then ``b``."""
    root = tmp_path_factory.mktemp("chaos")
    farm = ChaosFarm(
        home=root / "home",
        store_url=f"sqlite:///{root / 'r.sqlite'}",
        agents=0,
        lease_s=LEASE_S,
        heartbeat_s=HEARTBEAT_S,
    )
    try:
        farm.start_coordinator()
        farm.proxy(PROXIED)
        farm.ensure_agents(AGENTS)
        yield farm
    finally:
        farm.stop()


@pytest.fixture(scope="module")
def probe(farm: ChaosFarm) -> Iterator[StoreProbe]:
    """The farm's store, read beside the coordinator."""
    found = StoreProbe(farm)
    yield found
    found.close()


@pytest.fixture
def healthy(farm: ChaosFarm) -> None:
    """A healthy farm, whatever the test before did (farm modules use it for each test)."""
    farm.heal(AGENTS)
