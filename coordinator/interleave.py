"""Shaping a nightly run's tasks: baseline replay and randomised interleaved blocks.

A nightly candidate is compared with its baseline night. Where the baseline night
measured a *different* configuration of the same series (another artifact, other
backend options or eval data) and that artifact is still in the artifact store, the
baseline configuration is measured again in the same run ("baseline replay"), so
both sides see the same machine state. Each side's trials are split into blocks and
the blocks of one device run in rounds (a randomised complete block design): round
``i`` holds block ``i`` of every series and side on that device, in a seeded random
order. The scheduler runs one device's tasks in creation order, so the two sides
always alternate round by round and neither side owns the start or the end of a run.

Pure functions over task records: no store, no scheduler.
"""

from __future__ import annotations

import dataclasses
import random
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from edgefarm.domain import HUB_BACKEND, MeasureSettings, TaskStatus
from results.records import TaskRecord
from results.regression.collect import series_id

CANDIDATE = "candidate"
BASELINE = "baseline"


@dataclass(frozen=True)
class RunShape:
    """How a nightly run shapes a campaign's tasks (the default shapes nothing)."""

    baseline_campaign_id: str = ""
    blocks: int = 1  # split each task's trials into this many blocks
    series: frozenset[str] = field(default_factory=frozenset)  # empty: every series
    seed: int = 0

    @property
    def active(self) -> bool:
        """Whether this shape changes anything."""
        return bool(self.baseline_campaign_id or self.blocks > 1 or self.series)


def task_series(task: TaskRecord) -> str:
    """The series a task measures (``model/backend/scheme@device_id``)."""
    return series_id(task.model, task.backend, task.scheme, task.device_id)


def same_configuration(a: TaskRecord, b: TaskRecord) -> bool:
    """Whether two tasks measure the same thing (trial counts aside)."""
    return (
        a.artifact_sha256 == b.artifact_sha256
        and a.eval_sha256 == b.eval_sha256
        and a.options == b.options
        and dataclasses.replace(a.settings, trials=1, evaluate=True)
        == dataclasses.replace(b.settings, trials=1, evaluate=True)
    )


def split_trials(trials: int, blocks: int) -> list[int]:
    """``trials`` spread over at most ``blocks`` blocks as evenly as possible."""
    blocks = max(1, min(blocks, trials))
    base, extra = divmod(trials, blocks)
    return [base + (1 if i < extra else 0) for i in range(blocks)]


def _blocks_of(task: TaskRecord, role: str, blocks: int, campaign_id: str) -> list[TaskRecord]:
    out = []
    for index, trials in enumerate(split_trials(task.settings.trials, blocks)):
        settings: MeasureSettings = dataclasses.replace(
            task.settings, trials=trials, evaluate=task.settings.evaluate and index == 0
        )
        out.append(
            dataclasses.replace(
                task,
                task_id="t-" + uuid.uuid4().hex[:16],
                campaign_id=campaign_id,
                settings=settings,
                role=role,
                block=index,
                # a new task: nothing of the (baseline) task it copies carries over
                status=TaskStatus.PENDING,
                attempt=0,
                lease_id=None,
                agent_id=None,
                lease_expires_at=None,
                result_id=None,
                created_at=0.0,
                updated_at=0.0,
            )
        )
    return out


def shape_tasks(
    candidates: list[TaskRecord],
    baseline: Iterable[TaskRecord],
    shape: RunShape,
    runnable: Callable[[TaskRecord], bool],
    measure_key: Callable[[TaskRecord], str],
) -> list[TaskRecord]:
    """The run's tasks in the order they are to be measured.

    ``candidates``: the campaign's planned tasks (one per series); ``baseline``: the
    baseline campaign's tasks; ``runnable(task)``: whether a baseline task's artifacts
    still exist; ``measure_key(task)``: the key of a reshaped task (its settings
    changed). Tasks without an artifact (failed preparation) keep their place and
    shape. ``created_at`` is left to the caller.
    """
    wanted = [t for t in candidates if not shape.series or task_series(t) in shape.series]
    by_series = {task_series(t): t for t in baseline if t.role == CANDIDATE and t.block == 0}
    rng = random.Random(shape.seed)
    per_device: dict[str, list[TaskRecord]] = {}
    order: list[str] = []
    unshaped: list[TaskRecord] = []
    for task in wanted:
        if not task.artifact_sha256:
            unshaped.append(task)
            continue
        if task.device_id not in per_device:
            per_device[task.device_id] = []
            order.append(task.device_id)
        campaign_id = task.campaign_id
        # Hosted (billable) hub devices measure a task in one profile job: never split.
        blocks = 1 if task.backend == HUB_BACKEND else shape.blocks
        per_device[task.device_id] += _blocks_of(task, CANDIDATE, blocks, campaign_id)
        base = by_series.get(task_series(task))
        if base is None or same_configuration(base, task) or not runnable(base):
            continue
        replay = dataclasses.replace(
            base,
            settings=dataclasses.replace(
                base.settings, trials=task.settings.trials, evaluate=task.settings.evaluate
            ),
            device_name=task.device_name,
            selector=dict(task.selector),
        )
        per_device[task.device_id] += _blocks_of(replay, BASELINE, blocks, campaign_id)
    shaped: list[TaskRecord] = list(unshaped)
    for device in order:
        shaped += [
            dataclasses.replace(t, measure_key=measure_key(t))
            for t in _in_rounds(per_device[device], rng)
        ]
    return shaped


def _in_rounds(tasks: list[TaskRecord], rng: random.Random) -> list[TaskRecord]:
    """Round ``i`` = every block ``i`` of the device, shuffled; rounds in index order.

    Blocks of one side thus keep their order (block 0 carries the accuracy pass), and
    a slow phase of the machine hits both sides of a series instead of one.
    """
    rounds: dict[int, list[TaskRecord]] = {}
    for t in tasks:
        rounds.setdefault(t.block, []).append(t)
    out: list[TaskRecord] = []
    for index in sorted(rounds):
        rng.shuffle(rounds[index])
        out += rounds[index]
    return out
