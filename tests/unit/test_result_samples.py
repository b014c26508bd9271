"""Raw samples stored compactly beside their result; rows streamed in pieces; v7 stores
migrate (samples move out of the JSON column, nothing lost)."""

from __future__ import annotations

import json
import sqlite3
import zlib
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from edgefarm.cli.main import cli
from edgefarm.errors import StoreError
from results import samples_codec, schema
from results.store import ResultsStore
from tests.unit.test_store import make_result, make_task, make_trial, seed, store, store_url

__all__ = ["store", "store_url"]  # fixtures, one run per backend

# ------------------------------------------------------------------------------ codec


def _timed_ns(n: int, seed_: int = 0) -> list[float]:
    """Samples the way agents take them: whole nanoseconds, in milliseconds."""
    rng = np.random.default_rng(seed_)
    ns = rng.lognormal(np.log(120_000), 0.05, n).astype(np.int64)
    return (ns / 1e6).tolist()


@pytest.mark.parametrize(
    "samples",
    [
        [],
        [0.0],
        _timed_ns(5000),
        [1.5, 2.25, 0.001, 3e-9, 1e300, -4.0],  # not whole ns: stored as float64
        [float("nan"), float("inf"), -float("inf"), 2.0],
        [4503.599627370496, 0.0],  # near the exactly representable ns limit
    ],
)
def test_codec_round_trips_exactly(samples: list[float]) -> None:
    encoding, data = samples_codec.encode(samples)
    back = samples_codec.decode(encoding, data, len(samples))
    assert np.array_equal(np.asarray(back), np.asarray(samples), equal_nan=True)
    assert all(isinstance(v, float) for v in back)


def test_codec_packs_timed_samples_small() -> None:
    samples = _timed_ns(30_000)
    encoding, data = samples_codec.encode(samples)
    assert encoding == samples_codec.NS_DELTA
    assert len(data) < 3 * len(samples) < len(json.dumps(samples)) / 3


