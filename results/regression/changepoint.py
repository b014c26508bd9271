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

import itertools
import math
from dataclasses import dataclass

import numpy as np

from results.regression.types import ChangePoint, Sample, SeriesKey

MIN_SEGMENT = 3  # nights on each side of a change point
MIN_MAGNITUDE = 0.01  # relative change of segment means; half the 2% nightly latency gate
ALPHA = 0.01  # permutation-test significance of each split
PERMUTATIONS = 199
_BATCH = 50  # permutations per batch (early stop between batches)


def split_statistics(values: np.ndarray, min_segment: int) -> np.ndarray:
    """Energy divergence ``Q(tau)`` for every split of each row of ``values``.

    ``values`` has shape ``(batch, n)``; the result has shape ``(batch, n + 1)`` with
    ``-inf`` where a side would be shorter than ``min_segment``; column ``tau`` is the
    split whose second segment starts at index ``tau``.
    """
    batch, n = values.shape
    dist = np.abs(values[:, :, None] - values[:, None, :])
    upper = np.triu(dist, k=1)
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
        perm_max = split_statistics(shuffled, min_segment).max(axis=1)
        exceed += int(np.count_nonzero(perm_max >= observed * (1.0 - 1e-12)))
        done += size
        if exceed >= allowed:
            break
    return tau, (1.0 + exceed) / (1.0 + done)


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
