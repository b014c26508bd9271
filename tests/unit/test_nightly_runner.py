"""The nightly runner's decisions that need no farm: baseline choice, what changed."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.nightly.runner import choose_baseline, software_identities
from coordinator.nightly.suite import Suite
from edgefarm.errors import UsageError
from results.records import NightlyRun
from results.store import ResultsStore


@pytest.fixture
def store(tmp_path: Path) -> ResultsStore:
    return ResultsStore.open(f"sqlite:///{tmp_path / 'r.sqlite'}")


def _night(store: ResultsStore, run_id: str, status: str, at: float, finished: bool = True) -> None:
    store.create_nightly_run(
        NightlyRun(
            run_id=run_id,
            suite="s",
            night=run_id,
            status=status,
            created_at=at,
            campaign_id=f"c-{run_id}",
            finished_at=at + 1 if finished else None,
        )
    )


def test_baseline_policies(store: ResultsStore) -> None:
    suite = Suite(name="s", campaign="c.yaml")
    assert choose_baseline(store, suite) is None  # first night
    _night(store, "n-1", "passed", 1.0)
    _night(store, "n-2", "regressed", 2.0)
    _night(store, "n-3", "running", 3.0, finished=False)  # tonight, still running
    last_passing = choose_baseline(store, suite)
    assert last_passing is not None and last_passing.run_id == "n-1"
    previous = choose_baseline(store, Suite(name="s", campaign="c.yaml", baseline="previous"))
    assert previous is not None and previous.run_id == "n-2"
    pinned = choose_baseline(store, Suite(name="s", campaign="c.yaml", baseline="n-2"))
    assert pinned is not None and pinned.run_id == "n-2"
    with pytest.raises(UsageError, match="no finished measurements"):
        choose_baseline(store, Suite(name="s", campaign="c.yaml", baseline="n-3"))
    with pytest.raises(UsageError, match="no nightly run"):
        choose_baseline(store, Suite(name="s", campaign="c.yaml", baseline="n-404"))


def _row(task: str, **changes: object) -> dict[str, object]:
    row: dict[str, object] = {
        "task_id": task,
        "ok": True,
        "model": "m",
        "backend": "onnxruntime",
        "scheme": "fp32",
        "device_id": "d",
        "artifact_sha256": "a1",
        "eval_sha256": "e1",
        "settings": {"trials": 1, "evaluate": True, "threads": 1},
        "backend_version": "1.31.1",
        "environment": {"agent": "local-1", "onnxruntime.version": "1.31.1"},
    }
    row.update(changes)
    return row


def test_software_identity_ignores_who_measured_and_trial_counts() -> None:
    before = software_identities([_row("t1")], {"t1": {}})
    same = software_identities(
        [
            _row("t2", environment={"agent": "local-2", "onnxruntime.version": "1.31.1"}),
            _row("t3", settings={"trials": 4, "evaluate": False, "threads": 1}),
        ],
        {"t2": {}, "t3": {}},
    )
    assert before == same  # nothing measured changed: a flag here is device state


@pytest.mark.parametrize(
    "change",
    [
        {"artifact_sha256": "a2"},
        {"backend_version": "1.32.0"},
        {"environment": {"agent": "local-1", "onnxruntime.version": "1.32.0"}},
        {"settings": {"trials": 1, "evaluate": True, "threads": 2}},
    ],
)
def test_software_identity_sees_what_can_cause_a_regression(change: dict[str, object]) -> None:
    before = software_identities([_row("t1")], {"t1": {}})
    after = software_identities([_row("t2", **change)], {"t2": {}})
    assert before != after


def test_software_identity_sees_backend_options_and_skips_failed_rows() -> None:
    before = software_identities([_row("t1")], {"t1": {}})
    after = software_identities([_row("t2")], {"t2": {"graph_optimization_level": "disable"}})
    assert before != after
    assert software_identities([_row("t1", ok=False)], {}) == {}
