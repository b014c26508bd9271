"""Baseline replay and randomised interleaved blocks of nightly runs."""

from __future__ import annotations

import dataclasses

from coordinator.interleave import (
    BASELINE,
    CANDIDATE,
    RunShape,
    shape_tasks,
    split_trials,
    task_series,
)
from edgefarm.domain import MeasureSettings, TaskStatus
from results.records import TaskRecord


def _task(scheme: str, sha: str, device: str = "dev-a", **extra: object) -> TaskRecord:
    fields: dict[str, object] = {
        "task_id": f"t-{scheme}-{sha}-{device}",
        "campaign_id": "c-new",
        "model": "digits-mlp",
        "backend": "onnxruntime",
        "scheme": scheme,
        "device_id": device,
        "device_name": device,
        "artifact_sha256": sha,
        "artifact_size": 10,
        "artifact_name": f"{scheme}.onnx",
        "eval_sha256": "eval",
        "eval_size": 5,
        "settings": MeasureSettings(trials=4),
    }
    fields.update(extra)
    return TaskRecord(**fields)  # type: ignore[arg-type]


def _key(t: TaskRecord) -> str:
    return f"key-{t.artifact_sha256}-{t.settings.trials}"


def test_split_trials_spreads_evenly() -> None:
    assert split_trials(5, 5) == [1, 1, 1, 1, 1]
    assert split_trials(5, 2) == [3, 2]
    assert split_trials(2, 4) == [1, 1]  # never an empty block
    assert split_trials(3, 1) == [3]


def test_changed_variant_is_replayed_and_interleaved_in_blocks() -> None:
    candidates = [_task("fp32", "new32"), _task("int8", "same8")]
    done = {"status": TaskStatus.DONE, "result_id": 7, "attempt": 1, "lease_id": "l-1"}
    baseline = [
        _task("fp32", "old32", campaign_id="c-old", **done),
        _task("int8", "same8", campaign_id="c-old", **done),
    ]
    shape = RunShape(baseline_campaign_id="c-old", blocks=4, seed=3)
    shaped = shape_tasks(candidates, baseline, shape, lambda t: True, _key)
    roles = [(t.scheme, t.role) for t in shaped]
    # fp32 changed: 4 candidate + 4 baseline blocks; int8 unchanged: 4 candidate blocks only
    assert roles.count(("fp32", CANDIDATE)) == roles.count(("fp32", BASELINE)) == 4
    assert roles.count(("int8", CANDIDATE)) == 4 and ("int8", BASELINE) not in roles
    replay = [t for t in shaped if t.role == BASELINE]
    assert {t.artifact_sha256 for t in replay} == {"old32"}
    # replay tasks are new tasks, not the finished baseline task they copy
    assert all(t.status is TaskStatus.PENDING and t.result_id is None for t in replay)
    assert all(t.attempt == 0 and t.lease_id is None for t in replay)
    assert {t.campaign_id for t in shaped} == {"c-new"}
    assert len({t.task_id for t in shaped}) == len(shaped)
    # every block has one trial; only block 0 of each side evaluates accuracy
    assert all(t.settings.trials == 1 for t in shaped)
    assert [t.block for t in shaped if t.settings.evaluate] == [0, 0, 0]
    for (s, role) in {(t.scheme, t.role) for t in shaped}:
        blocks = [t.block for t in shaped if (t.scheme, t.role) == (s, role)]
        assert blocks == sorted(blocks)  # blocks of one side run in order
    # the sides are interleaved, not run one after the other
    fp32 = [t.role for t in shaped if t.scheme == "fp32"]
    assert fp32 != sorted(fp32) and fp32 != sorted(fp32, reverse=True)
    assert all(t.measure_key == _key(t) for t in shaped)


def test_order_is_seeded_and_varies_with_the_seed() -> None:
    candidates = [_task("fp32", "new32")]
    baseline = [_task("fp32", "old32", campaign_id="c-old")]

    def order(seed: int) -> list[str]:
        shape = RunShape(baseline_campaign_id="c-old", blocks=6, seed=seed)
        return [t.role for t in shape_tasks(candidates, baseline, shape, lambda t: True, _key)]

    assert order(1) == order(1)
    assert len({tuple(order(s)) for s in range(8)}) > 1


def test_every_round_holds_both_sides_whatever_the_seed() -> None:
    candidates = [_task("fp32", "new32")]
    baseline = [_task("fp32", "old32", campaign_id="c-old")]
    for seed in range(300):
        shape = RunShape(baseline_campaign_id="c-old", blocks=5, seed=seed)
        shaped = shape_tasks(candidates, baseline, shape, lambda t: True, _key)
        pairs = [shaped[i : i + 2] for i in range(0, len(shaped), 2)]
        assert [{t.block for t in p} for p in pairs] == [{b} for b in range(4)]
        assert all({t.role for t in p} == {BASELINE, CANDIDATE} for p in pairs)


def test_missing_artifact_or_unknown_series_means_no_replay() -> None:
    candidates = [_task("fp32", "new32")]
    baseline = [_task("fp32", "gone", campaign_id="c-old"), _task("fp16", "x", campaign_id="c")]
    shape = RunShape(baseline_campaign_id="c-old", blocks=2)
    shaped = shape_tasks(candidates, baseline, shape, lambda t: t.artifact_sha256 != "gone", _key)
    assert [t.role for t in shaped] == [CANDIDATE, CANDIDATE]


def test_series_filter_keeps_only_the_asked_series() -> None:
    candidates = [_task("fp32", "a"), _task("int8", "b"), _task("fp32", "a", device="dev-b")]
    wanted = task_series(candidates[1])
    shaped = shape_tasks(candidates, [], RunShape(series=frozenset({wanted})), lambda t: True, _key)
    assert [task_series(t) for t in shaped] == [wanted]


def test_tasks_without_artifact_keep_their_shape() -> None:
    failed = _task("int4", "")
    shaped = shape_tasks([failed], [], RunShape(blocks=3), lambda t: True, _key)
    assert shaped == [failed]


def test_replay_uses_the_baseline_options_and_artifact() -> None:
    candidates = [_task("fp32", "same", options={"graph_optimization_level": "disable"})]
    baseline = [_task("fp32", "same", campaign_id="c-old", options={})]
    shape = RunShape(baseline_campaign_id="c-old", blocks=1)
    shaped = shape_tasks(candidates, baseline, shape, lambda t: True, _key)
    replay = [t for t in shaped if t.role == BASELINE]
    assert len(replay) == 1 and replay[0].options == {}
    assert dataclasses.replace(replay[0].settings) == MeasureSettings(trials=4)
