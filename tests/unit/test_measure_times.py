"""Measurement start / end times: on the wire, checked, stored and exported."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pytest

from coordinator.validation import MAX_CLOCK_AHEAD_S, check_measure_times, check_result
from protos.convert import result_from_pb, result_to_pb
from results.export import export
from results.store import ResultsStore
from tests.unit.test_store import make_result, make_task, seed

NOW = 1_800_000_000.0


def test_times_travel_both_ways() -> None:
    task = make_task("t1")
    result = make_result(task, measure_started_at=NOW - 5.5, measure_ended_at=NOW - 0.25)
    pb = result_to_pb(result)
    assert (pb.measure_started_at, pb.measure_ended_at) == (NOW - 5.5, NOW - 0.25)
    back = result_from_pb(pb, result.agent_id, result.device_id)
    assert (back.measure_started_at, back.measure_ended_at) == (NOW - 5.5, NOW - 0.25)
    unknown = result_from_pb(result_to_pb(make_result(task)), "a", "d")
    assert (unknown.measure_started_at, unknown.measure_ended_at) == (0.0, 0.0)


@pytest.mark.parametrize(
    ("start", "end"),
    [(0.0, 0.0), (NOW - 10, NOW), (NOW, NOW), (NOW - 10, 0.0), (0.0, NOW), (NOW + 3600, 0.0)],
)
def test_good_times_pass(start: float, end: float) -> None:
    assert check_measure_times(start, end, NOW) is None


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        (math.nan, 0.0, "measure_started_at must be a finite, non-negative"),
        (0.0, math.inf, "measure_ended_at must be a finite, non-negative"),
        (-1.0, 0.0, "measure_started_at must be a finite, non-negative"),
        (NOW, NOW - 1, "measure_started_at (1800000000.000) is after measure_ended_at"),
        (0.0, NOW + MAX_CLOCK_AHEAD_S + 60, "measure_ended_at is 86460 s ahead of the coord"),
    ],
)
def test_bad_times_are_refused_with_a_clear_message(start: float, end: float, message: str) -> None:
    problem = check_measure_times(start, end, NOW)
    assert problem is not None and problem.startswith(message)


def test_check_result_checks_the_times() -> None:
    pb = result_to_pb(make_result(make_task("t1"), measure_started_at=NOW, measure_ended_at=NOW))
    assert check_result(pb, now=NOW) is None
    pb.measure_ended_at = NOW - 1
    assert "is after measure_ended_at" in (check_result(pb, now=NOW) or "")
    pb.measure_started_at = pb.measure_ended_at = 0.0
    assert check_result(pb) is None  # unknown times, the current clock


def _export(rows: list[dict[str, Any]], fmt: str) -> str:
    stream = io.StringIO()
    export(rows, fmt, stream=stream)
    return stream.getvalue()


def test_times_are_stored_returned_and_exported(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/results.sqlite"
    with ResultsStore.open(url) as store:
        t1, t2 = seed(store, "c0ffee00-aaaa", make_task("t1"), make_task("t2"))
        timed = make_result(t1, measure_started_at=NOW - 2.5, measure_ended_at=NOW)
        store.ingest_result(t1, timed, "pi5-lab")
        store.ingest_result(t2, make_result(t2), "pi5-lab")  # times unknown
        by_task = {r["task_id"]: r for r in store.results_for_campaign("c0ffee00-aaaa")}
        queried = {r["task_id"]: r for r in store.query_results(campaign_id="c0ffee00-aaaa")}
    for rows in (by_task, queried):
        assert (rows["t1"]["measure_started_at"], rows["t1"]["measure_ended_at"]) == (
            NOW - 2.5,
            NOW,
        )
        assert rows["t2"]["measure_started_at"] is None and rows["t2"]["measure_ended_at"] is None
    exported = json.loads(_export(list(by_task.values()), "json"))
    assert [(r["measure_started_at"], r["measure_ended_at"]) for r in exported] == [
        (NOW - 2.5, NOW),
        (None, None),
    ]
    csv_header = _export(list(by_task.values()), "csv").splitlines()[0].split(",")
    assert {"measure_started_at", "measure_ended_at"} <= set(csv_header)
