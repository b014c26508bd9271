"""Coordinator faults with real processes on loopback: SIGKILL during preparation, early
in measurement and near the end, and a crash loop; each time the coordinator is
started again on the same store and port, and the campaign must complete with one
result per task. Agents reconnect on their own (``px`` through the test's proxy).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from edgefarm.domain import CampaignStatus, TaskStatus
from edgefarm.errors import EdgefarmError
from results.records import TaskRecord
from tests.chaos.harness import (
    ChaosFarm,
    StoreProbe,
    acks,
    check_invariants,
    noop_spec,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("healthy")]
pytest.importorskip("ray", reason="the coordinator extra is not installed")
pytest.importorskip("onnxruntime", reason="the onnxruntime extra is not installed")

TASK_S = 2.5


def names_by_id(probe: StoreProbe) -> dict[str, str]:
    return {agent_id: name for name, agent_id in probe.agent_ids().items()}


def kill_while_measuring(
    farm: ChaosFarm,
    probe: StoreProbe,
    campaign_id: str,
    done_before: int,
    not_these: frozenset[str] = frozenset(),
) -> tuple[str, str]:
    """Wait until ``done_before`` tasks are done and another (not one of ``not_these``)
    is being measured, then SIGKILL the coordinator; returns ``(task id, agent name)``
    of the task in flight."""
    found: list[TaskRecord] = []

    def in_flight() -> bool:
        if probe.store.campaign_counts(campaign_id).get(TaskStatus.DONE, 0) < done_before:
            return False
        found[:] = [
            t
            for t in probe.tasks(campaign_id)
            if t.status == TaskStatus.ASSIGNED and t.task_id not in not_these
        ]
        return bool(found)

    wait_until(in_flight, 90, f"{done_before} task(s) done and one more in flight")
    task = found[0]
    assert task.agent_id is not None
    holder = names_by_id(probe)[task.agent_id]
    probe.wait_measuring(holder, task)
    farm.kill_coordinator()
    return task.task_id, holder


@pytest.mark.timeout(300)
@pytest.mark.parametrize("done_before", [0, 2], ids=["early", "near-end"])
def test_coordinator_killed_while_measuring_resumes(
    farm: ChaosFarm, probe: StoreProbe, tmp_path: Path, done_before: int
) -> None:
    spec = noop_spec(tmp_path, f"kill-{done_before}", tasks=3, task_s=TASK_S)
    campaign_id = farm.submit(spec)
    in_flight, holder = kill_while_measuring(farm, probe, campaign_id, done_before)
    time.sleep(TASK_S)  # the task in flight is finished while the coordinator is down
    farm.restart_coordinator()
    probe.wait_finished(campaign_id, 120)
    outcome = check_invariants(farm, probe, campaign_id)
    # The agent kept its finished result and delivered it after reconnecting: the task
    # was measured once, by the agent that held it, under its first lease.
    row = outcome.row_for(in_flight)
    assert (names_by_id(probe)[row["agent_id"]], row["attempt"]) == (holder, 1), row
    assert (in_flight, 1, "accepted") in acks(farm.agent_log(holder))
    for task in outcome.tasks:
        assert task.attempt == 1, f"{task.task_id} measured {task.attempt} times"
    assert [a.outcome for a in outcome.attempts_for(in_flight)] == ["result"]


@pytest.mark.timeout(300)
def test_coordinator_crash_loop(farm: ChaosFarm, probe: StoreProbe, tmp_path: Path) -> None:
    # Each restart is killed again as soon as its first new task is being measured,
    # without waiting for the slower agent to reconnect (its backoff may reach 30 s,
    # long enough for the other one to run the whole campaign meanwhile); a result
    # held across several outages is delivered whenever its agent is back.
    spec = noop_spec(tmp_path, "crash-loop", tasks=8, task_s=2.0)
    campaign_id = farm.submit(spec)
    delivered: list[tuple[str, str]] = []
    for crash in range(3):
        held = frozenset(task_id for task_id, _ in delivered)
        delivered.append(kill_while_measuring(farm, probe, campaign_id, crash, held))
        farm.start_coordinator()
    probe.wait_finished(campaign_id, 120)
    outcome = check_invariants(farm, probe, campaign_id)
    for task_id, holder in delivered:  # finished during an outage, delivered after it
        row = outcome.row_for(task_id)
        assert names_by_id(probe)[row["agent_id"]] == holder, (task_id, row)
        assert (task_id, 1, "accepted") in acks(farm.agent_log(holder))
    for task in outcome.tasks:  # three restarts, and still each task measured once
        assert task.attempt == 1, f"{task.task_id} measured {task.attempt} times"
        assert [a.outcome for a in outcome.attempts_for(task.task_id)] == ["result"]


@pytest.mark.timeout(300)
def test_coordinator_killed_while_preparing_resumes(
    farm: ChaosFarm, probe: StoreProbe, tmp_path: Path
) -> None:
    # Real conversions on Ray (train the built-in model, quantize it twice): slow enough
    # to be caught in the middle.
    spec = tmp_path / "kill-preparing.yaml"
    spec.write_text(
        "name: kill-preparing\n"
        "models:\n"
        "  - name: digits-mlp\n"
        "    source: builtin:digits-mlp\n"
        "backends:\n"
        "  - name: onnxruntime\n"
        "    schemes: [fp32, int8-dynamic, int8-static]\n"
        "measurement: {warmup_iterations: 1, min_iterations: 5, min_duration_s: 0.05, "
        "trials: 1, threads: 1, timeout_s: 60}\n"
    )
    submission = uuid.uuid4().hex
    failures: list[BaseException] = []

    def submit() -> None:
        try:
            farm.submit(spec, submission_id=submission)
        except EdgefarmError as error:  # the coordinator died under it
            failures.append(error)

    client = threading.Thread(target=submit, daemon=True)
    client.start()

    def recorded() -> bool:
        found = probe.store.campaign_for_submission(submission)
        return found is not None or not client.is_alive()

    wait_until(recorded, 120, "the submission to be recorded")
    record = probe.store.campaign_for_submission(submission)
    assert record is not None, "preparation finished and no campaign was recorded before it"
    assert record.status == CampaignStatus.PREPARING, (
        f"the campaign is {record.status} already: preparation was too quick to interrupt"
    )
    farm.kill_coordinator()
    client.join(timeout=60)
    assert failures, "the submission survived the coordinator's death"
    farm.restart_coordinator()
    # As `campaign run` does after a restart: the same submission attaches to its campaign.
    campaign_id = farm.submit(spec, submission_id=submission)
    assert campaign_id == record.campaign_id
    probe.wait_finished(campaign_id, 180)
    check_invariants(farm, probe, campaign_id)
    same_name = [c for c in probe.store.list_campaigns(500) if c.name == "kill-preparing"]
    assert len(same_name) == 1, "the submission made a second campaign"


@pytest.mark.timeout(300)
def test_campaign_run_and_watch_reattach_after_a_restart(
    farm: ChaosFarm, probe: StoreProbe, tmp_path: Path
) -> None:
    """The real CLI: `campaign run` and `campaign watch` outlive a coordinator SIGKILL
    and restart, and the campaign is submitted once."""
    spec = noop_spec(tmp_path, "reattach", tasks=3, task_s=TASK_S)
    cli = [sys.executable, "-m", "edgefarm.cli.main", "campaign"]
    target = ["--coordinator", farm.address, "--token", farm.token, "--reattach-timeout", "120"]
    run = subprocess.Popen(
        [*cli, "run", str(spec), *target, "--fresh"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def started() -> bool:
            return any(c.name == "reattach" for c in probe.store.list_campaigns(limit=5))

        wait_until(started, 120, "the campaign to be submitted")
        (campaign_id,) = [
            c.campaign_id for c in probe.store.list_campaigns(limit=5) if c.name == "reattach"
        ]
        wait_until(lambda: probe.assigned(campaign_id) is not None, 90, "a task in flight")
        watch = subprocess.Popen(
            [*cli, "watch", campaign_id, *target],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(1.0)  # the watch is attached
        farm.kill_coordinator()
        farm.restart_coordinator()
        run_out, _ = run.communicate(timeout=200)
        watch_out, _ = watch.communicate(timeout=60)
    finally:
        for proc in (run, locals().get("watch")):
            if isinstance(proc, subprocess.Popen) and proc.poll() is None:
                proc.kill()
    assert run.returncode == 0, run_out
    assert "re-attached to campaign" in run_out and "Traceback" not in run_out, run_out
    assert watch.returncode == 0, watch_out
    assert "re-attached to campaign" in watch_out and campaign_id in watch_out, watch_out
    assert [c.name for c in probe.store.list_campaigns(limit=50)].count("reattach") == 1
    check_invariants(farm, probe, campaign_id)
