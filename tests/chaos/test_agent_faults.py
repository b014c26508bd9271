"""Agent faults with real processes on loopback: a black-holed agent, short network
blips, an agent killed (SIGKILL) and one stopped (SIGTERM) in the middle of a task.

One farm for the module (see conftest): agent ``px`` dials through the test's proxy,
agent ``b`` directly; both run on this machine, so they share one device and measure
one task at a time between them. Every test checks the store's invariants
(:func:`~tests.chaos.harness.check_invariants`).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgefarm.domain import TaskStatus
from tests.chaos.conftest import DIRECT, PROXIED
from tests.chaos.harness import (
    FINISHED,
    HEARTBEAT_S,
    LEASE_S,
    ChaosFarm,
    StoreProbe,
    acks,
    check_invariants,
    first_task_on,
    noop_spec,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("healthy")]
pytest.importorskip("ray", reason="the coordinator extra is not installed")

# Longer than the lease; and longer than gRPC keepalive detection (ping every 10 s,
# 5 s to answer), so that both ends give the connection up and the agent dials anew.
PAST_LEASE_S = LEASE_S + 2.0
PAST_KEEPALIVE_S = 22.0
# The last renewal came at most a heartbeat before the agent fell silent (with margin).
EARLIEST_EXPIRY_S = LEASE_S - HEARTBEAT_S - 0.5
BLIP_S = 1.0  # under the lease (4 s), the silence limit (3 s) and keepalive detection


@pytest.mark.timeout(300)
@pytest.mark.parametrize("hold_s", [PAST_LEASE_S, PAST_KEEPALIVE_S], ids=["lease", "keepalive"])
def test_black_holed_agent_loses_its_task_then_works_again(
    farm: ChaosFarm, probe: StoreProbe, tmp_path: Path, hold_s: float
) -> None:
    ids = probe.agent_ids()
    proxy = farm.proxy(PROXIED)
    dialled = proxy.stats.connections
    spec = noop_spec(tmp_path, "blackhole", tasks=2, task_s=2.5)
    with first_task_on(farm, probe, spec, PROXIED, [DIRECT]) as (campaign_id, lost):
        proxy.black_hole()
        holed_at = time.monotonic()
    # px is silent; once its lease runs out the task goes to b (not back to px).
    wait_until(
        lambda: probe.task(lost.task_id).attempt >= 2 or probe.status(campaign_id) in FINISHED,
        40,
        "the black-holed agent's task to be leased again",
    )
    moved = probe.task(lost.task_id)
    assert moved.agent_id == ids[DIRECT], "the task went back to the silent agent"
    assert time.monotonic() - holed_at >= EARLIEST_EXPIRY_S, "re-leased before the lease ran out"
    time.sleep(max(0.0, holed_at + hold_s - time.monotonic()))
    registered = farm.registrations(PROXIED)
    proxy.passing()
    if hold_s > 15.0:  # keepalive ended the connection: px is back once it registered
        farm.wait_registered({PROXIED: registered})
    # px comes back and takes work again: a campaign only px may run.
    again = farm.submit(noop_spec(tmp_path, "blackhole-after", tasks=1, task_s=0.5, agent=PROXIED))
    probe.wait_finished(campaign_id, 90)
    probe.wait_finished(again, 90)
    outcome = check_invariants(farm, probe, campaign_id)
    row = outcome.row_for(lost.task_id)
    assert (row["agent_id"], row["attempt"]) == (ids[DIRECT], 2), row
    # px's late result (attempt 1) was refused, or never arrived; never accepted.
    late = [a for a in acks(farm.agent_log(PROXIED)) if a[0] == lost.task_id]
    assert all(verdict == "refused" for _, _, verdict in late), late
    after = check_invariants(farm, probe, again)
    ((task_row),) = after.rows
    assert (task_row["agent_id"], task_row["attempt"]) == (ids[PROXIED], 1), task_row
    if hold_s > 15.0:  # both ends gave the silent connection up: px dialled again
        assert proxy.stats.connections > dialled, proxy.stats
    first, second = outcome.attempts_for(lost.task_id)
    assert first.agent_id == ids[PROXIED] and first.outcome in {"lost", "refused"}, first
    assert second.agent_id == ids[DIRECT] and second.outcome == "result", second


@pytest.mark.timeout(240)
def test_short_blips_requeue_nothing_and_measure_each_task_once(
    farm: ChaosFarm, probe: StoreProbe, tmp_path: Path
) -> None:
    ids = probe.agent_ids()
    proxy = farm.proxy(PROXIED)
    dialled = proxy.stats.connections
    spec = noop_spec(tmp_path, "blips", tasks=3, task_s=2.0, agent=PROXIED)
    campaign_id = farm.submit(spec)
    blips = 0
    while probe.status(campaign_id) not in FINISHED and blips < 40:
        proxy.blip(BLIP_S, wait=True)
        blips += 1
        time.sleep(1.0)
    probe.wait_finished(campaign_id, 60)
    outcome = check_invariants(farm, probe, campaign_id)
    assert blips >= 3, f"only {blips} blips: the campaign was too quick"
    assert proxy.stats.connections == dialled, "a blip cost the agent its connection"
    for task in outcome.tasks:
        assert task.attempt == 1, f"{task.task_id} was re-queued ({task.attempt} attempts)"
        row = outcome.row_for(task.task_id)
        assert (row["agent_id"], row["attempt"]) == (ids[PROXIED], 1), row
    verdicts = [a for a in acks(farm.agent_log(PROXIED)) if a[0] in outcome.rows_by_task]
    assert sorted(verdicts) == sorted((t, 1, "accepted") for t in outcome.rows_by_task), verdicts
    assert [(a.attempt, a.outcome) for a in outcome.attempts] == [(1, "result")] * 3


@pytest.mark.timeout(240)
def test_agent_killed_mid_task_its_task_completes_elsewhere(
    farm: ChaosFarm, probe: StoreProbe, tmp_path: Path
) -> None:
    ids = probe.agent_ids()
    spec = noop_spec(tmp_path, "sigkill", tasks=2, task_s=2.5)
    with first_task_on(farm, probe, spec, PROXIED, [DIRECT]) as (campaign_id, lost):
        farm.kill_agent(PROXIED)
        killed_at = time.monotonic()
    wait_until(lambda: probe.task(lost.task_id).attempt >= 2, 40, "the task to be re-leased")
    assert time.monotonic() - killed_at >= EARLIEST_EXPIRY_S, "re-leased before the lease ran out"
    probe.wait_finished(campaign_id, 90)
    outcome = check_invariants(farm, probe, campaign_id)
    row = outcome.row_for(lost.task_id)
    assert (row["agent_id"], row["attempt"]) == (ids[DIRECT], 2), row
    first, second = outcome.attempts_for(lost.task_id)
    assert (first.agent_id, first.outcome) == (ids[PROXIED], "lost"), first
    assert (second.agent_id, second.outcome) == (ids[DIRECT], "result"), second


@pytest.mark.timeout(240)
def test_agent_terminated_mid_task_drains(
    farm: ChaosFarm, probe: StoreProbe, tmp_path: Path
) -> None:
    ids = probe.agent_ids()
    spec = noop_spec(tmp_path, "sigterm", tasks=2, task_s=4.0)
    with first_task_on(farm, probe, spec, PROXIED, [DIRECT]) as (campaign_id, held):
        farm.thaw_agent(DIRECT)  # b is heard from again before px stops: it takes the rest
        time.sleep(1.5 * HEARTBEAT_S)
        code = farm.term_agent(PROXIED, timeout_s=60)
    assert code == 0, f"the agent exited with {code} on SIGTERM"
    probe.wait_finished(campaign_id, 90)
    outcome = check_invariants(farm, probe, campaign_id)
    # The task in hand was finished and delivered before the agent exited: measured once.
    row = outcome.row_for(held.task_id)
    assert (row["agent_id"], row["attempt"]) == (ids[PROXIED], 1), row
    assert (held.task_id, 1, "accepted") in acks(farm.agent_log(PROXIED))
    # The other task was left to b.
    (other,) = [t for t in outcome.tasks if t.task_id != held.task_id]
    assert outcome.row_for(other.task_id)["agent_id"] == ids[DIRECT]
    (only,) = outcome.attempts_for(held.task_id)
    assert (only.agent_id, only.outcome) == (ids[PROXIED], "result"), only


@pytest.mark.timeout(120)
def test_silent_agent_gets_pending_work_once_heard_again(
    farm: ChaosFarm, probe: StoreProbe, tmp_path: Path
) -> None:
    """A task that only px may run waits while the device is busy; when the device
    frees up px is silent (black-holed), so the task stays queued. Once px is heard
    from again (same connection) it must get the task, not wait for an unrelated event."""
    ids = probe.agent_ids()
    proxy = farm.proxy(PROXIED)
    busy = farm.submit(noop_spec(tmp_path, "busy", tasks=1, task_s=6.0, agent=DIRECT))
    probe.wait_measuring(DIRECT, probe.wait_assigned(busy, DIRECT))
    waiting = farm.submit(noop_spec(tmp_path, "waiting", tasks=1, task_s=0.5, agent=PROXIED))
    proxy.black_hole()
    probe.wait_finished(busy, 60)  # the device is free; px has been silent for a while
    (task,) = probe.tasks(waiting)
    assert task.status == TaskStatus.PENDING, "px was not silent yet when the device freed"
    time.sleep(1.0)
    proxy.passing()  # px's heartbeats flow again, on the same connection
    probe.wait_finished(waiting, 30)
    outcome = check_invariants(farm, probe, waiting)
    ((row),) = outcome.rows
    assert (row["agent_id"], row["attempt"]) == (ids[PROXIED], 1), row


@pytest.mark.timeout(120)
def test_connection_reset_mid_task_keeps_the_lease(
    farm: ChaosFarm, probe: StoreProbe, tmp_path: Path
) -> None:
    """Both ends see the connection reset while px measures: px dials again at once,
    keeps its lease and delivers; nothing is re-queued or measured twice."""
    ids = probe.agent_ids()
    proxy = farm.proxy(PROXIED)
    dialled = proxy.stats.connections
    spec = noop_spec(tmp_path, "reset", tasks=2, task_s=3.0, agent=PROXIED)
    campaign_id = farm.submit(spec)
    first = probe.wait_assigned(campaign_id, PROXIED)
    probe.wait_measuring(PROXIED, first)
    proxy.reset()
    wait_until(lambda: proxy.stats.connections > dialled, 30, "px to dial again")
    probe.wait_finished(campaign_id, 60)
    outcome = check_invariants(farm, probe, campaign_id)
    for task in outcome.tasks:
        assert task.attempt == 1, f"{task.task_id} was re-queued ({task.attempt} attempts)"
        assert outcome.row_for(task.task_id)["agent_id"] == ids[PROXIED]
    assert [(a.attempt, a.outcome) for a in outcome.attempts] == [(1, "result")] * 2
