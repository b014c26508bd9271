"""The chaos tests' farm: a real coordinator and real agents on loopback (the local farm's
processes), some agents dialling through a :class:`~tests.chaos.proxy.ChaosProxy`;
campaigns of no-op tasks whose duration the test sets; and the invariants every test
checks, read from the SQLite store directly.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.localfarm import LocalFarm
from coordinator.uploads import upload_spec_files
from edgefarm.domain import CampaignStatus, TaskStatus
from edgefarm.transport import ClientTls
from results.records import AttemptRecord, TaskRecord
from results.store import ResultsStore
from tests.chaos.proxy import ChaosProxy
from tests.integration.conftest import wait_until

# Short liveness settings: a silent agent is noticed within seconds.
LEASE_S = 4.0
HEARTBEAT_S = 1.0
FINISHED = {CampaignStatus.DONE, CampaignStatus.FAILED}


@dataclass
class ChaosFarm(LocalFarm):
    """A :class:`LocalFarm` whose agents named in :attr:`proxies` dial through a proxy."""

    proxies: dict[str, ChaosProxy] = field(default_factory=dict)
    frozen: set[str] = field(default_factory=set)

    def start_agent(
        self, name: str, labels: dict[str, str] | None = None, tls: ClientTls | None = None
    ) -> None:
        """Start agent ``name`` (labelled ``agent=NAME``, for selectors that pick it);
        through its proxy if :meth:`proxy` made one for it."""
        super().start_agent(name, {"agent": name, **(labels or {})}, tls)

    def proxy(self, name: str) -> ChaosProxy:
        """The proxy agent ``name`` dials (made and started on first use)."""
        if name not in self.proxies:
            proxy = ChaosProxy(self.address)
            proxy.start()
            self.proxies[name] = proxy
        return self.proxies[name]

    def _agent_cmd(self, mode: str, name: str, tls: ClientTls | None = None) -> list[str]:
        cmd = super()._agent_cmd(mode, name, tls)
        proxy = self.proxies.get(name)
        if proxy is not None:
            cmd[cmd.index("--coordinator") + 1] = proxy.address
        return cmd

    def stop(self) -> None:
        """Stop the processes, then the proxies."""
        for name in list(self.frozen):
            self.thaw_agent(name)
        super().stop()
        for proxy in self.proxies.values():
            proxy.stop()
        self.proxies.clear()

    # ----- faults -----------------------------------------------------------------

    def term_agent(self, name: str, timeout_s: float = 60.0) -> int:
        """SIGTERM agent ``name`` and wait for it to exit; returns its exit status."""
        proc = self.agent_procs.pop(name)
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise

    def freeze_agent(self, name: str) -> None:
        """SIGSTOP agent ``name``: it stays connected but says nothing (its measuring
        child, if any, runs on)."""
        self.agent_procs[name].send_signal(signal.SIGSTOP)
        self.frozen.add(name)

    def thaw_agent(self, name: str) -> None:
        """SIGCONT agent ``name``."""
        self.frozen.discard(name)
        proc = self.agent_procs.get(name)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)

    def restart_coordinator(self) -> float:
        """Start the coordinator again (same port, same store) and wait until every
        running agent has registered with it; returns seconds taken."""
        started = time.monotonic()
        before = {name: self.registrations(name) for name in self.running_agents()}
        self.start_coordinator()
        self.wait_registered(before)
        return time.monotonic() - started

    def running_agents(self) -> list[str]:
        """The agents whose process runs (frozen ones included)."""
        return [name for name, proc in self.agent_procs.items() if proc.poll() is None]

    def registrations(self, name: str) -> int:
        """How many times agent ``name`` has registered so far (from its log)."""
        return self.agent_log(name).count("registered with ")

    def wait_registered(self, before: dict[str, int], timeout_s: float = 90.0) -> None:
        """Wait until each agent in ``before`` registered more often than that count
        (and its stream had a moment to bind)."""
        wait_until(
            lambda: all(self.registrations(name) > n for name, n in before.items()),
            timeout_s,
            f"{', '.join(before)} to register",
        )
        time.sleep(0.5)

    def heal(self, names: list[str]) -> None:
        """Back to a healthy farm: agents thawed, proxies passing, the coordinator and
        agents ``names`` running and online."""
        for name in list(self.frozen):
            self.thaw_agent(name)
        for proxy in self.proxies.values():
            proxy.passing()
        if self.coordinator_proc is None or self.coordinator_proc.poll() is not None:
            self.coordinator_proc = None
            self.restart_coordinator()
        self.ensure_agents(names)

    def ensure_agents(self, names: list[str], timeout_s: float = 90.0) -> None:
        """(Re)start whichever of ``names`` is not running; wait until each has
        registered (the store's device list counts an agent online as soon as another
        agent of its device is)."""
        before: dict[str, int] = {}
        for name in names:
            proc = self.agent_procs.get(name)
            if proc is None or proc.poll() is not None:
                self.agent_procs.pop(name, None)
                before[name] = self.registrations(name)
                self.start_agent(name)
        if before:
            self.wait_registered(before, timeout_s)
        self.wait_for_agents(len(names), timeout_s)

    # ----- what happened ------------------------------------------------------------

    @property
    def store_path(self) -> Path:
        """The SQLite file of the farm's store."""
        assert self.store_url.startswith("sqlite:///")
        return Path(self.store_url.removeprefix("sqlite:///"))

    def agent_log(self, name: str) -> str:
        """Everything agent ``name`` logged so far (all its runs)."""
        path = self.log_dir / f"agent-{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def coordinator_log(self) -> str:
        """Everything the coordinator logged so far (all its runs)."""
        path = self.log_dir / "coordinator.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def submit(self, spec: Path, submission_id: str = "") -> str:
        """Upload the spec's files and submit it afresh (no reuse); returns the campaign
        id once its variants are prepared and its tasks queued. A ``submission_id``
        given again attaches to the campaign it created."""
        with self.client() as client:
            text = spec.read_text()
            files = upload_spec_files(client, spec, text)
            reply = client.submit(
                text,
                str(spec),
                fresh=True,
                files=files,
                timeout_s=300,
                submission_id=submission_id,
            )
        return str(reply.campaign_id)


