"""The results store at scale: a synthetic store of N result rows, read the ways users do.

Builds a SQLite store (current schema, through :class:`ResultsStore`) holding
``--rows`` results (default 1,000,000) in campaigns of ``--campaign-rows`` (10,000),
each row shaped like a quickstart classifier row (settings, a 30-key environment, five
trials' details, accuracy, metrics) with its raw samples trimmed to ``--samples``
per row (64) in ``result_samples``, then measures, each in a fresh process of its own
(time and that process's peak RSS):

- the size of one quickstart-setting row (5 trials, 235,000 samples, as the quickstart
  measures a classifier): the results row, its samples in ``result_samples``, and the
  same samples as the JSON text v7 kept in the row;
- ``edgefarm results list --json --campaign C`` (one 10,000-row campaign);
- ``edgefarm results export --format parquet`` of every row;
- ``edgefarm results show ID --samples`` on the quickstart-setting row;
- a filtered query on indexed columns (one model on one device, 100 rows).

Targets (issue 18): row under 64 KB, export of 1M rows under 1 GB peak RSS.

Run: ``python benchmarks/store_scale.py [--rows 1000000] [--dir DIR]`` (building 1M
rows takes several minutes and about 4 GB of disk; ``--dir`` keeps the store for reuse).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from edgefarm.domain import MeasureSettings  # noqa: E402
from results import samples_codec, schema  # noqa: E402
from results.store import ResultsStore  # noqa: E402

QUICKSTART_SAMPLES = 235_000  # a quickstart classifier result: 5 trials of 0.5 s
CHUNK = 2_000
MODELS = [f"model-{i:02d}" for i in range(20)]
BACKENDS = ["onnxruntime", "openvino", "llama-cpp", "mlx"]
SCHEMES = ["fp32", "fp16", "int8", "q4_k_m"]


def _environment(device: int) -> dict[str, str]:
    env = {f"backend.option_{i}": f"value-{i}" for i in range(18)}
    env.update(
        device_id=f"dev-{device:04d}", os="linux 6.6", arch="x86_64", cpu_model="x86-64 CPU",
        logical_cores="8", ram_bytes="17179869184", python="3.11.7", edgefarm="0.1.0",
        threads="1", batch_size="1", agent=f"agent-{device}", energy_source="rapl",
    )  # fmt: skip
    return env


def _trials_detail(rng: np.random.Generator, iterations: list[int]) -> list[dict[str, Any]]:
    return [
        {
            "iterations": n,
            "median_ms": float(rng.lognormal(np.log(0.5), 0.02)),
            "warmup_iterations": 20,
            "duration_s": 0.5,
            "load_time_s": 0.003,
            "peak_rss_bytes": 76_000_000,
            "load_rss_delta_bytes": 8_600_000,
            "valid": True,
            "invalid_reason": "",
            "metrics": {"host_other_cpu_cores": 0.04, "host_load_1m": 0.97},
        }
        for n in iterations
    ]


def _rows(total: int, per_campaign: int, samples: int) -> Iterator[tuple[str, list, list, list]]:
    """(campaign_id, task rows, result rows, sample rows) per chunk, result ids from 1."""
    rng = np.random.default_rng(18)
    settings = MeasureSettings(trials=5).to_dict()
    result_id = 0
    for start in range(0, total, CHUNK):
        task_rows, result_rows, sample_rows = [], [], []
        for i in range(start, min(start + CHUNK, total)):
            result_id += 1
            campaign = f"camp-{i // per_campaign:05d}"
            device = i % 500
            model, backend = MODELS[i % len(MODELS)], BACKENDS[(i // 20) % len(BACKENDS)]
            scheme = SCHEMES[(i // 80) % len(SCHEMES)]
            medians = rng.lognormal(np.log(0.5), 0.02, 5)
            task_id = f"task-{i:08d}"
            common = {
                "task_id": task_id, "campaign_id": campaign, "model": model,
                "backend": backend, "scheme": scheme, "device_id": f"dev-{device:04d}",
                "artifact_sha256": f"{i % 4096:064x}", "eval_sha256": None,
                "measure_key": f"mk-{i:08d}", "settings": settings,
            }  # fmt: skip
            task_rows.append(
                {**common, "device_name": f"box-{device}", "artifact_size": 1_000_000,
                 "artifact_name": f"{model}.onnx", "eval_size": 0, "options": {},
                 "selector": {}, "role": "candidate", "block": 0, "status": "done",
                 "attempt": 1, "result_id": result_id, "created_at": float(i),
                 "updated_at": float(i)}
            )  # fmt: skip
            p50 = float(np.median(medians))
            result_rows.append(
                {**common, "result_id": result_id, "attempt": 1, "backend_version": "1.20.0",
                 "device_name": f"box-{device}", "agent_id": f"agent-{device}",
                 "role": "candidate", "block": 0, "ok": True, "valid": True,
                 "invalid_reason": "", "error_kind": "", "error_message": "",
                 "trials": 5, "samples_ms": [], "trial_medians_ms": medians.tolist(),
                 "lat_mean_ms": p50, "lat_p50_ms": p50, "lat_p90_ms": p50 * 1.1,
                 "lat_p99_ms": p50 * 1.3, "lat_stdev_ms": 0.01, "lat_cv": 0.02,
                 "lat_min_ms": p50 * 0.9, "lat_max_ms": p50 * 2, "throughput_per_s": 1000 / p50,
                 "batch_size": 1, "peak_rss_bytes": 76_000_000,
                 "load_rss_delta_bytes": 8_600_000, "load_time_s": 0.003,
                 "model_size_bytes": 1_000_000,
                 "accuracy": {"top1": 0.977, "agreement": 0.998, "examples": 540.0},
                 "metrics": {"host_load_1m": 0.97, "host_other_cpu_cores": 0.04},
                 "environment": _environment(device),
                 "trials_detail": _trials_detail(rng, [samples // 5] * 5),
                 "example_outcomes": None, "serving": None, "measure_started_at": float(i),
                 "measure_ended_at": float(i) + 3.0, "created_at": float(i)}
            )  # fmt: skip
            encoding, data = samples_codec.encode(
                np.rint(rng.lognormal(np.log(500_000), 0.05, samples)) / 1e6
            )
            sample_rows.append(
                {"result_id": result_id, "trial": 0, "count": samples, "encoding": encoding,
                 "data": data}
            )  # fmt: skip
        yield campaign, task_rows, result_rows, sample_rows


def build(url: str, total: int, per_campaign: int, samples: int) -> None:
    """Fill a fresh store with ``total`` synthetic result rows (bulk inserts)."""
    with ResultsStore.open(url):
        pass
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    made: set[str] = set()
    with engine.begin() as conn:
        for campaign, task_rows, result_rows, sample_rows in _rows(total, per_campaign, samples):
            for cid in {r["campaign_id"] for r in task_rows} - made:
                conn.execute(
                    schema.campaigns.insert(),
                    {"campaign_id": cid, "name": cid, "spec_yaml": "name: x\n",
                     "status": "done", "created_at": 0.0, "conversions_run": 0,
                     "conversions_cached": 0},
                )  # fmt: skip
                made.add(cid)
            conn.execute(schema.tasks.insert(), task_rows)
            conn.execute(schema.results.insert(), result_rows)
            conn.execute(schema.result_samples.insert(), sample_rows)
            del campaign
    engine.dispose()


def quickstart_row(url: str) -> int:
    """Store one quickstart-setting result through the real ingestion path; its id."""
    from edgefarm.domain import MeasurementResult, TrialOutcome
    from results.records import CampaignRecord, TaskRecord

    rng = np.random.default_rng(7)
    per_trial = QUICKSTART_SAMPLES // 5
    trials = [
        TrialOutcome((np.rint(rng.lognormal(np.log(13_400), 0.08, per_trial)) / 1e6).tolist(),
                     20, 0.5, 0.003, 76_000_000, 8_600_000, True)
        for _ in range(5)
    ]  # fmt: skip
    task = TaskRecord(
        task_id="quickstart-task", campaign_id="quickstart", model="digits-mlp",
        backend="onnxruntime", scheme="fp32", device_id="dev-0000", device_name="box-0",
        artifact_sha256="f" * 64, artifact_size=1, artifact_name="m.onnx", eval_sha256=None,
        eval_size=0, settings=MeasureSettings(trials=5), measure_key="mk-quickstart",
    )  # fmt: skip
    result = MeasurementResult(
        task_id=task.task_id, attempt=1, lease_id="L", agent_id="agent-0", device_id="dev-0000",
        ok=True, trials=trials, accuracy={"top1": 0.977}, environment=_environment(0),
        example_outcomes=bytes(540),
    )  # fmt: skip
    with ResultsStore.open(url) as store:
        store.create_campaign(
            CampaignRecord("quickstart", "qs", "name: qs\n", "running", 0.0),
            [task],  # type: ignore[arg-type]
        )
        rid, _ = store.ingest_result(task, result, "box-0")
    return rid


def sizes_of(url: str, rid: int) -> dict[str, int]:
    """The stored bytes of a result: its row, its samples, and those samples as JSON."""
    import sqlalchemy as sa

    with ResultsStore.open(url) as store:
        row = store.get_result(rid, samples=True)
    assert row is not None
    columns = " + ".join(f"COALESCE(LENGTH({c.name}), 0)" for c in schema.results.c)
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        row_bytes = conn.execute(
            sa.text(f"SELECT {columns} FROM results WHERE result_id = :rid"), {"rid": rid}
        ).scalar_one()
        side = conn.execute(
            sa.text("SELECT SUM(LENGTH(data)) FROM result_samples WHERE result_id = :rid"),
            {"rid": rid},
        ).scalar_one()
    engine.dispose()
    return {
        "result_id": rid,
        "row_bytes": int(row_bytes),
        "samples_bytes": int(side),
        "json_samples_bytes": len(json.dumps(row["samples_ms"], separators=(",", ":"))),
        "samples": len(row["samples_ms"]),
    }


def measure(args: list[str]) -> dict[str, float]:
    """Run ``edgefarm <args>`` in a fresh process; its wall time and peak RSS."""
    code = (
        "import resource, sys, time\n"
        "from edgefarm.cli.main import cli\n"
        "t = time.perf_counter()\n"
        "try:\n"
        "    cli.main(args=sys.argv[1:], standalone_mode=False)\n"
        "finally:\n"
        "    sys.stdout.flush()\n"
        "    sys.stderr.write('MEASURED %f %d\\n' % (time.perf_counter() - t,\n"
        "        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    if done.returncode:
        raise SystemExit(f"edgefarm {' '.join(args)} failed:\n{done.stderr}")
    line = [x for x in done.stderr.splitlines() if x.startswith("MEASURED")][-1]
    _, seconds, rss_kib = line.split()
    return {"s": float(seconds), "rss_mb": int(rss_kib) / 1024}


def query_time(url: str) -> float:
    """Seconds for 100 rows of one model on one device (indexed filters)."""
    with ResultsStore.open(url) as store:
        t = time.perf_counter()
        found = store.query_results(model="model-07", device="dev-0107", limit=100)
        elapsed = time.perf_counter() - t
    assert found, "the filtered query found nothing"
    return elapsed


def _timed(label: str, fn: Callable[[], Any]) -> Any:
    t = time.perf_counter()
    out = fn()
    print(f"  {label}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--campaign-rows", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=64, help="raw samples per row")
    parser.add_argument("--dir", type=Path, default=None, help="keep the store here")
    opts = parser.parse_args()
    os.environ.setdefault("EDGEFARM_HOME", tempfile.mkdtemp(prefix="edgefarm-home-"))
    where = opts.dir or Path(tempfile.mkdtemp(prefix="edgefarm-store-scale-"))
    where.mkdir(parents=True, exist_ok=True)
    path = where / f"results-{opts.rows}.sqlite"
    url = f"sqlite:///{path}"
    if not path.exists():
        print(f"building {opts.rows:,} rows in {path} ...", file=sys.stderr)
        _timed("build", lambda: build(url, opts.rows, opts.campaign_rows, opts.samples))
    with ResultsStore.open(url) as store:
        stored = store.query_results(campaign_id="quickstart")
    sizes = sizes_of(url, stored[0]["result_id"] if stored else quickstart_row(url))
    campaign = f"camp-{opts.rows // opts.campaign_rows // 2:05d}"
    listed = measure(["results", "list", "--json", "--campaign", campaign, "--store", url])
    out = where / "export.parquet"
    exported = measure(["results", "export", "--format", "parquet", "-o", str(out), "--store", url])
    shown = measure(["results", "show", str(sizes["result_id"]), "--samples", "--store", url])
    query_s = query_time(url)
    import pyarrow.parquet as pq

    exported_rows = pq.ParquetFile(out).metadata.num_rows
    kib = 1024
    print(f"\nresults store at scale: {opts.rows:,} rows ({path.stat().st_size / 2**30:.1f} GiB "
          f"SQLite, {opts.samples} raw samples per row)\n")  # fmt: skip
    print(f"{'figure':58} {'measured':>22} {'target':>14}")
    table = [
        (f"quickstart-setting row ({sizes['samples']:,} samples): results row",
         f"{sizes['row_bytes'] / kib:.1f} KiB", "< 64 KiB"),
        ("  its samples in result_samples (compressed, lossless)",
         f"{sizes['samples_bytes'] / kib:.0f} KiB", ""),
        ("  the same samples as v7's JSON in the row",
         f"{sizes['json_samples_bytes'] / kib:.0f} KiB", ""),
        (f"results list --json, one campaign ({opts.campaign_rows:,} rows)",
         f"{listed['s']:.1f} s, {listed['rss_mb']:.0f} MB", ""),
        (f"results export --format parquet ({exported_rows:,} rows)",
         f"{exported['s']:.0f} s, {exported['rss_mb']:.0f} MB", "< 1024 MB"),
        ("results show --samples (quickstart-setting row)",
         f"{shown['s']:.2f} s, {shown['rss_mb']:.0f} MB", ""),
        ("query: one model on one device, 100 rows", f"{query_s * 1000:.0f} ms", ""),
    ]  # fmt: skip
    for name, value, target in table:
        print(f"{name:58} {value:>22} {target:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
