"""One nightly comparison at scale: time and peak memory, new path against the old one.

A synthetic SQLite store (in a temporary folder) holds a suite with S result rows a night
(model x backend x scheme x device; each row gives latency, throughput, peak RSS, load
time, model size and top-1 with per-example outcomes, so about 6 S series) and 60
finished nights of history. Trial medians carry 1-3% noise, peak RSS 0.2%, load time
5%; 2% of the rows step up by 3-8% on a random night, so change points exist.

The timed step is what the runner does for tonight apart from measuring: read tonight's
and the baseline night's rows, their samples, :func:`judge_night`, append tonight's
summaries to ``series_nights``, the histories with change points
(:func:`coordinator.nightly.runner.stored_histories`) and the drift notes. Each step
runs in a fresh process (peak RSS is that process's ``ru_maxrss``). The old path (every
night's rows re-read, one change-point search per series,
:func:`coordinator.nightly.runner.stored_histories_from_rows`) runs on a smaller store
for the ratio, and the new path on that same store must give the same verdicts, change
points and drift notes.

Run: ``python benchmarks/nightly_scale.py [--series 10000] [--old-series 1000]
[--nights 60]``. Targets: 10 s and 1 GB at 10,000 rows x 60 nights.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coordinator.nightly.runner import (  # noqa: E402
    _drift_notes,
    stored_histories,
    stored_histories_from_rows,
)
from edgefarm.domain import CampaignStatus, MeasurementResult, MeasureSettings, TrialOutcome  # noqa: E402
from results.records import CampaignRecord, NightlyRun, TaskRecord  # noqa: E402
from results.regression.codec import change_point_to_dict, verdict_to_dict  # noqa: E402
from results.regression.collect import series_samples  # noqa: E402
from results.regression.detect import judge_night  # noqa: E402
from results.regression.metrics import samples_from_row  # noqa: E402
from results.regression.types import Sample, SeriesKey  # noqa: E402
from results.store import ResultsStore  # noqa: E402

SUITE = "nightly-scale"
TARGET_S, TARGET_BYTES = 10.0, 1 << 30
TRIALS, EXAMPLES = 5, 200
DAY = 86_400.0


class Corpus:
    """Deterministic synthetic nights: per row its levels, noise and (maybe) a step."""

    def __init__(self, rows: int, nights: int, seed: int = 7) -> None:
        rng = np.random.default_rng(seed)
        self.rows, self.nights = rows, nights
        self.latency = rng.uniform(2.0, 50.0, rows)
        self.noise = rng.uniform(0.01, 0.03, rows)
        self.rss = rng.uniform(2e7, 4e8, rows)
        self.load = rng.uniform(0.05, 2.0, rows)
        self.size = rng.integers(1_000_000, 100_000_000, rows)
        self.outcomes = rng.random((rows, EXAMPLES)) < rng.uniform(0.7, 0.98, (rows, 1))
        stepped = rng.random(rows) < 0.02
        self.step_at = np.where(stepped, rng.integers(5, nights + 1, rows), nights + 10)
        self.step = rng.uniform(1.03, 1.08, rows)
        self.seed = seed

    def key(self, i: int) -> tuple[str, str, str, str]:
        """(model, backend, scheme, device) of row ``i``."""
        return (
            f"model-{i % 100:03d}",
            ("onnxruntime", "openvino")[(i // 100) % 2],
            ("fp32", "int8")[(i // 200) % 2],
            f"dev-{i // 400:03d}",
        )

    def night(self, n: int) -> dict[str, np.ndarray]:
        """Per-row trial medians, peak RSS and load times of night ``n``."""
        rng = np.random.default_rng((self.seed, n))
        level = np.where(n >= self.step_at, self.step, 1.0)
        shape = (self.rows, TRIALS)
        return {
            "medians": (self.latency * level)[:, None]
            * np.exp(rng.normal(0.0, 1.0, shape) * self.noise[:, None]),
            "rss": self.rss[:, None] * np.exp(rng.normal(0.0, 0.002, shape)),
            "load": self.load[:, None] * np.exp(rng.normal(0.0, 0.05, shape)),
        }

    def result_row(self, i: int, night: dict[str, np.ndarray]) -> dict[str, Any]:
        """Row ``i`` as a stored result row (the fields the samples are made from)."""
        model, backend, scheme, device = self.key(i)
        return {
            "model": model,
            "backend": backend,
            "scheme": scheme,
            "device_id": device,
            "ok": True,
            "valid": True,
            "role": "candidate",
            "batch_size": 1,
            "trial_medians_ms": night["medians"][i].tolist(),
            "trials_detail": [
                {"valid": True, "peak_rss_bytes": int(r), "load_time_s": float(t)}
                for r, t in zip(night["rss"][i], night["load"][i], strict=True)
            ],
            "model_size_bytes": int(self.size[i]),
            "accuracy": {"top1": float(self.outcomes[i].mean())},
            "example_outcomes": self.outcomes[i].astype(int).tolist(),
        }

    def measurement(self, i: int, task: TaskRecord, night: dict[str, np.ndarray]) -> Any:
        """Row ``i`` as an agent's result (three samples a trial around its median)."""
        trials = [
            TrialOutcome(
                samples_ms=[m * 0.99, m, m * 1.01],
                warmup_iterations=1,
                duration_s=1.0,
                load_time_s=float(t),
                peak_rss_bytes=int(r),
                load_rss_delta_bytes=0,
                valid=True,
                invalid_reason="",
            )
            for m, r, t in zip(night["medians"][i], night["rss"][i], night["load"][i], strict=True)
        ]
        return MeasurementResult(
            task_id=task.task_id,
            attempt=1,
            lease_id="lease",
            agent_id="agent",
            device_id=task.device_id,
            ok=True,
            backend_version="1.0",
            trials=trials,
            accuracy={"top1": float(self.outcomes[i].mean())},
            model_size_bytes=int(self.size[i]),
            example_outcomes=self.outcomes[i].astype(int).tolist(),
        )


