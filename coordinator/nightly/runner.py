"""One night of a suite: measure, compare with the baseline night, confirm, record.

1. The baseline night is chosen by the suite's policy (last passing night by default).
2. The suite's campaign is measured afresh; series whose configuration changed since
   the baseline night (artifact, options, eval data) have the baseline configuration
   measured again beside them, interleaved in randomised blocks on the same device.
3. Every series x metric is judged (:func:`results.regression.detect.judge_night`):
   against the interleaved replay where there is one; a timing series without one is
   judged sequentially with the night as the unit, against the suite's stored nights of
   the baseline's software identity scaled by the device's level from control series
   (:mod:`coordinator.nightly.sequential`).
4. A flagged series is measured again in fresh runs (confirmation: one interleaved run
   with a replay; :data:`~results.regression.detect.CONFIRM_RUNS` runs sequentially,
   judged against stored nights, not the first check's baseline trials); only a
   regression that holds there is reported as confirmed.
5. History: change points over the suite's nights catch drifts below the nightly gate.
6. The night is stored (:class:`results.records.NightlyRun`) with its verdicts.

Statistics live in :mod:`results.regression` (pure); this module does the I/O.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.client import ControlClient
from coordinator.interleave import BASELINE, CANDIDATE, RunShape
from coordinator.nightly.sequential import (
    NightSeries,
    confirm_runs,
    confirm_trials,
    judge_sequential,
)
from coordinator.nightly.suite import Suite, load_suite
from coordinator.runner import submit_and_follow
from coordinator.spec import CampaignSpec
from edgefarm.errors import UsageError
from edgefarm.gc_pause import gc_paused
from results.records import NightlyRun
from results.regression.codec import change_point_to_dict, verdict_to_dict
from results.regression.collect import row_series, series_label, series_samples
from results.regression.detect import (
    CONFIRM_RUNS,
    NightSamples,
    confirm,
    history,
    judge_night,
    many_histories,
    regressions,
    to_confirm,
)
from results.regression.types import (
    Direction,
    Sample,
    SeriesHistory,
    SeriesKey,
    Status,
    Verdict,
)
from results.rows import series_fingerprint
from results.store import ResultsStore, SeriesValues

# "One block per trial": more blocks than any suite has trials.
PER_TRIAL_BLOCKS = 10_000
# How many earlier nights feed the change-point history.
HISTORY_NIGHTS = 60

Samples = dict[SeriesKey, Sample]


@dataclass
class NightOutcome:
    """What one night found."""

    run: NightlyRun
    baseline: NightlyRun | None
    rows: list[dict[str, Any]]
    verdicts: list[Verdict]
    histories: list[SeriesHistory]
    notes: list[str] = field(default_factory=list)
    tasks_failed: int = 0

    @property
    def regressions(self) -> list[Verdict]:
        """Regressions that fail the night: confirmed, or not re-measured."""
        return regressions(self.verdicts)


def choose_baseline(store: ResultsStore, suite: Suite) -> NightlyRun | None:
    """The baseline night by the suite's policy; None on a suite's first night."""
    if suite.baseline.startswith("n-"):
        run = store.get_nightly_run(suite.baseline)
        if run is None or run.suite != suite.name:
            raise UsageError(f"suite {suite.name}: no nightly run '{suite.baseline}'")
        if not run.campaign_id or not run.finished_at:
            raise UsageError(
                f"suite {suite.name}: nightly run {run.run_id} ({run.status}) has no "
                "finished measurements to be a baseline"
            )
        return run
    finished = [r for r in store.nightly_runs(suite.name) if r.campaign_id and r.finished_at]
    if suite.baseline == "last-passing":
        finished = [r for r in finished if r.status == "passed"]
    return finished[-1] if finished else None


def night_label(now: float | None = None) -> str:
    """The default label of a night: its UTC date and time."""
    return datetime.fromtimestamp(now or time.time(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class NightlyRunner:
    """Runs a suite's night through a coordinator and records it in the store."""

    def __init__(
        self, client: ControlClient, store: ResultsStore, echo: Callable[[str], None] = print
    ) -> None:
        self.client = client
        self.store = store
        self.echo = echo

    def run(self, suite_path: Path, night: str | None = None) -> NightOutcome:
        """Measure and judge one night of the suite in ``suite_path``."""
        suite, campaign_path, spec = load_suite(suite_path)
        baseline = choose_baseline(self.store, suite)
        now = time.time()
        run = NightlyRun(
            run_id="n-" + uuid.uuid4().hex[:12],
            suite=suite.name,
            night=night or night_label(now),
            status="running",
            created_at=now,
            baseline_run_id=baseline.run_id if baseline else None,
        )
        self.store.create_nightly_run(run)
        try:
            return self._night(suite, campaign_path, spec, run, baseline)
        except BaseException as error:
            self.store.update_nightly_run(
                run.run_id,
                status="failed",
                finished_at=time.time(),
                summary={"error": f"{type(error).__name__}: {error}"},
            )
            raise

    def _night(
        self,
        suite: Suite,
        campaign_path: Path,
        spec: CampaignSpec,
        run: NightlyRun,
        baseline: NightlyRun | None,
    ) -> NightOutcome:
        seed = int(run.run_id[2:], 16)
        shape = RunShape(
            baseline_campaign_id=baseline.campaign_id or "" if baseline else "",
            blocks=suite.blocks or PER_TRIAL_BLOCKS,
            seed=seed,
        )
        self.echo(
            f"night {run.night} of suite {suite.name} ({run.run_id}); baseline: "
            + (f"{baseline.night} ({baseline.run_id})" if baseline else "none yet")
        )
        campaign_id, failed, _ = submit_and_follow(
            self.client, campaign_path, fresh=True, shape=shape
        )
        run.campaign_id = campaign_id
        self.store.update_nightly_run(run.run_id, campaign_id=campaign_id)
        rows = self.store.results_for_campaign(campaign_id)
        candidate = series_samples(rows, run.run_id, run.created_at, CANDIDATE)
        notes: list[str] = []
        if failed:
            notes.append(f"{failed} task(s) failed in campaign {campaign_id}")
        verdicts: list[Verdict] = []
        if baseline is None:
            notes.append("first night of the suite: it becomes the baseline")
        else:
            base_rows = self._baseline_rows(baseline, rows)
            base_samples = series_samples(base_rows, baseline.run_id, baseline.created_at)
            verdicts = judge_night(base_samples, candidate)
            seq = self._sequential_context(run, base_rows, rows, candidate, base_samples)
            verdicts, seq.run_level = judge_sequential(
                verdicts, candidate, seq.nights, seq.tonight_ids, seq.builds, seq.replayed
            )
            verdicts = self._unattributable(verdicts, base_rows, rows)
            flagged = to_confirm(verdicts)
            if flagged and suite.confirm:
                verdicts, confirm_id, confirm_failed = self._confirm(
                    campaign_path, shape, baseline, verdicts, flagged, run, seq
                )
                run.confirm_campaign_id = confirm_id
                if confirm_failed:
                    failed += confirm_failed
                    notes.append(f"{confirm_failed} task(s) failed in confirmation {confirm_id}")
            planned = {(v.model.name, v.backend, v.scheme) for v in spec.variants()}
            gone = {k for k in base_samples if k not in candidate}
            missing = sorted(
                {series_label(k) for k in gone if (k.model, k.backend, k.scheme) in planned}
            )
            dropped = sorted(
                {series_label(k) for k in gone if (k.model, k.backend, k.scheme) not in planned}
            )
            if missing:
                # Still asked for, measured by the baseline night, not tonight (a device
                # offline, a task lost): such a night is never "passed".
                failed += len(missing)
                notes.append(f"not measured tonight (measured by the baseline night): {missing}")
            if dropped:
                notes.append(f"no longer in the suite's campaign: {dropped}")
        self.store.put_series_night(run.run_id, suite.name, candidate)
        histories = stored_histories(self.store, run, candidate)
        outcome = NightOutcome(run, baseline, rows, verdicts, histories, notes, failed)
        notes += _drift_notes(histories)
        run.status = "regressed" if outcome.regressions else "failed" if failed else "passed"
        run.finished_at = time.time()
        run.summary = {
            "verdicts": [verdict_to_dict(v) for v in verdicts if v.status is not Status.UNCHANGED],
            "series_compared": len(verdicts),
            "change_points": [change_point_to_dict(c) for h in histories for c in h.change_points],
            "notes": notes,
            "tasks_failed": failed,
        }
        self.store.update_nightly_run(
            run.run_id,
            status=run.status,
            finished_at=run.finished_at,
            confirm_campaign_id=run.confirm_campaign_id,
            summary=run.summary,
        )
        return outcome

    def _baseline_rows(
        self, baseline: NightlyRun, rows: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """The baseline side's rows: tonight's interleaved replay of a series where there
        is one, else the baseline night's own rows (all labelled as candidates)."""
        assert baseline.campaign_id is not None
        replay = [dict(r, role=CANDIDATE) for r in rows if r.get("role") == BASELINE]
        replayed = {row_series(r) for r in replay}
        stored = self.store.results_for_campaign(baseline.campaign_id)
        kept = [
            r
            for r in stored
            if r.get("role", CANDIDATE) == CANDIDATE and row_series(r) not in replayed
        ]
        return kept + replay

    def _unattributable(
        self,
        verdicts: list[Verdict],
        base_rows: list[dict[str, Any]],
        rows: list[dict[str, Any]],
    ) -> list[Verdict]:
        """Regressions of series where nothing the farm controls changed (same artifact,
        eval data, options, settings, runtime version and environment) are the device's
        state moving, not a toolchain or model regression: they are marked refuted (and
        history's change points still show a lasting shift)."""
        options = self._task_options([*base_rows, *rows])
        before = software_identities(base_rows, options)
        after = software_identities(
            [r for r in rows if r.get("role", CANDIDATE) == CANDIDATE], options
        )
        out = []
        for v in verdicts:
            series = series_label(v.key)
            if (
                v.status is Status.REGRESSION
                and series in before
                and before[series] == after.get(series)
            ):
                v = dataclasses.replace(
                    v,
                    confirmed=False,
                    message=(
                        f"{v.message}; nothing measured changed (artifact, options, runtime "
                        "and environment are the baseline's): device state, not a regression"
                    ).strip("; "),
                )
            out.append(v)
        return out

    def _task_options(self, rows: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
        """Backend options of each row's task, by task id."""
        found: dict[str, dict[str, str]] = {}
        for campaign_id in {r["campaign_id"] for r in rows}:
            for task in self.store.tasks_for_campaign(campaign_id):
                found[task.task_id] = task.options
        return found

    def _sequential_context(
        self,
        run: NightlyRun,
        base_rows: list[dict[str, Any]],
        rows: list[dict[str, Any]],
        candidate: Samples,
        base_samples: Samples,
    ) -> SequentialContext:
        """What the sequential series' checks need: the suite's stored nights (samples
        and software identities), tonight's and the baseline's identities."""
        options = self._task_options([*base_rows, *rows])
        tonight_rows = [r for r in rows if r.get("role", CANDIDATE) == CANDIDATE]
        replayed = frozenset(row_series(r) for r in rows if r.get("role") == BASELINE)
        # Stored nights serve only the series without a replay tonight, and their
        # controls (same device): read just those devices' rows, of the nights kept.
        devices = {k.device_id for k in candidate if series_label(k) not in replayed}
        kept = [
            night
            for night in self.store.nightly_runs(run.suite)
            if night.run_id != run.run_id
            and night.campaign_id
            and night.finished_at
            and night.created_at <= run.created_at
        ][-HISTORY_NIGHTS:]
        nights = []
        for night in kept if devices else []:
            assert night.campaign_id is not None
            stored = [
                r
                for r in self.store.iter_campaign_results(night.campaign_id)
                if r.get("role", CANDIDATE) == CANDIDATE and r["device_id"] in devices
            ]
            nights.append(
                NightSeries(
                    night.run_id,
                    series_samples(stored, night.run_id, night.created_at),
                    software_identities(stored, self._task_options(stored)),
                )
            )
        return SequentialContext(
            nights=nights,
            candidate=candidate,
            base_samples=base_samples,
            tonight_ids=software_identities(tonight_rows, options),
            builds=software_identities(base_rows, options),
            replayed=replayed,
        )

    def _confirm(
        self,
        campaign_path: Path,
        shape: RunShape,
        baseline: NightlyRun,
        verdicts: list[Verdict],
        flagged: list[Verdict],
        run: NightlyRun,
        seq: SequentialContext,
    ) -> tuple[list[Verdict], str, int]:
        """Re-measure the flagged series in fresh runs; mark each verdict confirmed or not.

        A series with a baseline replay is re-measured interleaved once more and judged
        against tonight's new replay. A sequential series judged at run level gets
        :data:`CONFIRM_RUNS` fresh runs whose mean is judged against its stored nights
        (:func:`coordinator.nightly.sequential.confirm_runs`); one judged on trials
        (history too short) against an independent baseline of other stored nights
        (:func:`coordinator.nightly.sequential.confirm_trials`), never against the same
        stored trials as its first check.
        """
        series = frozenset(series_label(v.key) for v in flagged)
        self.echo(f"confirming {len(flagged)} flagged series in a fresh run: {sorted(series)}")
        again = dataclasses.replace(shape, series=series, seed=shape.seed + 1)
        campaign_id, failed, _ = submit_and_follow(
            self.client, campaign_path, fresh=True, shape=again
        )
        rows = self.store.results_for_campaign(campaign_id)
        candidate = series_samples(rows, run.run_id, time.time(), CANDIDATE)
        runs: dict[SeriesKey, list[Sample]] = {
            v.key: [candidate[v.key]]
            for v in flagged
            if v.key in seq.run_level and v.key in candidate
        }
        more = frozenset(series_label(v.key) for v in flagged if v.key in seq.run_level)
        extra = []
        for r in range(1, CONFIRM_RUNS if more else 1):
            self.echo(f"sequential confirmation run {r + 1} of {CONFIRM_RUNS}: {sorted(more)}")
            shape_r = dataclasses.replace(shape, series=more, seed=shape.seed + 1 + r)
            extra_id, extra_failed, _ = submit_and_follow(
                self.client, campaign_path, fresh=True, shape=shape_r
            )
            failed += extra_failed
            extra.append(extra_id)
            found = series_samples(
                self.store.results_for_campaign(extra_id), run.run_id, time.time(), CANDIDATE
            )
            for k, sample in found.items():
                if k in runs:
                    runs[k].append(sample)
        base_rows = self._baseline_rows(baseline, rows)
        base = series_samples(base_rows, baseline.run_id, baseline.created_at)
        replayed = [v.key for v in flagged if series_label(v.key) in seq.replayed]
        recheck = {
            v.key: v
            for v in judge_night(
                {k: base[k] for k in replayed if k in base},
                {k: candidate[k] for k in replayed if k in candidate},
            )
        }
        where = ", ".join([campaign_id, *extra])
        out = []
        for v in verdicts:
            if v in flagged:
                if v.key in seq.run_level:
                    if runs.get(v.key):
                        v = confirm_runs(
                            v, runs[v.key], seq.nights, seq.candidate, seq.tonight_ids, seq.builds
                        )
                        v = dataclasses.replace(v, message=f"{v.message} (in {where})")
                    else:
                        v = dataclasses.replace(
                            v, message=f"{v.message}; re-measurement in {where} could not judge it"
                        )
                    out.append(v)
                    continue
                if series_label(v.key) not in seq.replayed:
                    if v.key in candidate and v.key in seq.base_samples:
                        v = confirm_trials(
                            v,
                            seq.base_samples[v.key],
                            candidate[v.key],
                            seq.nights,
                            seq.candidate,
                            seq.tonight_ids,
                            seq.builds,
                        )
                        v = dataclasses.replace(v, message=f"{v.message} (in {campaign_id})")
                    else:
                        note = f"re-measurement in {campaign_id} could not judge it"
                        v = dataclasses.replace(v, message=f"{v.message}; {note}")
                    out.append(v)
                    continue
                second = recheck.get(v.key)
                if second is None or second.status is Status.INSUFFICIENT:
                    # The re-run could not judge (failed tasks, too few trials): the
                    # regression stands unconfirmed rather than being waved through.
                    note = f"re-measurement in {campaign_id} could not judge it"
                else:
                    v = confirm(v, second)
                    note = f"re-measured in {campaign_id}: x{second.ratio:.3f}, {second.status}"
                v = dataclasses.replace(v, message=f"{v.message}; {note}".strip("; "))
            out.append(v)
        return out, campaign_id, failed


@dataclass
class SequentialContext:
    """A night's inputs for its sequential series (see :mod:`coordinator.nightly.sequential`)."""

    nights: list[NightSeries]  # the suite's stored nights before tonight, oldest first
    candidate: Samples  # tonight's samples
    base_samples: Samples  # the baseline side's samples (replay or baseline night)
    tonight_ids: dict[str, frozenset[str]]  # software identity per series tonight
    builds: dict[str, frozenset[str]]  # ... on the baseline side
    replayed: frozenset[str]  # series with an interleaved baseline replay tonight
    run_level: set[SeriesKey] = field(default_factory=set)  # judged with the night as unit


@gc_paused()
def stored_histories(
    store: ResultsStore, run: NightlyRun, tonight: Samples | None = None
) -> list[SeriesHistory]:
    """The nightly history of every series ``run`` measured, with change points.

    Nights: the suite's finished nights up to ``run`` (the last :data:`HISTORY_NIGHTS`)
    and ``run`` itself (``tonight``'s samples when given, else its stored summaries or
    rows). Stored nights are read from their per-series summaries (``series_nights``,
    numbers only, one index scan per night); a night without summaries (stored before
    they existed, or never judged) is computed from its result rows.
    """
    nights = _history_nights(store, run)
    if tonight is None:
        tonight = store.series_night(run.run_id) or _samples_from_rows(store, run)
    keys = sorted(tonight, key=SeriesKey.label)
    if not keys:
        return []
    prints = np.array([series_fingerprint(k) for k in keys], dtype=np.int64)
    order = np.argsort(prints, kind="stable")
    stored = store.series_night_values(n.run_id for n in nights if n.run_id != run.run_id)
    base_id = run.baseline_run_id or run.run_id
    columns, full = [], {}
    for night in nights:
        if night.run_id == run.run_id:
            found: SeriesValues | None = _as_values({k: tonight[k] for k in keys})
            full_night: Samples = tonight
        else:
            found = stored.get(night.run_id)
            full_night = {}
            if found is None:
                full_night = _samples_from_rows(store, night)
                found = _as_values(full_night)
            elif night.run_id == base_id:
                full_night = store.series_night(night.run_id)
        assert found is not None
        columns.append(_column(found, prints, order))
        if night.run_id in (run.run_id, base_id):
            full[len(columns) - 1] = full_night
    ats = [n.created_at for n in nights]
    by_time = sorted(range(len(nights)), key=ats.__getitem__)  # stable, as history sorts
    present = np.stack([columns[i][0] for i in by_time], axis=1)
    values = np.stack([columns[i][1] for i in by_time], axis=1)
    ids = [(nights[i].run_id, nights[i].created_at) for i in by_time]
    full_cols = [(col, full[i]) for col, i in enumerate(by_time) if i in full]
    every = [bool(x) for x in np.all(present, axis=1).tolist()]
    series = []
    for row, key in enumerate(keys):
        if every[row]:  # measured every night (the usual case): shared night ids
            given = {col: night[key] for col, night in full_cols if key in night}
            series.append((key, NightSamples(ids, values[row], given)))
            continue
        where = np.flatnonzero(present[row]).tolist()
        position = {col: pos for pos, col in enumerate(where)}
        given = {
            position[col]: night[key]
            for col, night in full_cols
            if col in position and key in night
        }
        series.append((key, NightSamples([ids[c] for c in where], values[row, where], given)))
    return many_histories(series, base_id)


def _history_nights(store: ResultsStore, run: NightlyRun) -> list[NightlyRun]:
    """The nights of ``run``'s history: the suite's finished nights up to it, and it."""
    return [
        r
        for r in store.nightly_runs(run.suite)
        if r.campaign_id
        and r.created_at <= run.created_at
        and (r.finished_at or r.run_id == run.run_id)
    ][-(HISTORY_NIGHTS + 1) :]


def _samples_from_rows(store: ResultsStore, night: NightlyRun) -> Samples:
    """A night's samples computed from its stored result rows."""
    if not night.campaign_id:
        return {}
    rows = store.results_for_campaign(night.campaign_id)
    return series_samples(rows, night.run_id, night.created_at)


def _as_values(samples: Samples) -> SeriesValues:
    """Fingerprints (ascending) and values of a night's samples."""
    prints = np.array([series_fingerprint(k) for k in samples], dtype=np.int64)
    values = np.array([s.value for s in samples.values()], dtype=float)
    order = np.argsort(prints, kind="stable")
    return SeriesValues(prints[order], values[order])


def _column(
    found: SeriesValues, prints: np.ndarray, order: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Which of the series ``prints`` a night measured, and their values there."""
    present = np.zeros(len(prints), dtype=bool)
    values = np.full(len(prints), np.nan)
    if len(found.series):
        wanted = prints[order]
        at = np.searchsorted(found.series, wanted)
        at_ok = np.minimum(at, len(found.series) - 1)
        hit = (at < len(found.series)) & (found.series[at_ok] == wanted)
        present[order[hit]] = True
        values[order[hit]] = found.values[at_ok[hit]]
    return present, values


@gc_paused()
def stored_histories_from_rows(
    store: ResultsStore, run: NightlyRun, tonight: Samples | None = None
) -> list[SeriesHistory]:
    """:func:`stored_histories` recomputed from every night's result rows, one series
    at a time (how it was done before ``series_nights``; kept as the reference)."""
    series: dict[SeriesKey, list[Sample]] = {}
    measured: set[SeriesKey] = set()
    for night in _history_nights(store, run):
        if night.run_id == run.run_id and tonight is not None:
            found = tonight
        else:
            found = _samples_from_rows(store, night)
        for key, sample in found.items():
            series.setdefault(key, []).append(sample)
        if night.run_id == run.run_id:
            measured = set(found)
    base_id = run.baseline_run_id or run.run_id
    return [
        history(key, samples, base_id)
        for key, samples in sorted(series.items(), key=lambda kv: kv[0].label())
        if key in measured
    ]


def _drift_notes(histories: list[SeriesHistory]) -> list[str]:
    """The latest change point of each series when it went the bad way: its new
    segment reaches tonight, so the series is still shifted."""
    notes = []
    for h in histories:
        if not h.change_points:
            continue
        c = max(h.change_points, key=lambda c: c.index)
        worse = c.after > c.before if h.direction is Direction.LOWER else c.after < c.before
        if worse:
            notes.append(
                f"drift: {h.key.label()} shifted x{c.ratio:.3f} from night "
                f"{c.index + 1} of {len(h.samples)} (run {c.run_id})"
            )
    return notes


# Environment keys that name who measured, not what was measured.
VOLATILE_ENVIRONMENT = frozenset({"agent"})


def software_identities(
    rows: list[dict[str, Any]], options: dict[str, dict[str, str]]
) -> dict[str, frozenset[str]]:
    """Per series: what was measured - artifact, eval data, options, settings (trial
    counts aside), runtime version and environment - one JSON string per distinct one."""
    out: dict[str, set[str]] = {}
    for row in rows:
        if not row.get("ok"):
            continue
        settings = {
            k: v for k, v in (row.get("settings") or {}).items() if k not in ("trials", "evaluate")
        }
        environment = {
            k: v for k, v in (row.get("environment") or {}).items() if k not in VOLATILE_ENVIRONMENT
        }
        identity = json.dumps(
            [
                row["artifact_sha256"],
                row.get("eval_sha256"),
                options.get(row["task_id"], {}),
                settings,
                row.get("backend_version"),
                environment,
            ],
            sort_keys=True,
        )
        out.setdefault(row_series(row), set()).add(identity)
    return {k: frozenset(v) for k, v in out.items()}