def noop_spec(
    folder: Path,
    name: str,
    tasks: int,
    task_s: float = 2.0,
    agent: str | None = None,
) -> Path:
    """A campaign of ``tasks`` no-op tasks (one model each), each taking about ``task_s``
    seconds to measure (the no-op backend sleeps while it "loads"), one trial; only
    agent ``agent`` may run them when given (all agents of the farm share one device)."""
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / f"{name}.bin"
    model.write_bytes(uuid.uuid4().bytes * 64)  # a new artifact: nothing to reuse
    models = "".join(f"  - name: {name}-m{i}\n    source: file:{model}\n" for i in range(tasks))
    devices = f"devices:\n  - selector: {{agent: {agent}}}\n" if agent else ""
    path = folder / f"{name}.yaml"
    path.write_text(
        f"name: {name}\n"
        f"models:\n{models}"
        f"{devices}"
        "backends:\n"
        "  - name: noop\n"
        "    schemes: [none]\n"
        f'    options: {{noop_sleep_s: "{task_s:g}"}}\n'
        "measurement:\n"
        "  warmup_iterations: 1\n"
        "  min_iterations: 1\n"
        "  min_duration_s: 0.01\n"
        "  trials: 1\n"
        "  threads: 1\n"
        "  timeout_s: 60\n"
    )
    return path


