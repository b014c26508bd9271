"""Campaigns are stored before preparation, a re-sent submission attaches to its
campaign, and a restarted coordinator prepares a `preparing` campaign again. The
preparer is a test double (no Ray); the store is a real SQLite file."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import pytest

from coordinator.campaigns import CampaignPlanner
from coordinator.interleave import RunShape
from coordinator.preparation import PreparationStats, PreparedSource, Preparer
from coordinator.scheduler import Scheduler
from coordinator.spec import CampaignSpec
from edgefarm.domain import ArtifactRef, CampaignStatus, DeviceCapabilities, TaskStatus
from edgefarm.errors import UsageError
from results.store import ResultsStore

SPEC = """
name: resume-me
models:
  - name: m1
    source: builtin:digits-mlp
  - name: m2
    source: builtin:digits-mlp
backends:
  - name: noop
    schemes: [none]
"""


class SlowPreparer:
    """Prepares instantly once ``release`` is set; counts conversions."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.conversions = 0
        self.artifacts = None

    async def source(
        self, model_name: str, source: str, path: Path | None, stats: PreparationStats
    ) -> PreparedSource:
        self.started.set()
        await self.release.wait()
        return PreparedSource(
            model=ArtifactRef("a" * 64, 10, "m.onnx"), eval_data=None, calibration=None
        )

    async def attach_files(self, prepared: PreparedSource, *args: Any) -> PreparedSource:
        return prepared

    async def variants(
        self, jobs: list[tuple[PreparedSource, str, str, dict[str, Any]]], stats: PreparationStats
    ) -> list[ArtifactRef | Exception]:
        self.conversions += len(jobs)
        stats.run += len(jobs)
        return [
            ArtifactRef(f"{i:064x}", 10, f"{scheme}.onnx")
            for i, (_, _, scheme, _) in enumerate(jobs, 1)
        ]


def _caps() -> DeviceCapabilities:
    return DeviceCapabilities(
        device_id="dev-a",
        hostname="dev-a",
        os="Linux",
        arch="x86_64",
        logical_cores=2,
        backends={"noop": "0"},
    )


def _planner(store: ResultsStore, preparer: SlowPreparer) -> CampaignPlanner:
    return CampaignPlanner(Scheduler(store), cast(Preparer, preparer))


@pytest.fixture
def store(tmp_path: Path) -> ResultsStore:
    return ResultsStore.open(f"sqlite:///{tmp_path / 'r.sqlite'}")


def test_campaign_is_stored_preparing_and_a_resent_submission_attaches(
    store: ResultsStore,
) -> None:
    async def scenario() -> None:
        preparer = SlowPreparer()
        planner = _planner(store, preparer)
        agent = planner.scheduler.register("a", "dev-a", {}, _caps())
        planner.scheduler.connect(agent)
        spec = CampaignSpec.from_text(SPEC, "spec.yaml")
        first = asyncio.create_task(planner.submit(spec, SPEC, {}, submission_id="sub-1"))
        await preparer.started.wait()
        stored = store.campaign_for_submission("sub-1")
        assert stored is not None and stored.status == CampaignStatus.PREPARING
        assert stored.plan["devices"][0]["device_id"] == "dev-a"
        first.cancel()  # the client went away: preparation goes on
        again = asyncio.create_task(planner.submit(spec, SPEC, {}, submission_id="sub-1"))
        await asyncio.sleep(0)
        preparer.release.set()
        outcome = await again
        assert outcome.campaign_id == stored.campaign_id
        assert outcome.tasks_total == 2
        assert preparer.conversions == 2  # prepared once
        assert store.get_campaign(stored.campaign_id).status == CampaignStatus.RUNNING  # type: ignore[union-attr]
        # After preparation, the same submission id answers from the store.
        later = await planner.submit(spec, SPEC, {}, submission_id="sub-1")
        assert (later.campaign_id, later.tasks_total) == (stored.campaign_id, 2)
        assert len(store.list_campaigns()) == 1

    asyncio.run(scenario())


def test_restarted_coordinator_prepares_a_preparing_campaign_again(
    store: ResultsStore,
) -> None:
    async def killed_while_preparing() -> str:
        preparer = SlowPreparer()
        planner = _planner(store, preparer)
        planner.scheduler.connect(planner.scheduler.register("a", "dev-a", {}, _caps()))
        spec = CampaignSpec.from_text(SPEC, "spec.yaml")
        submit = asyncio.create_task(
            planner.submit(spec, SPEC, {}, shape=RunShape(seed=7), submission_id="sub-2")
        )
        await preparer.started.wait()
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()  # the coordinator dies
        await asyncio.gather(submit, return_exceptions=True)
        stored = store.campaign_for_submission("sub-2")
        assert stored is not None
        return stored.campaign_id

    campaign_id = asyncio.run(killed_while_preparing())
    assert store.get_campaign(campaign_id).status == CampaignStatus.PREPARING  # type: ignore[union-attr]
    assert store.tasks_for_campaign(campaign_id) == []

    async def restarted() -> None:
        preparer = SlowPreparer()
        preparer.release.set()
        planner = _planner(store, preparer)  # no agent online yet: the stored plan decides
        assert planner.resume() == 1
        outcome = await planner.submit(
            CampaignSpec.from_text(SPEC, "spec.yaml"), SPEC, {}, submission_id="sub-2"
        )
        assert outcome.campaign_id == campaign_id and outcome.tasks_total == 2
        assert {t.task_id for t in planner.scheduler.pending} == {
            t.task_id for t in store.tasks_for_campaign(campaign_id)
        }

    asyncio.run(restarted())
    tasks = store.tasks_for_campaign(campaign_id)
    assert [t.status for t in tasks] == [TaskStatus.PENDING, TaskStatus.PENDING]
    assert store.get_campaign(campaign_id).status == CampaignStatus.RUNNING  # type: ignore[union-attr]


def test_a_campaign_that_cannot_run_is_stored_failed_with_why(store: ResultsStore) -> None:
    async def scenario() -> None:
        preparer = SlowPreparer()
        preparer.release.set()
        planner = _planner(store, preparer)
        planner.scheduler.connect(planner.scheduler.register("a", "dev-a", {}, _caps()))
        text = SPEC.replace("noop", "openvino").replace("none", "fp32")  # not on the only device
        spec = CampaignSpec.from_text(text, "spec.yaml")
        with pytest.raises(UsageError, match="no task can run"):
            await planner.submit(spec, text, {}, submission_id="sub-3")
        stored = store.campaign_for_submission("sub-3")
        assert stored is not None and stored.status == CampaignStatus.FAILED
        assert "no task can run" in stored.error
        with pytest.raises(UsageError, match="no task can run"):  # attaching says so too
            await planner.submit(spec, text, {}, submission_id="sub-3")

    asyncio.run(scenario())
