"""Change points in a series' nightly history: E-divisive means style, pure and seeded.

The nightly gate compares one night with its baseline; a slow drift made of steps
below the gate passes it night after night. This module looks at the whole history
instead (Matteson & James 2014, "A nonparametric approach for multiple change point
analysis of multivariate data"; the E-Divisive means variant MongoDB uses on its
performance history):

1. For a segment of night values, the split ``tau`` maximising the energy-distance
   divergence between the values before and after it (``alpha = 1``)::

       Q(tau) = m n / (m + n) * (2/(m n) sum|x_i - y_j| - sum|x_i - x_k| / C(m, 2)
                                  - sum|y_j - y_l| / C(n, 2))

   with both sides at least ``min_segment`` nights long.
2. Its significance by a permutation test: the night values of the segment shuffled
   ``permutations`` times with a seeded :class:`numpy.random.Generator` (so a run is
   repeatable), ``p = (1 + #{Q_perm >= Q}) / (1 + permutations)``. Permutations run in
   batches and stop early once ``p < alpha`` is out of reach.
3. Recursive binary segmentation: a significant split is kept and both halves are
   searched again.
4. A magnitude filter: adjacent segments whose means differ by less than
   ``min_magnitude`` (relative to the earlier mean) are merged, smallest change first,
   so every reported change point moves the level by at least that much.

All statistics for every split of every permutation are computed at once with numpy
(cumulative sums over the pairwise-distance matrix): ``O(permutations x n^2)`` per
segment, a few milliseconds for 60 nights.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from results.regression.types import ChangePoint, Sample, SeriesKey

MIN_SEGMENT = 3  # nights on each side of a change point
MIN_MAGNITUDE = 0.01  # relative change of segment means; half the 2% nightly latency gate
ALPHA = 0.01  # permutation-test significance of each split
PERMUTATIONS = 199
_BATCH = 50  # permutations per batch (early stop between batches)


@functools.lru_cache(maxsize=64)
def _upper_mask(n: int) -> np.ndarray:
    mask = np.triu(np.ones((n, n)), k=1)
    mask.setflags(write=False)
    return mask


def split_statistics(values: np.ndarray, min_segment: int) -> np.ndarray:
    """Energy divergence ``Q(tau)`` for every split of each row of ``values``.

    ``values`` has shape ``(batch, n)``; the result has shape ``(batch, n + 1)`` with
    ``-inf`` where a side would be shorter than ``min_segment``; column ``tau`` is the
    split whose second segment starts at index ``tau``.
    """
    batch, n = values.shape
    upper = np.subtract(values[:, :, None], values[:, None, :])
    np.abs(upper, out=upper)
    upper *= _upper_mask(n)  # the upper triangle (k=1), zeros below: np.triu's figures
    col = upper.sum(axis=1)  # col[j] = sum_{i<j} d(i, j)
    row = upper.sum(axis=2)  # row[i] = sum_{j>i} d(i, j)
    zeros = np.zeros((batch, 1))
    within_left = np.concatenate([zeros, np.cumsum(col, axis=1)], axis=1)  # [0, tau)
    within_right = np.concatenate([np.cumsum(row[:, ::-1], axis=1)[:, ::-1], zeros], axis=1)
    total = within_left[:, -1:]
    cross = total - within_left - within_right
    tau = np.arange(n + 1, dtype=float)
    m, k = tau, n - tau
    with np.errstate(divide="ignore", invalid="ignore"):
        pairs_left = np.where(m >= 2, m * (m - 1) / 2.0, np.inf)
        pairs_right = np.where(k >= 2, k * (k - 1) / 2.0, np.inf)
        q = (m * k / n) * (
            2.0 * cross / (m * k) - within_left / pairs_left - within_right / pairs_right
        )
    lo = max(int(min_segment), 1)
    valid = (tau >= lo) & (tau <= n - lo)
    return np.where(valid[None, :], q, -np.inf)


@dataclass(frozen=True)
class _Split:
    index: int  # absolute index of the first night of the new segment
    p_value: float


def _best_split(
    values: np.ndarray,
    min_segment: int,
    alpha: float,
    permutations: int,
    rng: np.random.Generator,
) -> tuple[int, float] | None:
    """Best split of one segment and its permutation p-value (None: no valid split)."""
    q = split_statistics(values[None, :], min_segment)[0]
    tau = int(np.argmax(q))
    observed = float(q[tau])
    if not math.isfinite(observed) or observed <= 0.0:
        return None
    exceed, done = 0, 0
    # Early stop: p < alpha needs exceed < alpha * (permutations + 1) - 1 at the end.
    allowed = alpha * (permutations + 1) - 1.0
    while done < permutations:
        size = min(_BATCH, permutations - done)
        shuffled = rng.permuted(np.broadcast_to(values, (size, len(values))), axis=1)
        # The batch is drawn whole (the generator's stream stays the same), its rows
        # scored a few first: most segments are stopped after a handful of them.
        start = 0
        for stop in _stages(size):
            perm_max = split_statistics(shuffled[start:stop], min_segment).max(axis=1)
            exceed += int(np.count_nonzero(perm_max >= observed * (1.0 - 1e-12)))
            start = stop
            if exceed >= allowed:
                break
        done += start
        if exceed >= allowed:
            break
    return tau, (1.0 + exceed) / (1.0 + done)


def _stages(size: int) -> list[int]:
    """Row ends of the scoring steps of a drawn batch: 1, 2, 4, 8, ... then ``size``."""
    ends, end = [], 1
    while end < size:
        ends.append(end)
        end *= 2
    return [*ends, size]


def _segment(
    values: np.ndarray,
    start: int,
    stop: int,
    min_segment: int,
    alpha: float,
    permutations: int,
    rng: np.random.Generator,
    found: list[_Split],
) -> None:
    if stop - start < 2 * min_segment:
        return
    best = _best_split(values[start:stop], min_segment, alpha, permutations, rng)
    if best is None or best[1] >= alpha:
        return
    index = start + best[0]
    found.append(_Split(index, best[1]))
    _segment(values, start, index, min_segment, alpha, permutations, rng, found)
    _segment(values, index, stop, min_segment, alpha, permutations, rng, found)


def _relative_change(before: float, after: float) -> float:
    return abs(after - before) / abs(before) if before else math.inf


def _merge_small(values: np.ndarray, splits: list[_Split], min_magnitude: float) -> list[_Split]:
    """Drop the split with the smallest relative mean change below ``min_magnitude``
    (recomputing the merged segment means) until every remaining split passes."""
    kept = sorted(splits, key=lambda s: s.index)
    while kept:
        bounds = [0, *(s.index for s in kept), len(values)]
        means = [float(values[a:b].mean()) for a, b in itertools.pairwise(bounds)]
        changes = [_relative_change(means[i], means[i + 1]) for i in range(len(kept))]
        smallest = int(np.argmin(changes))
        if changes[smallest] >= min_magnitude:
            break
        del kept[smallest]
    return kept


def detect_change_points(
    key: SeriesKey,
    samples: list[Sample],
    *,
    min_segment: int = MIN_SEGMENT,
    min_magnitude: float = MIN_MAGNITUDE,
    alpha: float = ALPHA,
    permutations: int = PERMUTATIONS,
    seed: int = 0,
) -> list[ChangePoint]:
    """Change points in ``samples`` (night values in time order), earliest first.

    Each change point starts a segment of at least ``min_segment`` nights whose mean
    differs from the previous segment's by at least ``min_magnitude`` (relative) and
    whose split was significant at ``alpha`` by a permutation test seeded with ``seed``.
    ``before``/``after`` are the means of the adjacent final segments. Fewer than
    ``2 * min_segment`` nights, or any non-finite value: no change points.
    """
    values = np.asarray([s.value for s in samples], dtype=float)
    if len(values) < 2 * max(min_segment, 1) or not np.all(np.isfinite(values)):
        return []
    rng = np.random.default_rng(seed)
    found: list[_Split] = []
    _segment(values, 0, len(values), max(min_segment, 1), alpha, permutations, rng, found)
    kept = _merge_small(values, found, min_magnitude)
    bounds = [0, *(s.index for s in kept), len(values)]
    points = []
    for i, split in enumerate(kept):
        before = float(values[bounds[i] : bounds[i + 1]].mean())
        after = float(values[bounds[i + 1] : bounds[i + 2]].mean())
        points.append(
            ChangePoint(
                key=key,
                index=split.index,
                run_id=samples[split.index].run_id,
                before=before,
                after=after,
                p_value=split.p_value,
            )
        )
    return points


# ----------------------------------------------------------------- many series at once

_ROUNDS = (1, 2, 4, 8, 16, 32, 64, 128)  # permutation counts after which a test may stop
_CHUNK_ROWS = 128  # rows per split_statistics call (temporaries stay in cache)
_WORKERS = min(4, os.cpu_count() or 1)  # threads scoring chunks while one draws more


@dataclass(frozen=True)
class Found:
    """A change point as :func:`detect_many` reports it (``index`` into the series)."""

    index: int
    p_value: float
    before: float  # mean of the segment before
    after: float  # mean of the segment after


def _statistics(values: np.ndarray, min_segment: int, pool: Executor) -> np.ndarray:
    """:func:`split_statistics` of many rows, computed a chunk at a time in ``pool``
    (each row's figures are the same whatever the rows beside it)."""
    parts = [
        pool.submit(split_statistics, values[i : i + _CHUNK_ROWS], min_segment)
        for i in range(0, len(values), _CHUNK_ROWS)
    ]
    return np.concatenate([p.result() for p in parts])


def _permutation_maxima(
    values: np.ndarray,
    live: np.ndarray,
    size: int,
    gens: Mapping[int, np.random.Generator],
    min_segment: int,
    pool: Executor,
) -> np.ndarray:
    """The greatest split statistic of each of ``size`` more permutations of each
    ``live`` row of ``values`` (shape ``(len(live), size)``), each row's drawn from its
    own generator in turn. Drawing (Python, holding the GIL) goes on while ``pool``
    scores the rows already drawn (numpy, releasing it)."""
    group = max(1, _CHUNK_ROWS // size)  # rows of one series stay in one chunk
    parts = []
    for start in range(0, len(live), group):
        rows = live[start : start + group]
        drawn = np.repeat(values[rows], size, axis=0)
        for k, j in enumerate(rows.tolist()):
            block = drawn[k * size : (k + 1) * size]
            gens[j].permuted(block, axis=1, out=block)
        parts.append(pool.submit(_row_maxima, drawn, min_segment))
    return np.concatenate([p.result() for p in parts]).reshape(len(live), size)


def _row_maxima(values: np.ndarray, min_segment: int) -> np.ndarray:
    return split_statistics(values, min_segment).max(axis=1)


class _Generators(dict[int, np.random.Generator]):
    """Row ``j``'s own seeded generator, made when first drawn from (so while the pool
    computes)."""

    def __init__(self, seeds: Sequence[int]) -> None:
        super().__init__()
        self._seeds = seeds

    def __missing__(self, j: int) -> np.random.Generator:
        made = self[j] = np.random.default_rng(self._seeds[j])
        return made


def cannot_change(values: np.ndarray, min_segment: int, min_magnitude: float) -> bool:
    """Whether no change point of ``values`` can pass the magnitude filter, whatever the
    tests find: all values equal (no split has a positive statistic), or positive values
    whose segment means (every segment is at least ``min_segment`` long, so its mean lies
    between the least and greatest mean of windows ``min_segment`` to ``2 min_segment - 1``
    long) cannot differ by ``min_magnitude`` relative."""
    return bool(cannot_change_many(values[None, :], min_segment, np.array([min_magnitude]))[0])


def cannot_change_many(
    values: np.ndarray, min_segment: int, min_magnitudes: np.ndarray
) -> np.ndarray:
    """:func:`cannot_change` of each row of ``values`` (series of one length), with the
    row's own magnitude: the same answers, computed for all rows at once."""
    least, most = values.min(axis=1), values.max(axis=1)
    out = least == most
    check = ~out & (min_magnitudes > 0.0) & (least > 0.0)
    if not np.any(check):
        return out
    rows = values[check]
    csum = np.concatenate([np.zeros((len(rows), 1)), np.cumsum(rows, axis=1)], axis=1)
    lo, hi = np.full(len(rows), math.inf), np.full(len(rows), -math.inf)
    for width in range(min_segment, min(2 * min_segment, values.shape[1] + 1)):
        means = (csum[:, width:] - csum[:, :-width]) / width
        lo, hi = np.minimum(lo, means.min(axis=1)), np.maximum(hi, means.max(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        out[check] = (lo > 0.0) & ((hi - lo) / lo < min_magnitudes[check] * (1.0 - 1e-9))
    return out


def detect_many(
    series: Sequence[np.ndarray],
    seeds: Sequence[int],
    min_magnitudes: Sequence[float],
    *,
    min_segment: int = MIN_SEGMENT,
    alpha: float = ALPHA,
    permutations: int = PERMUTATIONS,
) -> list[list[Found]]:
    """:func:`detect_change_points` of many series (night values in time order), each
    with its own seed and magnitude: the same change points and p-values.

    The whole-series test runs for all series of one length together, each drawing its
    permutations from its own generator in the same order; a series stops as soon as it
    cannot be significant. Only the few significant series are searched further, one by
    one. Series where :func:`cannot_change` holds are not tested.
    """
    ms = max(min_segment, 1)
    found: list[list[_Split]] = [[] for _ in series]
    rngs: dict[int, np.random.Generator] = {}
    by_length: dict[int, list[int]] = {}
    for i, v in enumerate(series):
        if len(v) >= 2 * ms:
            by_length.setdefault(len(v), []).append(i)
    allowed = alpha * (permutations + 1) - 1.0
    with ThreadPoolExecutor(_WORKERS, thread_name_prefix="changepoint") as pool:
        for candidates in by_length.values():
            stacked = np.stack([np.asarray(series[i], dtype=float) for i in candidates])
            keep = np.all(np.isfinite(stacked), axis=1)
            magnitudes = np.array([min_magnitudes[i] for i in candidates], dtype=float)
            keep[keep] = ~cannot_change_many(stacked[keep], ms, magnitudes[keep])
            members = [i for i, kept in zip(candidates, keep.tolist(), strict=True) if kept]
            if not members:
                continue
            values = stacked[keep]
            q = _statistics(values, ms, pool)
            taus = np.argmax(q, axis=1)
            observed = q[np.arange(len(members)), taus]
            live = np.flatnonzero(np.isfinite(observed) & (observed > 0))
            thresholds = observed * (1.0 - 1e-12)
            exceed = np.zeros(len(members), dtype=np.int64)
            gens = _Generators([seeds[i] for i in members])
            done = 0
            for end in [*(r for r in _ROUNDS if r < permutations), permutations]:
                if not len(live):
                    break
                size = end - done
                perm_max = _permutation_maxima(values, live, size, gens, ms, pool)
                exceed[live] += np.count_nonzero(perm_max >= thresholds[live, None], axis=1)
                live, done = live[exceed[live] < allowed], end
            for j in live.tolist():  # never stopped: significant, with the p-value of all of them
                p_value = (1.0 + int(exceed[j])) / (1.0 + permutations)
                if p_value >= alpha:
                    continue
                i, tau = members[j], int(taus[j])
                found[i].append(_Split(tau, p_value))
                rngs[i] = gens[j]
    out: list[list[Found]] = [[] for _ in series]
    for i, rng in rngs.items():
        v = np.asarray(series[i], dtype=float)
        tau = found[i][0].index
        _segment(v, 0, tau, ms, alpha, permutations, rng, found[i])
        _segment(v, tau, len(v), ms, alpha, permutations, rng, found[i])
        kept = _merge_small(v, found[i], min_magnitudes[i])
        bounds = [0, *(s.index for s in kept), len(v)]
        out[i] = [
            Found(
                s.index,
                s.p_value,
                float(v[bounds[k] : bounds[k + 1]].mean()),
                float(v[bounds[k + 1] : bounds[k + 2]].mean()),
            )
            for k, s in enumerate(kept)
        ]
    return out