class StoreProbe:
    """Reads the farm's store beside the coordinator (SQLite in WAL mode)."""

    def __init__(self, farm: ChaosFarm) -> None:
        self.farm = farm
        self.store = ResultsStore.open(farm.store_url)

    def close(self) -> None:
        """Release the store."""
        self.store.close()

    def tasks(self, campaign_id: str) -> list[TaskRecord]:
        """The campaign's tasks in creation order."""
        return self.store.tasks_for_campaign(campaign_id)

    def task(self, task_id: str) -> TaskRecord:
        """One task as stored now."""
        found = self.store.get_task(task_id)
        assert found is not None, task_id
        return found

    def agent_ids(self) -> dict[str, str]:
        """Agent name -> agent id, for every agent the store has seen."""
        return {d.agent_name: d.agent_id for d in self.store.list_devices_seen()}

    def status(self, campaign_id: str) -> str:
        """The campaign's status ('' before it exists)."""
        found = self.store.get_campaign(campaign_id)
        return "" if found is None else str(found.status)

    def wait_finished(self, campaign_id: str, timeout_s: float = 120.0) -> None:
        """Wait until the campaign is done or failed."""
        wait_until(
            lambda: self.status(campaign_id) in FINISHED, timeout_s, f"campaign {campaign_id}"
        )

    def assigned(self, campaign_id: str, agent: str | None = None) -> TaskRecord | None:
        """The campaign's task assigned now (to agent name ``agent``, if given)."""
        agent_id = self.agent_ids().get(agent or "") if agent else None
        for task in self.tasks(campaign_id):
            if task.status == TaskStatus.ASSIGNED and (agent is None or task.agent_id == agent_id):
                return task
        return None

    def wait_assigned(
        self, campaign_id: str, agent: str | None = None, timeout_s: float = 60.0
    ) -> TaskRecord:
        """Wait until a task of the campaign is assigned (to ``agent``); returns it."""
        found: list[TaskRecord] = []

        def check() -> bool:
            task = self.assigned(campaign_id, agent)
            if task is not None:
                found.append(task)
            return task is not None

        wait_until(check, timeout_s, f"a task of {campaign_id} assigned to {agent or 'anyone'}")
        return found[-1]

    def wait_measuring(self, name: str, task: TaskRecord, timeout_s: float = 60.0) -> None:
        """Wait until agent ``name`` logged receiving ``task`` (attempt as stored), and
        a little more so that its measuring child runs."""
        line = f"assigned {task.task_id} "
        wait_until(lambda: line in self.farm.agent_log(name), timeout_s, f"{name} to get {line}")
        time.sleep(0.5)

    def result_rows(self, campaign_id: str) -> list[dict[str, Any]]:
        """Raw rows of the results table measured by the campaign (every attempt)."""
        with closing_sqlite(self.farm.store_path) as db:
            db.row_factory = sqlite3.Row
            rows = db.execute(
                "SELECT result_id, task_id, attempt, agent_id, ok, error_kind "
                "FROM results WHERE campaign_id = ? ORDER BY result_id",
                (campaign_id,),
            ).fetchall()
        return [dict(r) for r in rows]

    def attempts(self, campaign_id: str) -> list[AttemptRecord]:
        """The campaign's attempt rows, by task and attempt."""
        return self.store.attempts_for_campaign(campaign_id)


class closing_sqlite:
    """A read-only sqlite3 connection as a context manager (closed on exit)."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)

    def __enter__(self) -> sqlite3.Connection:
        return self.db

    def __exit__(self, *exc: object) -> None:
        self.db.close()


@dataclass
class Outcome:
    """A finished campaign as the store has it."""

    campaign_id: str
    tasks: list[TaskRecord]
    rows: list[dict[str, Any]]  # results rows measured by the campaign
    attempts: list[AttemptRecord]

    @property
    def rows_by_task(self) -> dict[str, dict[str, Any]]:
        """Task id -> its one result row."""
        return {r["task_id"]: r for r in self.rows}

    def row_for(self, task_id: str) -> dict[str, Any]:
        """The one result row of ``task_id``."""
        (row,) = [r for r in self.rows if r["task_id"] == task_id]
        return row

    def attempts_for(self, task_id: str) -> list[AttemptRecord]:
        """The attempt rows of ``task_id``."""
        return [a for a in self.attempts if a.task_id == task_id]


# How an agent logs an acknowledgement (agent/client.py).
ACK_LINE = re.compile(
    r"result of (t-[0-9a-f]+) \(attempt (\d+)\) acknowledged: (accepted|stored already|refused)"
)


def acks(log: str) -> list[tuple[str, int, str]]:
    """``(task_id, attempt, verdict)`` of every acknowledgement in an agent's log."""
    return [(m.group(1), int(m.group(2)), m.group(3)) for m in ACK_LINE.finditer(log)]