@pytest.mark.parametrize(
    ("encoding", "data", "count", "message"),
    [
        (samples_codec.F64, b"not deflated", 1, "not deflated"),
        (samples_codec.F64, zlib.compress(b"\0" * 16), 3, "holds 2 values, not 3"),
        ("lz4", zlib.compress(b"\0" * 8), 1, "unknown samples encoding 'lz4'"),
    ],
)
def test_codec_rejects_damaged_blobs(encoding: str, data: bytes, count: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        samples_codec.decode(encoding, data, count)


# ------------------------------------------------------------------------------ store


def test_samples_live_beside_the_row_and_come_back_when_asked(store: ResultsStore) -> None:
    (t1,) = seed(store)
    big = [_timed_ns(40_000, i) for i in range(5)]  # quickstart-sized: 200,000 samples
    result = make_result(t1, trials=[make_trial(s) for s in big])
    rid, _ = store.ingest_result(t1, result, "pi5-lab")

    row = store.get_result(rid)
    assert row is not None and "samples_ms" not in row
    assert len(json.dumps(row)) < 64 * 1024  # the row itself stays small
    assert row["lat_p50_ms"] == pytest.approx(float(np.median(np.concatenate(big))))
    full = store.get_result(rid, samples=True)
    assert full is not None and full["samples_ms"] == [v for s in big for v in s]
    assert store.result_samples([rid, 999]) == {rid: full["samples_ms"], 999: []}
    (listed,) = store.results_for_campaign(t1.campaign_id, samples=True)
    assert listed["samples_ms"] == full["samples_ms"]


def test_results_stream_in_pieces_with_filters_and_limits(store: ResultsStore) -> None:
    tasks = [make_task(f"t{i}", measure_key=f"mk-{i}") for i in range(7)]
    seed(store, "c0ffee00-aaaa", *tasks)
    ids = [store.ingest_result(t, make_result(t), "pi5-lab")[0] for t in tasks]
    newest_first = ids[::-1]

    assert [r["result_id"] for r in store.iter_results(batch=2)] == newest_first
    assert [r["result_id"] for r in store.iter_results(batch=2, limit=5)] == newest_first[:5]
    assert [r["result_id"] for r in store.iter_results(batch=3, limit=3)] == newest_first[:3]
    assert list(store.iter_results(model="other", batch=2)) == []
    assert len(list(store.iter_results(device="pi5-lab", ok=True, batch=4))) == 7
    in_order = list(store.iter_campaign_results("c0ffee00-aaaa", samples=True, batch=2))
    assert [r["result_id"] for r in in_order] == ids
    assert all(r["samples_ms"] == [2.0, 4.0, 3.0, 5.0, 1.0, 3.0] for r in in_order)
    assert all("_seq" not in r and r["reused"] is False for r in in_order)


def test_damaged_samples_are_a_store_error_naming_the_result(store_url: str) -> None:
    with ResultsStore.open(store_url) as store:
        (t1,) = seed(store)
        rid, _ = store.ingest_result(t1, make_result(t1), "pi5-lab")
    engine = sa.create_engine(store_url)
    with engine.begin() as conn:
        conn.execute(schema.result_samples.update().values(data=b"garbage"))
    engine.dispose()
    with ResultsStore.open(store_url) as store:
        assert store.get_result(rid) is not None  # the row alone still reads
        with pytest.raises(StoreError, match=f"result {rid} trial 0: stored samples are damaged"):
            store.get_result(rid, samples=True)


def _as_v7(path: Path, samples: list[list[float]]) -> None:
    """Turn a current store into what v7 wrote: samples as JSON in the results row."""
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE result_samples")
        for index in ("ix_results_model", "ix_results_backend", "ix_results_device_name"):
            db.execute(f"DROP INDEX {index}")
        for rid, values in enumerate(samples, start=1):
            db.execute(
                "UPDATE results SET samples_ms=? WHERE result_id=?", (json.dumps(values), rid)
            )
        db.execute("UPDATE meta SET value='7' WHERE key='schema_version'")


def test_v7_store_migrates_its_samples_out_of_the_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schema, "_MOVE_BATCH", 2)  # several steps of the move
    path = tmp_path / "old.sqlite"
    url = f"sqlite:///{path}"
    tasks = [make_task(f"t{i}", measure_key=f"mk-{i}") for i in range(5)]
    with ResultsStore.open(url) as store:
        seed(store, "c0ffee00-aaaa", *tasks)
        for t in tasks[:4]:
            store.ingest_result(t, make_result(t), "pi5-lab")
        store.record_failure(tasks[4], "timeout", "no answer")
    old = [
        _timed_ns(6, 1) + _timed_ns(4, 2),  # two trials of 3 (trials_detail): mismatch
        [2.0, 4.0, 3.0, 5.0, 1.0, 3.0],
        [1.25, 2.5, 3.75, 5.0, 6.25, 7.5],
        [],
        [],
    ]
    _as_v7(path, old)

    with ResultsStore.open(url) as store:
        got = store.result_samples(range(1, 6))
        assert [got[i] for i in range(1, 6)] == old
        # split per trial where trials_detail adds up; one piece where it does not
        with sqlite3.connect(path) as db:
            pieces = db.execute(
                "SELECT result_id, trial, count FROM result_samples ORDER BY result_id, trial"
            ).fetchall()
            left = db.execute("SELECT COUNT(*) FROM results WHERE samples_ms != '[]'").fetchone()
            indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        assert pieces == [(1, 0, 10), (2, 0, 3), (2, 1, 3), (3, 0, 3), (3, 1, 3)]
        assert left == (0,)
        assert "ix_results_model" in indexes
        assert [r["model"] for r in store.iter_results(model="tiny-cnn")] == ["tiny-cnn"] * 5


def test_results_commands_stream_rows_and_samples(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/r.sqlite"
    tasks = [make_task(f"t{i}", measure_key=f"mk-{i}") for i in range(3)]
    with ResultsStore.open(url) as store:
        seed(store, "c0ffee00-aaaa", *tasks)
        for t in tasks:
            store.ingest_result(t, make_result(t), "pi5-lab")
    runner = CliRunner()

    listed = runner.invoke(cli, ["results", "list", "--json", "--store", url])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    assert [r["result_id"] for r in rows] == [3, 2, 1] and "samples_ms" not in rows[0]
    none = runner.invoke(cli, ["results", "list", "--json", "--model", "x", "--store", url])
    assert none.exit_code == 0 and json.loads(none.output) == []

    shown = runner.invoke(cli, ["results", "show", "2", "--samples", "--store", url])
    assert json.loads(shown.output)["samples_ms"] == [2.0, 4.0, 3.0, 5.0, 1.0, 3.0]

    out = tmp_path / "all.csv"
    args = ["results", "export", "--samples", "-o", str(out), "--store", url]
    exported = runner.invoke(cli, [*args, "--campaign", "c0ffee00-aaaa", "--limit", "2"])
    assert exported.exit_code == 0, exported.output
    assert "wrote 2 rows" in exported.output
    import pandas as pd

    df = pd.read_csv(out)
    assert list(df["result_id"]) == [1, 2]
    assert json.loads(df.loc[0, "samples_ms"]) == [2.0, 4.0, 3.0, 5.0, 1.0, 3.0]
