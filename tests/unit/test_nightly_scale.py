"""Nightly history at scale: series_nights (migration v9, runner writes and reads), the
batched change-point search against the original algorithm, and hostile rows."""

from __future__ import annotations

import itertools
import math
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.nightly.runner import stored_histories, stored_histories_from_rows
from results.records import NightlyRun
from results.regression import changepoint as cp
from results.regression.collect import series_samples
from results.regression.types import Sample, SeriesKey
from results.store import ResultsStore
from tests.unit.test_store import make_campaign, make_result, make_task, make_trial

KEY = SeriesKey("m", "onnxruntime", "fp32", "d", "latency_p50")

# ------------------------------------------------ the original algorithm, verbatim


def _ref_best_split(
    values: np.ndarray, min_segment: int, alpha: float, permutations: int, rng: np.random.Generator
) -> tuple[int, float] | None:
    q = _ref_split_statistics(values[None, :], min_segment)[0]
    tau = int(np.argmax(q))
    observed = float(q[tau])
    if not math.isfinite(observed) or observed <= 0.0:
        return None
    exceed, done = 0, 0
    allowed = alpha * (permutations + 1) - 1.0
    while done < permutations:
        size = min(50, permutations - done)
        shuffled = rng.permuted(np.broadcast_to(values, (size, len(values))), axis=1)
        perm_max = _ref_split_statistics(shuffled, min_segment).max(axis=1)
        exceed += int(np.count_nonzero(perm_max >= observed * (1.0 - 1e-12)))
        done += size
        if exceed >= allowed:
            break
    return tau, (1.0 + exceed) / (1.0 + done)


def _ref_split_statistics(values: np.ndarray, min_segment: int) -> np.ndarray:
    batch, n = values.shape
    upper = np.triu(np.abs(values[:, :, None] - values[:, None, :]), k=1)
    col, row = upper.sum(axis=1), upper.sum(axis=2)
    zeros = np.zeros((batch, 1))
    left = np.concatenate([zeros, np.cumsum(col, axis=1)], axis=1)
    right = np.concatenate([np.cumsum(row[:, ::-1], axis=1)[:, ::-1], zeros], axis=1)
    cross = left[:, -1:] - left - right
    m = np.arange(n + 1, dtype=float)
    k = n - m
    with np.errstate(divide="ignore", invalid="ignore"):
        pl = np.where(m >= 2, m * (m - 1) / 2.0, np.inf)
        pr = np.where(k >= 2, k * (k - 1) / 2.0, np.inf)
        q = (m * k / n) * (2.0 * cross / (m * k) - left / pl - right / pr)
    valid = (m >= min_segment) & (m <= n - min_segment)
    return np.where(valid[None, :], q, -np.inf)


def reference(values: np.ndarray, seed: int, min_magnitude: float) -> list[tuple[int, float]]:
    """Today's detect_change_points as (index, p-value), with segment means checked."""
    if len(values) < 6 or not np.all(np.isfinite(values)):
        return []
    rng = np.random.default_rng(seed)
    found: list[tuple[int, float]] = []

    def segment(start: int, stop: int) -> None:
        if stop - start < 6:
            return
        best = _ref_best_split(values[start:stop], 3, 0.01, 199, rng)
        if best is None or best[1] >= 0.01:
            return
        found.append((start + best[0], best[1]))
        segment(start, start + best[0])
        segment(start + best[0], stop)

    segment(0, len(values))
    kept = sorted(found)
    while kept:
        bounds = [0, *(i for i, _ in kept), len(values)]
        means = [float(values[a:b].mean()) for a, b in itertools.pairwise(bounds)]
        changes = [
            abs(means[i + 1] - means[i]) / abs(means[i]) if means[i] else math.inf
            for i in range(len(kept))
        ]
        smallest = int(np.argmin(changes))
        if changes[smallest] >= min_magnitude:
            break
        del kept[smallest]
    return kept


def _corpus(count: int, seed: int) -> tuple[list[np.ndarray], list[int], list[float]]:
    rng = np.random.default_rng(seed)
    series, seeds, magnitudes = [], [], []
    for i in range(count):
        n = int(rng.choice([5, 6, 7, 11, 30, 61]))
        v = 10.0 * np.exp(rng.normal(0.0, float(rng.choice([0.0005, 0.003, 0.01, 0.03])), n))
        for _ in range(int(rng.integers(0, 3))):  # steps, up or down, small to large
            at = int(rng.integers(0, n))
            v[at:] *= 1 + float(rng.choice([-1, 1])) * float(rng.choice([0.005, 0.02, 0.05, 0.3]))
        if i % 13 == 0:
            v = np.round(v, 1)  # ties
        if i % 29 == 0:
            v[:] = 4.0
        series.append(v)
        seeds.append(int(rng.integers(0, 2**32)))
        magnitudes.append(float(rng.choice([0.0, 0.005, 0.01])))
    return series, seeds, magnitudes