def outcome_agent(rows: list[dict[str, Any]], task_id: str) -> str:
    """The agent whose result row answers ``task_id``."""
    return str(next(r["agent_id"] for r in rows if r["task_id"] == task_id))


def agent_names(farm: ChaosFarm) -> list[str]:
    """Every agent that has a log in the farm's home."""
    return sorted(
        p.name.removeprefix("agent-").removesuffix(".log") for p in farm.log_dir.glob("agent-*.log")
    )


def check_invariants(farm: ChaosFarm, probe: StoreProbe, campaign_id: str) -> Outcome:
    """The promises every chaos test checks; returns what the store holds.

    - the SQLite file passes ``PRAGMA integrity_check``;
    - the campaign is done and every task finished ok;
    - exactly one result row per task, the one the task points at, of its last attempt;
    - every result an agent logged as acknowledged (accepted or stored) is in the store;
    - attempt rows: numbered 1..n per task, the last one ended with
      outcome ``result``, every earlier one ended (not ``running`` or ``result``).
    """
    with closing_sqlite(farm.store_path) as db:
        (check,) = db.execute("PRAGMA integrity_check").fetchone()
    assert check == "ok", f"integrity_check: {check}"
    campaign = probe.store.get_campaign(campaign_id)
    assert campaign is not None
    tasks = probe.tasks(campaign_id)
    rows = probe.result_rows(campaign_id)
    statuses = {t.task_id: str(t.status) for t in tasks}
    assert campaign.status == CampaignStatus.DONE, (campaign.status, statuses, rows)
    assert all(t.status == TaskStatus.DONE for t in tasks), statuses
    per_task: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        per_task.setdefault(row["task_id"], []).append(row)
    for task in tasks:
        found = per_task.get(task.task_id, [])
        assert len(found) == 1, f"task {task.task_id}: {len(found)} result rows: {found}"
        (row,) = found
        assert row["result_id"] == task.result_id, (row, task)
        assert row["attempt"] == task.attempt, (row, task)
        assert row["ok"], row
    assert set(per_task) == {t.task_id for t in tasks}, "result rows of unknown tasks"
    # No acknowledged result lost: whatever an agent was told was stored is stored.
    stored = {(r["task_id"], r["attempt"]) for r in rows}
    for name in agent_names(farm):
        for task_id, attempt, verdict in acks(farm.agent_log(name)):
            if task_id in statuses and verdict != "refused":
                assert (task_id, attempt) in stored, (
                    f"{name} was told its result of {task_id} (attempt {attempt}) was "
                    f"{verdict}; the store has {sorted(stored)}"
                )
    attempts = probe.attempts(campaign_id)
    for task in tasks:
        mine = [a for a in attempts if a.task_id == task.task_id]
        assert [a.attempt for a in mine] == list(range(1, len(mine) + 1)), mine
        assert mine and mine[-1].outcome == "result", mine
        assert mine[-1].attempt == task.attempt, (mine, task)
        assert mine[-1].agent_id == outcome_agent(rows, task.task_id), mine
        for earlier in mine[:-1]:
            assert earlier.outcome not in {"running", "result"}, mine
            assert earlier.ended_at is not None, mine
    return Outcome(campaign_id, tasks, rows, attempts)


# An agent not heard from for this long gets no work (SILENT_AFTER_HEARTBEATS beats).
SILENT_S = 3 * HEARTBEAT_S + 0.7


@contextmanager
def first_task_on(
    farm: ChaosFarm, probe: StoreProbe, spec: Path, agent: str, others: list[str]
) -> Iterator[tuple[str, TaskRecord]]:
    """Submit ``spec`` so that ``agent`` takes its first task: the ``others`` are frozen
    (silent, so given no work) until ``agent`` is measuring it; yields ``(campaign id,
    that task)`` with the others still frozen, and thaws them on exit."""
    for name in others:
        farm.freeze_agent(name)
    try:
        time.sleep(SILENT_S)
        campaign_id = farm.submit(spec)
        task = probe.wait_assigned(campaign_id, agent, timeout_s=30)
        probe.wait_measuring(agent, task)
        yield campaign_id, task
    finally:
        for name in others:
            farm.thaw_agent(name)