def _night_run(n: int, finished: bool = True) -> NightlyRun:
    return NightlyRun(
        run_id=f"n-{n:012x}",
        suite=SUITE,
        night=f"night-{n}",
        status="passed" if finished else "running",
        created_at=1_700_000_000.0 + n * DAY,
        campaign_id=f"c-{n:06d}",
        baseline_run_id=f"n-{n - 1:012x}" if n else None,
        finished_at=1_700_000_000.0 + n * DAY + 3600.0 if finished else None,
    )


def _store_rows(store: ResultsStore, corpus: Corpus, n: int) -> None:
    """Night ``n``'s result rows through the store API (one transaction)."""
    night = corpus.night(n)
    cid = f"c-{n:06d}"
    at = 1_700_000_000.0 + n * DAY
    tasks = []
    for i in range(corpus.rows):
        model, backend, scheme, device = corpus.key(i)
        tasks.append(
            TaskRecord(
                task_id=f"{cid}-t{i:06d}",
                campaign_id=cid,
                model=model,
                backend=backend,
                scheme=scheme,
                device_id=device,
                device_name=device,
                artifact_sha256="a" * 64,
                artifact_size=1,
                artifact_name=f"{model}.onnx",
                eval_sha256=None,
                eval_size=0,
                settings=MeasureSettings(),
                options={},
                selector={},
                measure_key="",
                created_at=at,
                updated_at=at,
            )
        )
    record = CampaignRecord(cid, "nightly", "name: nightly\n", CampaignStatus.RUNNING, at)
    with store.batch():
        store.create_campaign(record, tasks)
        for i, task in enumerate(tasks):
            store.ingest_result(task, corpus.measurement(i, task, night), task.device_name)


def _store_summaries(store: ResultsStore, corpus: Corpus, n: int) -> None:
    """Night ``n``'s per-series summaries straight into ``series_nights``."""
    night, run = corpus.night(n), _night_run(n)
    samples: dict[SeriesKey, Sample] = {}
    for i in range(corpus.rows):
        key = corpus.key(i)
        for metric, sample in samples_from_row(
            corpus.result_row(i, night), run.run_id, run.created_at
        ).items():
            samples[SeriesKey(*key, metric)] = sample
    store.put_series_night(run.run_id, SUITE, samples)


