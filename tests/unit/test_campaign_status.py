"""`edgefarm campaign status`: per-task attempts and the ETA of a running campaign."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from edgefarm.cli.main import cli
from edgefarm.domain import CampaignStatus, TaskStatus
from results.progress import Eta, describe_eta, estimate_eta, format_duration
from results.records import AttemptRecord, DeviceSeen
from results.store import ResultsStore
from tests.unit.test_store import make_campaign, make_task


def ended(task_id: str, n: int, start: float, end: float, outcome: str = "result") -> AttemptRecord:
    return AttemptRecord(task_id, n, f"lease-{n}", "agent-1", start, end, outcome)


def test_eta_is_the_median_times_remaining_tasks_per_device() -> None:
    tasks = [
        make_task("a", status=TaskStatus.DONE),
        make_task("b", status=TaskStatus.FAILED),
        make_task("c", status=TaskStatus.ASSIGNED, device_id="d1"),
        make_task("d", status=TaskStatus.PENDING, device_id="d1"),
        make_task("e", status=TaskStatus.PENDING, device_id="d2"),
        make_task("f", status=TaskStatus.PENDING, device_id="d2"),
        make_task("g", status=TaskStatus.REUSED, device_id="d3"),
    ]
    attempts = [
        ended("a", 1, 100.0, 110.0),
        ended("a", 2, 100.0, 400.0, "lost"),  # not a measured duration
        ended("b", 1, 100.0, 130.0, "failed"),
        ended("b", 2, 100.0, 120.0),
        AttemptRecord("c", 1, "l", "agent-1", 200.0),  # running
        ended("d", 1, 0.0, 120.0),  # start unknown
    ]
    eta = estimate_eta(tasks, attempts)
    assert eta == Eta(seconds=40.0, median_task_s=20.0, measured=3, remaining=4, devices=2)
    assert describe_eta(eta) == (
        "ETA 40.0s (4 tasks left on 2 devices, median task 20.0s over 3 measured)"
    )


def test_eta_unknown_before_any_measurement_and_zero_when_done() -> None:
    tasks = [make_task("a", status=TaskStatus.PENDING)]
    assert estimate_eta(tasks, [AttemptRecord("a", 1, "l", "x", 5.0)]) is None
    assert describe_eta(None).startswith("ETA unknown")
    done = estimate_eta([make_task("a", status=TaskStatus.DONE)], [ended("a", 1, 1.0, 3.0)])
    assert done == Eta(0.0, 2.0, 1, 0, 0)
    assert describe_eta(done) == "ETA: no task left"


def test_format_duration() -> None:
    assert [format_duration(s) for s in (None, 3.04, 65.0, 3725.0)] == [
        "-",
        "3.0s",
        "1m 05s",
        "1h 02m",
    ]


def fill_store(url: str, status: CampaignStatus) -> None:
    with ResultsStore.open(url) as store:
        campaign = make_campaign("c0ffee00-1111")
        campaign.status = status
        store.create_campaign(
            campaign,
            [
                make_task("task-aaaa-1", "c0ffee00-1111", created_at=1.0),
                make_task("task-bbbb-2", "c0ffee00-1111", created_at=2.0, model="resnet"),
                make_task("task-cccc-3", "c0ffee00-1111", created_at=3.0),
            ],
        )
        store.upsert_device_seen(DeviceSeen("agent-1", "pi-one", "dev-pi5", {}, {}, 1.0, 1.0))
        store.upsert_device_seen(DeviceSeen("agent-2", "pi-two", "dev-pi5", {}, {}, 1.0, 1.0))
        store.start_attempt(AttemptRecord("task-aaaa-1", 1, "l1", "agent-1", 1000.0))
        store.end_attempt("task-aaaa-1", 1, 1030.0, "lost", "lease expired")
        store.start_attempt(AttemptRecord("task-aaaa-1", 2, "l2", "agent-2", 1040.0))
        store.end_attempt("task-aaaa-1", 2, 1100.0, "result")
        store.update_task("task-aaaa-1", status=TaskStatus.DONE, attempt=2)
        store.start_attempt(AttemptRecord("task-bbbb-2", 1, "l3", "agent-1", 1100.0))
        store.update_task("task-bbbb-2", status=TaskStatus.ASSIGNED, attempt=1)


def test_status_shows_attempts_and_eta(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/results.sqlite"
    fill_store(url, CampaignStatus.RUNNING)
    result = CliRunner().invoke(cli, ["campaign", "status", "c0ffee00", "--store", url])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "campaign c0ffee00-1111 (sweep): running" in out
    assert "tasks: assigned 1, done 1, pending 1, total 3" in out
    # 2 tasks left on one device, median of the one measured attempt (60 s).
    assert "ETA 2m 00s (2 tasks left on 1 device, median task 1m 00s over 1 measured)" in out
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if "task-aaa" in line)
    assert "tiny-cnn/onnxruntime/int8" in lines[first] and "pi5-lab" in lines[first]
    assert "done" in lines[first] and "#1 pi-one" in lines[first]
    assert "lost: lease expired" in lines[first] and "30.0s" in lines[first]
    assert "#2 pi-two" in lines[first + 1] and "result" in lines[first + 1]
    assert "1m 00s" in lines[first + 1]
    second = next(line for line in lines if "task-bbb" in line)
    assert "resnet" in second and "assigned" in second and "running" in second
    assert "so far" in second
    third = next(line for line in lines if "task-ccc" in line)
    assert "pending" in third and " 0 " in third


def test_status_of_a_running_campaign_with_nothing_measured(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/results.sqlite"
    with ResultsStore.open(url) as store:
        store.create_campaign(make_campaign("c0ffee00-2222"), [make_task("t1", "c0ffee00-2222")])
    result = CliRunner().invoke(cli, ["campaign", "status", "c0ffee00-2222", "--store", url])
    assert result.exit_code == 0, result.output
    assert "ETA unknown" in result.output


def test_status_of_a_finished_campaign_has_no_eta(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/results.sqlite"
    fill_store(url, CampaignStatus.DONE)
    result = CliRunner().invoke(cli, ["campaign", "status", "c0ffee00-1111", "--store", url])
    assert result.exit_code == 0, result.output
    assert "ETA" not in result.output and "pi-two" in result.output


def test_status_of_an_unknown_campaign(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/results.sqlite"
    ResultsStore.open(url).close()
    result = CliRunner().invoke(cli, ["campaign", "status", "nope-nope", "--store", url])
    assert result.exit_code != 0 and "no campaign 'nope-nope'" in str(result.exception)
