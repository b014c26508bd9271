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
        return store.results_for_campaign("camp-1")


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
    text = export(rows, "CSV", out)
    assert isinstance(text, str) and out.read_text() == text
    _check(pd.read_csv(out))
    assert export(rows, "csv") == text  # without a path: only returned


def test_json_round_trip(rows: list[dict[str, Any]], tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    text = export(rows, "json", out)
    assert isinstance(text, str)
    records = json.loads(out.read_text())
    assert records[1]["lat_mean_ms"] is None and records[0]["result_id"] == rows[0]["result_id"]
    _check(pd.read_json(io.StringIO(text), orient="records"))


def test_parquet_round_trip(rows: list[dict[str, Any]], tmp_path: Path) -> None:
    out = tmp_path / "results.parquet"
    data = export(rows, "parquet", out)
    assert isinstance(data, bytes) and out.read_bytes() == data
    _check(pd.read_parquet(out))


def test_parquet_needs_a_path_and_formats_are_checked(rows: list[dict[str, Any]]) -> None:
    with pytest.raises(UsageError, match="parquet"):
        export(rows, "parquet", None)
    with pytest.raises(UsageError, match="xlsx"):
        export(rows, "xlsx", None)
