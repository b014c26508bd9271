"""Exporting result rows from a real store, read back with pandas."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from edgefarm.domain import CampaignStatus, MeasurementResult, MeasureSettings, TrialOutcome
from edgefarm.errors import UsageError
from results.export import export, to_dataframe
from results.records import CampaignRecord, TaskRecord
from results.store import ResultsStore


def _task(tid: str) -> TaskRecord:
    return TaskRecord(
        task_id=tid,
        campaign_id="camp-1",
        model="tiny-cnn",
        backend="onnxruntime",
        scheme="fp32",
        device_id="dev-pi5",
        device_name="pi5-lab",
        artifact_sha256="a" * 64,
        artifact_size=10,
        artifact_name="tiny.onnx",
        eval_sha256=None,
        eval_size=0,
        settings=MeasureSettings(trials=1, threads=4),
        measure_key=f"mk-{tid}",
    )


def _trial(samples: list[float], load_time_s: float = 0.5) -> TrialOutcome:
    return TrialOutcome(samples, 2, 1.0, load_time_s, 1000, 100, True)


@pytest.fixture
def rows(tmp_path: Path) -> list[dict[str, Any]]:
    """Two stored results: one complete, one failed (NULL latencies, no accuracy)."""
    good, bad = _task("t-good"), _task("t-bad")
    with ResultsStore.open(f"sqlite:///{tmp_path}/results.sqlite") as store:
        campaign = CampaignRecord("camp-1", "demo", "name: demo\n", CampaignStatus.RUNNING, 1.0)
        store.create_campaign(campaign, [good, bad])
        ok = MeasurementResult(
            task_id="t-good",
            attempt=1,
            lease_id="L",
            agent_id="agent-1",
            device_id="dev-pi5",
            ok=True,
            trials=[_trial([1.5, 2.5, 2.0])],
            accuracy={"top1": 0.8, "top5": 0.95},
            environment={"os": "Linux", "arch": "aarch64", "secret_token_path": "/x"},
        )
        store.ingest_result(good, ok, "pi5-lab")
        store.record_failure(bad, "timeout", "killed after 300 s")
        return store.results_for_campaign("camp-1", samples=True)


def _check(df: pd.DataFrame) -> None:
    assert list(df["task_id"]) == ["t-good", "t-bad"]
    assert list(df["ok"]) == [True, False]
    assert df.loc[0, "lat_mean_ms"] == pytest.approx(2.0)
    assert pd.isna(df.loc[1, "lat_mean_ms"])
    assert df.loc[0, "accuracy.top1"] == pytest.approx(0.8)
    assert pd.isna(df.loc[1, "accuracy.top1"])
    assert df.loc[0, "settings.threads"] == 4
    assert df.loc[0, "env.arch"] == "aarch64"
    assert "env.secret_token_path" not in df.columns  # only the selected keys
    assert json.loads(df.loc[0, "samples_ms"]) == [1.5, 2.5, 2.0]
    assert json.loads(df.loc[1, "samples_ms"]) == []
    assert json.loads(df.loc[0, "environment"])["secret_token_path"] == "/x"
    assert json.loads(df.loc[0, "trials_detail"])[0]["iterations"] == 3
    assert df.loc[1, "error_kind"] == "timeout"
    assert list(df["reused"]) == [False, False]


def test_to_dataframe_flattens(rows: list[dict[str, Any]]) -> None:
    df = to_dataframe(rows)
    _check(df)
    assert "accuracy" not in df.columns and "settings" not in df.columns
    assert to_dataframe([]).empty


def test_csv_round_trip(rows: list[dict[str, Any]], tmp_path: Path) -> None:
    out = tmp_path / "out" / "results.csv"
    assert export(rows, "CSV", out) == 2
    _check(pd.read_csv(out))
    stream = io.StringIO()
    assert export(rows, "csv", stream=stream) == 2
    assert stream.getvalue() == out.read_text()


def test_json_round_trip(rows: list[dict[str, Any]], tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    assert export(rows, "json", out) == 2
    records = json.loads(out.read_text())
    assert records[1]["lat_mean_ms"] is None and records[0]["result_id"] == rows[0]["result_id"]
    _check(pd.read_json(io.StringIO(out.read_text()), orient="records"))


def test_parquet_round_trip(rows: list[dict[str, Any]], tmp_path: Path) -> None:
    out = tmp_path / "results.parquet"
    assert export(rows, "parquet", out) == 2
    _check(pd.read_parquet(out))


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_export_streams_in_pieces_with_one_schema(
    fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows written a piece at a time keep one column set and type: a column that is
    an integer in one piece and missing or a float in another, a key only late rows have."""
    import results.export as export_module

    monkeypatch.setattr(export_module, "BATCH_ROWS", 2)
    source = [
        {"result_id": 1, "ok": True, "lat_p50_ms": 3, "settings": {"threads": 4}},
        {"result_id": 2, "ok": False, "lat_p50_ms": None, "settings": {"threads": 4}},
        {"result_id": 3, "ok": True, "lat_p50_ms": 2.5, "accuracy": {"top1": 0.5}},
        {"result_id": 4, "ok": True, "lat_p50_ms": float("nan"), "settings": {}},
        {"result_id": 5, "ok": True, "lat_p50_ms": 1.25, "environment": {"os": "Linux"}},
    ]
    calls = []

    def rows() -> list[dict[str, Any]]:
        calls.append(1)
        return source

    out = tmp_path / f"results.{fmt}"
    assert export(rows, fmt, out) == 5
    assert len(calls) == 2  # the columns, then the rows
    df = {
        "csv": lambda: pd.read_csv(out),
        "json": lambda: pd.read_json(out, orient="records"),
        "parquet": lambda: pd.read_parquet(out),
    }[fmt]()
    assert list(df["result_id"]) == [1, 2, 3, 4, 5]
    assert list(df["lat_p50_ms"].fillna(-1)) == [3.0, -1, 2.5, -1, 1.25]
    assert df.loc[2, "accuracy.top1"] == 0.5 and pd.isna(df.loc[0, "accuracy.top1"])
    assert df.loc[4, "env.os"] == "Linux"


def test_export_without_rows_writes_an_empty_table(tmp_path: Path) -> None:
    assert export([], "json", tmp_path / "e.json") == 0
    assert json.loads((tmp_path / "e.json").read_text()) == []
    assert export([], "parquet", tmp_path / "e.parquet") == 0
    assert pd.read_parquet(tmp_path / "e.parquet").empty


def test_export_to_an_unwritable_place_is_a_usage_error(
    rows: list[dict[str, Any]], tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="cannot write"):
        export(rows, "csv", tmp_path / "file" / "out.csv")


def test_parquet_needs_a_path_and_formats_are_checked(rows: list[dict[str, Any]]) -> None:
    with pytest.raises(UsageError, match="parquet"):
        export(rows, "parquet", None)
    with pytest.raises(UsageError, match="xlsx"):
        export(rows, "xlsx", None)