def test_permuted_draws_the_same_rows_in_any_split() -> None:
    values = np.arange(61.0)
    whole = np.random.default_rng(5).permuted(np.broadcast_to(values, (199, 61)), axis=1)
    rng = np.random.default_rng(5)
    parts = [rng.permuted(np.broadcast_to(values, (s, 61)), axis=1) for s in (1, 3, 46, 50, 99)]
    assert np.array_equal(whole, np.concatenate(parts))


def test_split_statistics_are_the_originals_bit_for_bit() -> None:
    rows = 10.0 * np.exp(np.random.default_rng(3).normal(0.0, 0.01, (300, 61)))
    assert np.array_equal(cp.split_statistics(rows, 3), _ref_split_statistics(rows, 3))
    singles = np.concatenate([cp.split_statistics(r[None, :], 3) for r in rows[:20]])
    assert np.array_equal(singles, cp.split_statistics(rows[:20], 3))


def test_batched_and_single_searches_equal_the_original_algorithm() -> None:
    series, seeds, magnitudes = _corpus(700, seed=11)
    want = [reference(v, s, m) for v, s, m in zip(series, seeds, magnitudes, strict=True)]
    assert sum(1 for w in want if w) > 40  # the corpus has change points to find
    many = cp.detect_many(series, seeds, magnitudes)
    assert [[(f.index, f.p_value) for f in fs] for fs in many] == want
    for v, s, m, w in itertools.islice(zip(series, seeds, magnitudes, want, strict=True), 150):
        samples = [Sample(f"n{i}", float(i), float(x)) for i, x in enumerate(v)]
        got = cp.detect_change_points(KEY, samples, seed=s, min_magnitude=m)
        assert [(c.index, c.p_value) for c in got] == w


def test_cannot_change_only_when_nothing_could_pass_the_filter() -> None:
    flat = np.full(20, 3.0)
    assert cp.cannot_change(flat, 3, 0.0)
    tight = 10.0 * np.exp(np.random.default_rng(0).normal(0.0, 0.0005, 60))
    assert cp.cannot_change(tight, 3, 0.01)
    stepped = tight.copy()
    stepped[30:] *= 1.02
    assert not cp.cannot_change(stepped, 3, 0.01)
    assert not cp.cannot_change(tight, 3, 0.0)


# ------------------------------------------------------------ store and runner


def _add_night(store: ResultsStore, n: int, level: float, finished: bool = True) -> NightlyRun:
    """Night ``n``: one campaign with two series (model a stepped by ``level``, b flat)."""
    cid = f"c0ffee{n:02d}-night"
    tasks = [
        make_task(f"t{n}-{m}", cid, measure_key=f"mk-{n}-{m}", model=m, created_at=float(n))
        for m in ("a", "b")
    ]
    store.create_campaign(make_campaign(cid), tasks)
    rng = np.random.default_rng(n)
    for task in tasks:
        base = 10.0 * (level if task.model == "a" else 1.0)
        trials = [make_trial([base * float(np.exp(rng.normal(0, 0.005)))] * 3) for _ in range(3)]
        store.ingest_result(task, make_result(task, trials=trials), "pi5")
    run = NightlyRun(
        f"n-{n:04d}",
        "suite",
        f"night {n}",
        "passed" if finished else "running",
        1000.0 + n,
        campaign_id=cid,
        baseline_run_id=f"n-{n - 1:04d}" if n else None,
        finished_at=1000.5 + n if finished else None,
    )
    store.create_nightly_run(run)
    return run


_AT_VERSION = "UPDATE meta SET value='{}' WHERE key='schema_version'"


def _edit(path: Path, *statements: str, params: tuple[object, ...] = ()) -> None:
    """Change the SQLite store at ``path`` behind the store's back."""
    db = sqlite3.connect(path)
    for statement in statements:
        db.execute(statement, params)
    db.commit()
    db.close()


def _summaries(store: ResultsStore, run: NightlyRun) -> dict[SeriesKey, Sample]:
    assert run.campaign_id
    return series_samples(store.results_for_campaign(run.campaign_id), run.run_id, run.created_at)


def _one_judged_night(path: Path) -> tuple[NightlyRun, dict[SeriesKey, Sample]]:
    """A store at ``path`` with one night and its summaries stored."""
    with ResultsStore.open(f"sqlite:///{path}") as store:
        run = _add_night(store, 0, 1.0)
        samples = _summaries(store, run)
        store.put_series_night(run.run_id, "suite", samples)
    return run, samples


