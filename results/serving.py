"""Serving results as readers see them: one line per load level, one sweep per
configuration, and each server beside the same artifact's in-process micro-benchmark.

A serving row (backends ``llama-server``, ``openai-endpoint``, ``vllm``) stores its levels in the
``serving`` column (:func:`results.rows.serving_levels`): figures pooled over its trials.
Its ``lat_p50_ms`` is the median time per output token at the first level, so
``1000 / lat_p50_ms`` is the single-stream decode speed through the server, the figure
that sits beside the micro-benchmark's ``1000 / lat_p50_ms`` (one decode step in-process)
of the row measuring the same artifact on the same device.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from results.units import as_number

Row = dict[str, Any]
SERVING_BACKENDS = ("llama-server", "openai-endpoint", "vllm")


def is_serving_row(row: Row) -> bool:
    """A serving measurement (its load levels, or a failed serving task)."""
    return bool(row.get("serving")) or row.get("backend") in SERVING_BACKENDS


@dataclass(frozen=True)
class ServingPoint:
    """One level of one configuration's sweep (milliseconds, per second)."""

    label: str
    concurrency: int
    rate: float
    requests: int
    failed: int
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    tpot_p50_ms: float | None
    itl_p99_ms: float | None
    e2e_p50_ms: float | None
    e2e_p99_ms: float | None
    request_per_s: float | None
    output_tok_per_s: float | None
    goodput_per_s: float | None
    slo: str  # "TTFT <= 500 ms, TPOT <= 100 ms"
    server: dict[str, float]  # the server's own figures of the level (may be empty)


@dataclass(frozen=True)
class ServingSweep:
    """A configuration's levels on one device, in the order run."""

    device: str
    model: str
    backend: str
    scheme: str
    startup_s: float | None  # load time: the server's start-up (median over trials)
    points: tuple[ServingPoint, ...]

    @property
    def label(self) -> str:
        """``backend/scheme``."""
        return f"{self.backend}/{self.scheme}"


@dataclass(frozen=True)
class ServingVsInProcess:
    """A served artifact beside the same artifact's in-process micro-benchmark."""

    device: str
    model: str
    scheme: str
    server: str  # the serving backend
    in_process: str  # the micro-benchmark's backend
    in_process_tok_per_s: float | None  # 1000 / median decode step
    served_tok_per_s: float | None  # 1000 / median TPOT at the first level
    in_process_ttft_ms: float | None
    served_ttft_ms: float | None  # p50 at the first level (HTTP, template, queue incl.)
    first_level: str
    # top-1 agreement with the reference: in-process, and through the server's prompt
    # log-probabilities (None where not measured)
    in_process_top1: float | None = None
    served_top1: float | None = None

    @property
    def speed_ratio(self) -> float | None:
        """Served over in-process decode speed."""
        if self.served_tok_per_s is None or not self.in_process_tok_per_s:
            return None
        return self.served_tok_per_s / self.in_process_tok_per_s


def device_of(row: Row) -> str:
    """The device a row was measured on, as tables name it."""
    return str(row.get("device_name") or row.get("device_id") or "")


def _point(level: dict[str, Any]) -> ServingPoint:
    return ServingPoint(
        label=str(level.get("label", "")),
        concurrency=int(level.get("concurrency") or 0),
        rate=float(level.get("rate") or 0.0),
        requests=int(level.get("requests") or 0),
        failed=int(level.get("failed") or 0),
        ttft_p50_ms=as_number(level.get("ttft_p50_ms")),
        ttft_p99_ms=as_number(level.get("ttft_p99_ms")),
        tpot_p50_ms=as_number(level.get("tpot_p50_ms")),
        itl_p99_ms=as_number(level.get("itl_p99_ms")),
        e2e_p50_ms=as_number(level.get("e2e_p50_ms")),
        e2e_p99_ms=as_number(level.get("e2e_p99_ms")),
        request_per_s=as_number(level.get("request_per_s")),
        output_tok_per_s=as_number(level.get("output_tok_per_s")),
        goodput_per_s=as_number(level.get("goodput_per_s")),
        slo=(
            f"TTFT <= {float(level.get('slo_ttft_ms') or 0):g} ms, "
            f"TPOT <= {float(level.get('slo_tpot_ms') or 0):g} ms"
        ),
        server={
            str(k): float(v)
            for k, v in (level.get("server") or {}).items()
            if as_number(v) is not None
        },
    )


def sweeps(rows: Iterable[Row]) -> list[ServingSweep]:
    """Every usable serving row's sweep, in row order."""
    return [
        ServingSweep(
            device=device_of(row),
            model=str(row.get("model", "")),
            backend=str(row.get("backend", "")),
            scheme=str(row.get("scheme", "")),
            startup_s=as_number(row.get("load_time_s")),
            points=tuple(_point(level) for level in row["serving"]),
        )
        for row in rows
        if row.get("ok") and row.get("serving")
    ]


def _tok_per_s(row: Row) -> float | None:
    p50 = as_number(row.get("lat_p50_ms"))
    return 1000.0 / p50 if p50 else None


def side_by_side(rows: Sequence[Row]) -> list[ServingVsInProcess]:
    """Each serving row beside the ok in-process row of the same artifact and device."""
    in_process = {
        (device_of(r), r.get("artifact_sha256")): r
        for r in rows
        if r.get("ok") and not is_serving_row(r) and r.get("lat_p50_ms") is not None
    }
    out = []
    for row in rows:
        if not (row.get("ok") and row.get("serving")):
            continue
        micro = in_process.get((device_of(row), row.get("artifact_sha256")))
        if micro is None:
            continue
        first = row["serving"][0]
        out.append(
            ServingVsInProcess(
                device=device_of(row),
                model=str(row.get("model", "")),
                scheme=str(row.get("scheme", "")),
                server=str(row.get("backend", "")),
                in_process=str(micro.get("backend", "")),
                in_process_tok_per_s=_tok_per_s(micro),
                served_tok_per_s=_tok_per_s(row),
                in_process_ttft_ms=as_number((micro.get("metrics") or {}).get("ttft_ms")),
                served_ttft_ms=as_number(first.get("ttft_p50_ms")),
                first_level=str(first.get("label", "")),
                in_process_top1=as_number((micro.get("accuracy") or {}).get("top1_agreement")),
                served_top1=as_number((row.get("accuracy") or {}).get("served_top1_agreement")),
            )
        )
    return out
