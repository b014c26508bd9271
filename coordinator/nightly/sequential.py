"""The nightly runner's sequential mode: series with no interleaved baseline replay.

A series whose baseline build cannot be measured again tonight is compared with stored
nights. Run-level effects (the run's phase, a slow stretch inside it, correlated
trials) do not cancel between nights, so the night is the unit: tonight's run is
judged against the series' stored nights of the baseline's software identity, each
scaled by the device's own level change measured on control series (same device and
metric, software identity unchanged between that night and tonight), with the
night-to-night spread as the yardstick (:func:`results.regression.detect.judge_runs`).
A flag is confirmed by :data:`~results.regression.detect.CONFIRM_RUNS` fresh runs whose
mean is judged the same way at the stricter
:data:`~results.regression.detect.SEQUENTIAL_CONFIRM_ALPHA`; the stored nights are
independent of those runs. Too short a history falls back to the trial-level check
against the baseline night, confirmed against an independent baseline
(:func:`results.regression.detect.sequential_baseline`).

Pure: samples and identities in, verdicts out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from results.regression import detect
from results.regression.collect import series_label
from results.regression.metrics import METRICS
from results.regression.types import MetricKind, Sample, SeriesKey, Status, Verdict

Samples = Mapping[SeriesKey, Sample]
Identities = Mapping[str, frozenset[str]]


@dataclass(frozen=True)
class NightSeries:
    """One stored night: its samples and, per series id, what it measured (the
    runner's ``software_identities``)."""

    run_id: str
    samples: Samples
    identities: Identities


def identity_id(identity: frozenset[str] | None) -> str:
    """One string for a series' software identity ("" when unknown)."""
    return "\n".join(sorted(identity or ()))


def _controls(
    key: SeriesKey, night: NightSeries, tonight: Samples, tonight_ids: Identities
) -> list[tuple[Sample, Sample]]:
    """(that night, tonight) samples of the control series of ``key`` for ``night``:
    the other series of its device and metric whose identity did not change."""
    series = series_label(key)
    pairs = []
    for other, sample in night.samples.items():
        label = series_label(other)
        if (other.device_id, other.metric) != (key.device_id, key.metric) or label == series:
            continue
        same = night.identities.get(label)
        if other in tonight and same is not None and same == tonight_ids.get(label):
            pairs.append((sample, tonight[other]))
    return pairs


def stored_nights(
    key: SeriesKey, nights: Sequence[NightSeries], tonight: Samples, tonight_ids: Identities
) -> list[detect.StoredNight]:
    """The series' stored nights with their builds and tonight's device level relative
    to each (:func:`results.regression.detect.night_level` of the control series)."""
    series = series_label(key)
    out = []
    for night in nights:
        sample = night.samples.get(key)
        if sample is None or series not in night.identities:
            continue
        level = detect.night_level(_controls(key, night, tonight, tonight_ids))
        out.append(detect.StoredNight(identity_id(night.identities[series]), sample, level))
    return out


def judge_sequential(
    verdicts: Iterable[Verdict],
    candidate: Samples,
    nights: Sequence[NightSeries],
    tonight_ids: Identities,
    builds: Identities,
    replayed: Iterable[str] = (),
) -> tuple[list[Verdict], set[SeriesKey]]:
    """The first check of the night's sequential timing series, the night as the unit.

    ``verdicts`` are the trial-level verdicts (:func:`detect.judge_night`); each timing
    verdict of a series not in ``replayed`` is replaced by the run-level verdict
    (:func:`detect.judge_runs` of tonight's run against ``nights``, the baseline build
    being ``builds[series]``) where the history is long enough; a folded mirror metric
    is judged the same way. Returns the verdicts and the keys judged at run level.
    """
    skip = set(replayed)
    out, run_level = [], set()
    for v in verdicts:
        metric = METRICS.get(v.key.metric)
        series = series_label(v.key)
        if metric is None or metric.kind is not MetricKind.TIMING or series in skip:
            out.append(v)
            continue
        build = identity_id(builds.get(series))
        stored = stored_nights(v.key, nights, candidate, tonight_ids)
        again = detect.judge_runs(v.key, [candidate[v.key]], stored, build)
        if again.status is Status.INSUFFICIENT:
            out.append(dataclasses.replace(v, message=f"{v.message}; {again.message}"))
            continue
        if v.mirror:
            mirror_key = dataclasses.replace(v.key, metric=v.mirror)
            if mirror_key in candidate:
                mirrored = stored_nights(mirror_key, nights, candidate, tonight_ids)
                m = detect.judge_runs(mirror_key, [candidate[mirror_key]], mirrored, build)
                again = dataclasses.replace(
                    again, mirror=v.mirror, mirror_baseline=m.baseline, mirror_candidate=m.candidate
                )
        out.append(dataclasses.replace(again, message=f"sequential: {again.message}"))
        run_level.add(v.key)
    return out, run_level


def confirm_runs(
    first: Verdict,
    runs: Sequence[Sample],
    nights: Sequence[NightSeries],
    candidate: Samples,
    tonight_ids: Identities,
    builds: Identities,
) -> Verdict:
    """``first`` (a run-level flag) marked by the mean of the fresh ``runs``, judged
    against the same stored nights at :data:`detect.SEQUENTIAL_CONFIRM_ALPHA`."""
    stored = stored_nights(first.key, nights, candidate, tonight_ids)
    build = identity_id(builds.get(series_label(first.key)))
    again = detect.judge_runs(first.key, runs, stored, build, detect.SEQUENTIAL_CONFIRM_ALPHA)
    if again.status is Status.INSUFFICIENT:
        return dataclasses.replace(first, message=f"{first.message}; {again.message}")
    marked = detect.confirm(first, again)
    note = f"{len(runs)} fresh run(s): x{again.ratio:.3f}, {again.status}"
    return dataclasses.replace(marked, message=f"{marked.message}; {note}")


def confirm_trials(
    first: Verdict,
    base: Sample,
    again: Sample,
    nights: Sequence[NightSeries],
    candidate: Samples,
    tonight_ids: Identities,
    builds: Identities,
) -> Verdict:
    """A trial-level sequential flag (history too short for the run-level test) judged
    against an independent baseline: the other stored nights of the baseline build
    (:func:`detect.sequential_baseline`), the device's level from control series."""
    series = series_label(first.key)
    build = builds.get(series)
    stored = [
        n.samples[first.key]
        for n in nights
        if first.key in n.samples and build is not None and n.identities.get(series) == build
    ]
    controls = []
    for other, tonight in candidate.items():
        label = series_label(other)
        if (other.device_id, other.metric) != (first.key.device_id, first.key.metric):
            continue
        if label == series:
            continue
        same = [
            n.samples[other]
            for n in nights
            if other in n.samples and n.identities.get(label) == tonight_ids.get(label)
        ]
        if same:
            controls.append((same, tonight))
    baseline, how = detect.sequential_baseline(first.key, base, stored, controls)
    independent = how.startswith("independent")
    marked = detect.confirm_sequential(first, baseline, again, independent)
    return dataclasses.replace(marked, message=f"{marked.message}; re-measured against {how}")