def build(path: Path, rows: int, nights: int, all_rows: bool) -> None:
    """A store with ``nights`` finished nights and tonight (night ``nights``) running:
    result rows for every night when ``all_rows``, else summaries for the stored nights
    and result rows for the baseline night and tonight only."""
    corpus = Corpus(rows, nights)
    with ResultsStore.open(f"sqlite:///{path}") as store:
        for n in range(nights + 1):
            store.create_nightly_run(_night_run(n, finished=n < nights))
            if all_rows or n >= nights - 1:
                _store_rows(store, corpus, n)
            if not all_rows and n < nights:
                _store_summaries(store, corpus, n)


def step(url: str, nights: int, new: bool) -> dict[str, Any]:
    """One nightly comparison of tonight (night ``nights``) as the runner does it."""
    start = time.perf_counter()
    with ResultsStore.open(url) as store:
        run, baseline = _night_run(nights, finished=False), _night_run(nights - 1)
        assert run.campaign_id and baseline.campaign_id
        rows = store.results_for_campaign(run.campaign_id)
        candidate = series_samples(rows, run.run_id, run.created_at)
        base = series_samples(
            store.results_for_campaign(baseline.campaign_id), baseline.run_id, baseline.created_at
        )
        verdicts = judge_night(base, candidate)
        if new:
            store.put_series_night(run.run_id, SUITE, candidate)
            histories = stored_histories(store, run, candidate)
        else:
            histories = stored_histories_from_rows(store, run, candidate)
        notes = _drift_notes(histories)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "series": len(histories),
        "verdicts": [verdict_to_dict(v) for v in verdicts],
        "change_points": [change_point_to_dict(c) for h in histories for c in h.change_points],
        "notes": notes,
    }


def _in_child(url: str, nights: int, new: bool) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(step, (url, nights, new))


def _backfill(path: Path, nights: int) -> None:
    """Summaries of the stored nights from their rows (what migration v9 does)."""
    from coordinator.nightly.runner import _samples_from_rows

    with ResultsStore.open(f"sqlite:///{path}") as store:
        for n in range(nights):
            run = _night_run(n)
            store.put_series_night(run.run_id, SUITE, _samples_from_rows(store, run))


def main(argv: list[str] | None = None) -> int:
    """Build the stores, time the steps, print the table; 1 when a check fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=10_000, help="result rows a night")
    parser.add_argument("--old-series", type=int, default=1_000, help="rows for the old path")
    parser.add_argument("--nights", type=int, default=60, help="stored nights of history")
    args = parser.parse_args(argv)
    out: list[tuple[str, int, dict[str, Any]]] = []
    ok = True
    with tempfile.TemporaryDirectory(prefix="nightly-scale-") as tmp:
        small = Path(tmp) / "small.sqlite"
        t0 = time.perf_counter()
        build(small, args.old_series, args.nights, all_rows=True)
        took = time.perf_counter() - t0
        print(f"built {args.old_series} rows x {args.nights + 1} nights in {took:.0f} s")
        old = _in_child(f"sqlite:///{small}", args.nights, new=False)
        out.append(("old (rows, per series)", args.old_series, old))
        _backfill(small, args.nights)
        new_small = _in_child(f"sqlite:///{small}", args.nights, new=True)
        out.append(("new (series_nights)", args.old_series, new_small))
        for name in ("verdicts", "change_points", "notes"):
            same = old[name] == new_small[name]
            ok &= same
            print(f"same {name} as the old path: {same} ({len(old[name])})")
        big = Path(tmp) / "big.sqlite"
        t0 = time.perf_counter()
        build(big, args.series, args.nights, all_rows=False)
        took = time.perf_counter() - t0
        print(f"built {args.series} rows x {args.nights + 1} nights in {took:.0f} s")
        new_big = _in_child(f"sqlite:///{big}", args.nights, new=True)
        out.append(("new (series_nights)", args.series, new_big))
    print()
    print("| path | rows/night | series | nights | seconds | peak RSS (MB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, rows, r in out:
        print(
            f"| {name} | {rows:,} | {r['series']:,} | {args.nights + 1} | {r['seconds']:.1f} "
            f"| {r['rss'] / 2**20:.0f} |"
        )
    ratio = old["seconds"] / new_small["seconds"]
    print(f"\nold/new time at {args.old_series:,} rows: x{ratio:.1f}")
    meets = new_big["seconds"] < TARGET_S and new_big["rss"] < TARGET_BYTES
    print(
        f"targets at {args.series:,} rows: < {TARGET_S:.0f} s and < 1 GB: "
        + ("met" if meets else "NOT met")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
