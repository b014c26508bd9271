"""The nightly runner's decisions that need no farm: baseline choice, what changed."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.nightly.runner import choose_baseline, software_identities
from coordinator.nightly.sequential import (
    NightSeries,
    confirm_runs,
    confirm_trials,
    judge_sequential,
)
from coordinator.nightly.suite import Suite
from edgefarm.errors import UsageError
from results.records import NightlyRun
from results.regression import detect
from results.regression.types import Sample, SeriesKey, Status
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


# ------------------------------------------------------------------------------ sequential


def _k(model: str, metric: str = "latency_p50") -> SeriesKey:
    return SeriesKey(model, "onnxruntime", "fp32", "d", metric)


def _s(value: float, run: str) -> Sample:
    return Sample(run, 0.0, value, tuple(value * f for f in (0.99, 1.0, 1.01)))


def _history(values: list[float], control: list[float], builds: list[str]) -> list[NightSeries]:
    """Stored nights of series "m" (values, builds) and of control series "c"."""
    return [
        NightSeries(
            f"n{i}",
            {_k("m"): _s(v, f"n{i}"), _k("c"): _s(c, f"n{i}")},
            {"m/onnxruntime/fp32@d": frozenset({b}), "c/onnxruntime/fp32@d": frozenset({"c"})},
        )
        for i, (v, c, b) in enumerate(zip(values, control, builds, strict=True))
    ]


SPREAD = [10.0, 10.12, 9.9, 10.05, 9.93, 10.1, 9.97, 10.0]  # ~0.8% night to night


def test_sequential_first_check_uses_the_night_as_the_unit() -> None:
    nights = _history(SPREAD, [5.0] * 8, ["a"] * 8)
    ids = {"m/onnxruntime/fp32@d": frozenset({"b"}), "c/onnxruntime/fp32@d": frozenset({"c"})}
    builds = {"m/onnxruntime/fp32@d": frozenset({"a"})}
    trial_level = detect.judge_night({_k("m"): _s(10.0, "n7")}, {_k("m"): _s(10.35, "t")})
    assert trial_level[0].status is Status.REGRESSION  # +3.5% vs one night's trials
    tonight = {_k("m"): _s(10.35, "t"), _k("c"): _s(5.0, "t")}
    verdicts, run_level = judge_sequential(trial_level, tonight, nights, ids, builds)
    # Within the spread of the stored nights (p ~ 0.004 at 7 df): a first-stage flag ...
    assert run_level == {_k("m")} and verdicts[0].message.startswith("sequential:")
    assert verdicts[0].status is Status.REGRESSION and verdicts[0].ratio == pytest.approx(
        1.035, abs=0.003
    )
    assert "8 stored night(s)" in verdicts[0].message
    # ... a device 5% slower tonight (its control series says so) is not one.
    slow = {_k("m"): _s(10.35 * 1.05, "t"), _k("c"): _s(5.25, "t")}
    same = {_k("m"): _s(10.0 * 1.05, "t"), _k("c"): _s(5.25, "t")}
    first = detect.judge_night({_k("m"): _s(10.0, "n7")}, same)
    assert first[0].status is Status.REGRESSION
    judged, _ = judge_sequential(first, same, nights, ids, builds)
    assert judged[0].status is Status.UNCHANGED
    judged, _ = judge_sequential(
        detect.judge_night({_k("m"): _s(10.0, "n7")}, slow), slow, nights, ids, builds
    )
    assert judged[0].status is Status.REGRESSION
    # Replayed series keep the interleaved verdict; a short history the trial-level one.
    kept, none = judge_sequential(
        trial_level, tonight, nights, ids, builds, {"m/onnxruntime/fp32@d"}
    )
    assert kept == trial_level and none == set()
    short, none = judge_sequential(trial_level, tonight, nights[:2], ids, builds)
    assert none == set() and short[0].status is Status.REGRESSION
    assert "degree(s) of freedom" in short[0].message


def test_sequential_confirmation_needs_the_mean_of_fresh_runs() -> None:
    nights = _history(SPREAD, [5.0] * 8, ["a"] * 8)
    ids = {"m/onnxruntime/fp32@d": frozenset({"b"}), "c/onnxruntime/fp32@d": frozenset({"c"})}
    builds = {"m/onnxruntime/fp32@d": frozenset({"a"})}
    tonight = {_k("m"): _s(10.6, "t"), _k("c"): _s(5.0, "t")}
    first, _ = judge_sequential(
        detect.judge_night({_k("m"): _s(10.0, "n7")}, tonight), tonight, nights, ids, builds
    )
    assert first[0].status is Status.REGRESSION
    runs = [_s(v, f"r{i}") for i, v in enumerate((10.55, 10.6, 10.5))]
    held = confirm_runs(first[0], runs, nights, tonight, ids, builds)
    assert held.confirmed is True and "3 fresh run(s)" in held.message
    # The first run was a slow run: the fresh runs sit on the stored nights' level.
    back = [_s(v, f"r{i}") for i, v in enumerate((10.05, 9.95, 10.1))]
    assert confirm_runs(first[0], back, nights, tonight, ids, builds).confirmed is False


def test_trial_level_fallback_confirms_against_other_stored_nights() -> None:
    # The baseline night (n2) ran fast; the other stored nights of the build did not.
    nights = _history([10.0, 10.0, 9.0], [5.0] * 3, ["a"] * 3)
    ids = {"m/onnxruntime/fp32@d": frozenset({"b"}), "c/onnxruntime/fp32@d": frozenset({"c"})}
    builds = {"m/onnxruntime/fp32@d": frozenset({"a"})}
    tonight = {_k("m"): _s(10.0, "t"), _k("c"): _s(5.0, "t")}
    first = detect.judge_night({_k("m"): nights[2].samples[_k("m")]}, tonight)[0]
    assert first.status is Status.REGRESSION
    again = confirm_trials(
        first, nights[2].samples[_k("m")], _s(10.0, "again"), nights, tonight, ids, builds
    )
    assert again.confirmed is False and "independent baseline" in again.message


class _Store:
    """Unit-test double: result rows by campaign id."""

    def __init__(self, rows: dict[str, list[dict[str, object]]]) -> None:
        self.rows = rows

    def results_for_campaign(self, campaign_id: str) -> list[dict[str, object]]:
        return self.rows.get(campaign_id, [])


def _result(campaign: str, latency: float) -> dict[str, object]:
    return {
        "campaign_id": campaign,
        "ok": True,
        "valid": True,
        "model": "m",
        "backend": "onnxruntime",
        "scheme": "fp32",
        "device_id": "d",
        "role": "candidate",
        "trial_medians_ms": [latency * f for f in (0.99, 1.0, 1.01)],
    }


@pytest.mark.parametrize(("fresh", "held"), [(10.6, True), (10.02, False)])
def test_runner_confirms_a_sequential_flag_with_fresh_runs(
    monkeypatch: pytest.MonkeyPatch, fresh: float, held: bool
) -> None:
    from coordinator.interleave import RunShape
    from coordinator.nightly import runner as runner_module

    nights = _history(SPREAD, [5.0] * 8, ["a"] * 8)
    ids = {"m/onnxruntime/fp32@d": frozenset({"b"}), "c/onnxruntime/fp32@d": frozenset({"c"})}
    builds = {"m/onnxruntime/fp32@d": frozenset({"a"})}
    tonight = {_k("m"): _s(10.6, "t"), _k("c"): _s(5.0, "t")}
    verdicts, run_level = judge_sequential(
        detect.judge_night({_k("m"): _s(10.0, "n7")}, tonight), tonight, nights, ids, builds
    )
    assert run_level == {_k("m")} and verdicts[0].status is Status.REGRESSION
    submitted: list[RunShape] = []

    def submit(client: object, path: Path, fresh: bool, shape: RunShape) -> tuple[str, int, int]:
        submitted.append(shape)
        return f"c-{len(submitted)}", 0, 1

    monkeypatch.setattr(runner_module, "submit_and_follow", submit)
    store = _Store({f"c-{i}": [_result(f"c-{i}", fresh)] for i in (1, 2, 3)})
    seq = runner_module.SequentialContext(
        nights=nights,
        candidate=tonight,
        base_samples={_k("m"): _s(10.0, "n7")},
        tonight_ids=ids,
        builds=builds,
        replayed=frozenset(),
        run_level=run_level,
    )
    night_runner = runner_module.NightlyRunner(None, store, echo=lambda _: None)  # type: ignore[arg-type]
    out, first_id, failed = night_runner._confirm(
        Path("c.yaml"),
        RunShape(seed=1),
        NightlyRun("n-7", "s", "n7", "passed", 0.0, campaign_id="c-base"),
        verdicts,
        detect.to_confirm(verdicts),
        NightlyRun("n-8", "s", "n8", "running", 1.0),
        seq,
    )
    # Three fresh runs of the flagged series only, each with its own seed ...
    assert len(submitted) == detect.CONFIRM_RUNS and first_id == "c-1" and failed == 0
    assert all(s.series == frozenset({"m/onnxruntime/fp32@d"}) for s in submitted)
    assert len({s.seed for s in submitted}) == detect.CONFIRM_RUNS
    # ... whose mean, not the first check's baseline trials, decides.
    (v,) = [v for v in out if v.key == _k("m")]
    assert v.confirmed is held and "3 fresh run(s)" in v.message
    assert detect.fails_night(out) is held