def test_migration_v9_backfills_finished_nights(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.sqlite'}"
    with ResultsStore.open(url) as store:
        runs = [_add_night(store, n, 1.0) for n in range(3)]
        running = _add_night(store, 3, 1.0, finished=False)
        want = {r.run_id: _summaries(store, r) for r in runs}
    _edit(tmp_path / "s.sqlite", "DROP TABLE series_nights", _AT_VERSION.format(8))
    with ResultsStore.open(url) as store:  # migrates 8 -> 9
        for run in runs:
            assert store.series_night(run.run_id) == want[run.run_id]
        assert store.series_night(running.run_id) == {}  # not finished: not backfilled


def _equal_values(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(
        np.array_equal(a[k].series, b[k].series) and np.array_equal(a[k].values, b[k].values)
        for k in a
    )


def test_migration_v10_packs_the_stored_nights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.sqlite"
    with ResultsStore.open(f"sqlite:///{path}") as store:
        runs = [_add_night(store, n, 1.0) for n in range(3)]
        for run in runs:
            store.put_series_night(run.run_id, "suite", _summaries(store, run))
        want = store.series_night_values(r.run_id for r in runs)
    _edit(path, "DROP TABLE series_night_packs", _AT_VERSION.format(9))
    with ResultsStore.open(f"sqlite:///{path}") as store:  # migrates 9 -> 10
        got = store.series_night_values(r.run_id for r in runs)
    assert len(want) == 3 and _equal_values(got, want)
    assert "series_night_packs" not in caplog.text  # read from the packs, not the rows
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM series_night_packs").fetchone() == (3,)
    db.close()


@pytest.mark.parametrize(
    ("column", "bad"),
    [("series_count", 7), ("night_values", b"\x00" * 8), ("series", b"\xff" * 16)],
)
def test_a_damaged_pack_is_read_from_its_rows(
    tmp_path: Path, column: str, bad: object, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.sqlite"
    run, _ = _one_judged_night(path)
    with ResultsStore.open(f"sqlite:///{path}") as store:
        want = store.series_night_values([run.run_id])
    _edit(path, f"UPDATE series_night_packs SET {column} = ?", params=(bad,))
    with ResultsStore.open(f"sqlite:///{path}") as store:
        got = store.series_night_values([run.run_id])
    assert _equal_values(got, want)
    assert f"series_night_packs {run.run_id}" in caplog.text


def test_runner_history_from_series_nights_equals_the_row_path(tmp_path: Path) -> None:
    with ResultsStore.open(f"sqlite:///{tmp_path / 's.sqlite'}") as store:
        runs = [_add_night(store, n, 1.0 if n < 7 else 1.05) for n in range(13)]
        tonight = _add_night(store, 13, 1.05, finished=False)
        for run in runs[2:]:  # nights 0 and 1 have no summaries: read from their rows
            store.put_series_night(run.run_id, "suite", _summaries(store, run))
        candidate = _summaries(store, tonight)
        assert store.put_series_night(tonight.run_id, "suite", candidate) == len(candidate)
        assert store.put_series_night(tonight.run_id, "suite", candidate) == len(candidate)
        new = stored_histories(store, tonight, candidate)
        old = stored_histories_from_rows(store, tonight, candidate)
        assert [h.key for h in new] == [h.key for h in old]
        for a, b in zip(new, old, strict=True):
            full = (tonight.run_id, tonight.baseline_run_id)  # trials kept for these nights
            assert list(a.samples) == [
                s if s.run_id in full else Sample(s.run_id, s.at, s.value) for s in b.samples
            ]
            assert a.change_points == b.change_points and a.baseline_band == b.baseline_band
        stepped = [h for h in new if h.key.model == "a" and h.key.metric == "latency_p50"]
        assert [c.index for c in stepped[0].change_points] == [7]
        # A report (no tonight given) reads tonight's summaries back.
        again = stored_histories(store, tonight)
        assert [h.change_points for h in again] == [h.change_points for h in new]


@pytest.mark.parametrize(
    ("column", "bad"),
    [("trials", b"\x00\x01\x02"), ("outcomes", "10x1"), ("value", "not a number")],
)
def test_a_hostile_series_nights_row_is_skipped(
    tmp_path: Path, column: str, bad: object, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.sqlite"
    run, samples = _one_judged_night(path)
    where = "model = 'a' AND metric = 'latency_p50'"
    _edit(path, f"UPDATE series_nights SET {column} = ? WHERE {where}", params=(bad,))
    with ResultsStore.open(f"sqlite:///{path}") as store:
        found = store.series_night(run.run_id)
        values = store.series_night_values([run.run_id])[run.run_id]
    assert len(found) == len(samples) - 1 and "skipping a series_nights row" in caplog.text
    assert np.all(np.isfinite(values.values))
