"""Flatten result rows into a table and export it as CSV, JSON or Parquet.

Every format gets the same flat table (:func:`to_dataframe`):

- the scalar columns of the result row, in store order (plus ``reused`` /
  ``answers_task_id`` when the rows come from ``results_for_campaign``);
- ``accuracy.<metric>`` for every accuracy metric of any row;
- ``settings.<name>`` for every measurement setting;
- ``env.<key>`` for the keys in :data:`ENV_KEYS` found in any row's environment;
- ``trial_medians_ms``, ``trials_detail``, ``environment`` and ``serving`` (load
  levels of serving results, raw samples included), and ``samples_ms`` when the rows
  were read with their samples, complete as JSON text, so every format holds them
  losslessly (``json.loads`` to get them back).

Missing measurements (NULL / NaN) are empty in CSV, ``null`` in JSON, null in Parquet.
pandas is imported lazily: it is a coordinator-only dependency.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

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


def to_dataframe(
    rows: Iterable[dict[str, Any]], env_keys: Sequence[str] = ENV_KEYS
) -> pd.DataFrame:
    """One flat row per result row (see the module docstring for the columns)."""
    import pandas as pd

    flat = [_flat_row(r, env_keys) for r in rows]
    columns = _Columns()
    for r in flat:
        columns.add(r)
    return pd.DataFrame.from_records(flat, columns=list(columns.kinds))


RowSource = Callable[[], Iterable[dict[str, Any]]] | Sequence[dict[str, Any]]
BATCH_ROWS = 1000  # flat rows per written piece: memory stays flat in the row count


class _Columns:
    """The ordered union of flat rows' keys, each with the kind of value it holds."""

    def __init__(self) -> None:
        self.kinds: dict[str, str] = {}

    def add(self, flat: dict[str, Any]) -> None:
        for key, value in flat.items():
            kind = _kind(value)
            seen = self.kinds.get(key)
            if seen is None or seen == "null":
                self.kinds[key] = kind
            elif kind != "null" and kind != seen:
                self.kinds[key] = "float" if {seen, kind} == {"int", "float"} else "str"

    def arrow_schema(self) -> Any:
        import pyarrow as pa

        types = {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64()}
        return pa.schema([(k, types.get(v, pa.string())) for k, v in self.kinds.items()])

    def cast(self, flat: dict[str, Any]) -> dict[str, Any]:
        """Every column, each value as its column's kind (None where missing)."""
        out = {}
        for key, kind in self.kinds.items():
            value = flat.get(key)
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            if value is not None:
                if kind == "str" and not isinstance(value, str):
                    value = json.dumps(value)
                elif kind == "float":
                    value = float(value)
            out[key] = value
        return out


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float" if math.isfinite(value) else "null"
    return "str"


def _flat_rows(source: RowSource) -> Iterator[dict[str, Any]]:
    rows = source() if callable(source) else source
    for row in rows:
        yield _flat_row(row, ENV_KEYS)


def _pieces(source: RowSource) -> Iterator[list[dict[str, Any]]]:
    """The flat rows of ``source``, :data:`BATCH_ROWS` at a time."""
    piece: list[dict[str, Any]] = []
    for flat in _flat_rows(source):
        piece.append(flat)
        if len(piece) >= BATCH_ROWS:
            yield piece
            piece = []
    if piece:
        yield piece


def export(
    source: RowSource, fmt: str, out: Path | None = None, stream: TextIO | None = None
) -> int:
    """Write the rows of ``source`` as ``fmt`` ("csv", "json" or "parquet") to the file
    ``out`` (or, for CSV / JSON, to ``stream``); return how many rows were written.

    ``source`` is a sequence of rows or a function returning a fresh iterable of them;
    it is read twice (the columns first, then the rows) a piece at a time, so memory
    stays flat however many rows there are. JSON is a list of records. Raises
    :class:`~edgefarm.errors.UsageError` for an unknown format, a Parquet export without
    a path, or an output that cannot be written.
    """
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r} (choose from {', '.join(FORMATS)})")
    if fmt == "parquet" and out is None:
        raise UsageError("parquet export needs an output file (--out PATH)")
    if out is None and stream is None:
        raise UsageError("export needs an output file or stream")
    columns = _Columns()
    for flat in _flat_rows(source):
        columns.add(flat)
    try:
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "parquet":
            assert out is not None
            return _write_parquet(source, columns, out)
        if out is None:
            assert stream is not None
            return _write_text(source, columns, fmt, stream)
        with out.open("w", encoding="utf-8", newline="") as f:
            return _write_text(source, columns, fmt, f)
    except OSError as e:
        raise UsageError(f"cannot write {out or 'the output'}: {e}") from e


def _write_parquet(source: RowSource, columns: _Columns, out: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = columns.arrow_schema()
    written = 0
    with pq.ParquetWriter(out, schema) as writer:
        for batch in _pieces(source):
            records = [columns.cast(flat) for flat in batch]
            writer.write_table(pa.Table.from_pylist(records, schema=schema))
            written += len(records)
        if not written:
            writer.write_table(schema.empty_table())
    return written


def _write_text(source: RowSource, columns: _Columns, fmt: str, f: TextIO) -> int:
    import pandas as pd

    dtypes = {"bool": "boolean", "int": "Int64", "float": "float64"}
    names = list(columns.kinds)
    written = 0
    if fmt == "json":
        f.write("[")
    for batch in _pieces(source):
        records = [columns.cast(flat) for flat in batch]
        if fmt == "csv":
            df = pd.DataFrame.from_records(records, columns=names)
            for name, kind in columns.kinds.items():
                if kind in dtypes:
                    df[name] = df[name].astype(dtypes[kind])
            df.to_csv(f, header=not written, index=False)
        else:
            for record in records:
                f.write(",\n  " if written else "\n  ")
                f.write(json.dumps(record, allow_nan=False))
                written += 1
            continue
        written += len(records)
    if fmt == "json":
        f.write("\n]\n" if written else "]\n")
    elif not written:
        f.write(",".join(names) + "\n" if names else "")
    return written
