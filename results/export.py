"""Flatten result rows into a table and export it as CSV, JSON or Parquet.

Every format gets the same flat table (:func:`to_dataframe`):

- the scalar columns of the result row, in store order (plus ``reused`` /
  ``answers_task_id`` when the rows come from ``results_for_campaign``);
- ``accuracy.<metric>`` for every accuracy metric of any row;
- ``settings.<name>`` for every measurement setting;
- ``env.<key>`` for the keys in :data:`ENV_KEYS` found in any row's environment;
- ``samples_ms``, ``trial_medians_ms``, ``trials_detail``, ``environment`` and
  ``serving`` (load levels of serving results, raw samples included) complete as JSON
  text, so every format holds them losslessly (``json.loads`` to get them back).

Missing measurements (NULL / NaN) are empty in CSV, ``null`` in JSON, null in Parquet.
pandas is imported lazily: it is a coordinator-only dependency.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefarm.errors import UsageError

if TYPE_CHECKING:
    import pandas as pd

FORMATS = ("csv", "json", "parquet")
ENV_KEYS: tuple[str, ...] = (
    "hostname",
    "os",
    "os_release",
    "arch",
    "cpu_model",
    "python_version",
)
JSON_TEXT_COLUMNS = ("samples_ms", "trial_medians_ms", "trials_detail", "environment", "serving")
_FLATTENED = ("accuracy", "metrics", "settings")


def _json_text(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _flat_row(row: dict[str, Any], env_keys: Sequence[str]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if key in _FLATTENED:
            continue
        flat[key] = _json_text(value) if key in JSON_TEXT_COLUMNS else value
    for name, value in (row.get("accuracy") or {}).items():
        flat[f"accuracy.{name}"] = value
    for name, value in (row.get("metrics") or {}).items():
        flat[f"metrics.{name}"] = value
    for name, value in (row.get("settings") or {}).items():
        flat[f"settings.{name}"] = value
    environment = row.get("environment") or {}
    for key in env_keys:
        if key in environment:
            flat[f"env.{key}"] = environment[key]
    return flat


def to_dataframe(rows: list[dict[str, Any]], env_keys: Sequence[str] = ENV_KEYS) -> pd.DataFrame:
    """One flat row per result row (see the module docstring for the columns)."""
    import pandas as pd

    flat = [_flat_row(r, env_keys) for r in rows]
    columns: dict[str, None] = {}  # ordered union of every row's keys
    for r in flat:
        columns.update(dict.fromkeys(r))
    return pd.DataFrame.from_records(flat, columns=list(columns))


def export(rows: list[dict[str, Any]], fmt: str, out: Path | None = None) -> bytes | str:
    """Write ``rows`` as ``fmt`` ("csv", "json" or "parquet") to ``out``; return the data.

    Without ``out`` nothing is written (CSV / JSON text is only returned); Parquet is
    binary and needs ``out``. JSON is a list of records. Raises
    :class:`~edgefarm.errors.UsageError` for an unknown format or a Parquet export
    without a path.
    """
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r} (choose from {', '.join(FORMATS)})")
    if fmt == "parquet" and out is None:
        raise UsageError("parquet export needs an output file (--out PATH)")
    df = to_dataframe(rows)
    data: bytes | str
    if fmt == "csv":
        data = df.to_csv(index=False)
    elif fmt == "json":
        data = df.to_json(orient="records", indent=2, double_precision=15)
    else:
        data = df.to_parquet(index=False)
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, bytes):
                out.write_bytes(data)
            else:
                out.write_text(data, encoding="utf-8")
        except OSError as e:
            raise UsageError(f"cannot write {out}: {e}") from e
    return data
