"""Hub jobs with the journal around them: submit once, retry rate limits, wait, re-attach.

Every blocking client call runs in a worker thread, so waiting on a hub job never
blocks the agent's connection (heartbeats keep the task's lease alive meanwhile), and a
cancelled task stops waiting at once (the hub job itself runs on and stays journalled).

A step's job is looked up in the journal first:

- submitted or succeeded: re-attach with ``get_job`` (no new submission);
- submitting (the agent died inside the submission call): the job is looked up among
  the hub's recent jobs by its unique name (a nonce in the journal); found, it is
  re-attached, else submitted;
- failed: the failure stands (re-raised as :class:`HubJobFailed`, nothing submitted)
  within the same campaign for upload / quantize / compile, whose outcome depends only
  on their inputs, and within the same task attempt for profile / inference jobs;
  otherwise the step is submitted again;
- absent: submitted, with rate-limited submissions retried after jittered backoff, and
  journalled before the agent starts waiting on it.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.backoff import Backoff
from agent.hub.api import HubApi, hub_message
from agent.hub.journal import (
    FAILED,
    SUBMITTED,
    SUBMITTING,
    SUCCEEDED,
    Journal,
    JournalEntry,
)
from edgefarm.errors import HubJobFailed, TaskError, TaskTimeout

log = logging.getLogger(__name__)

# Steps whose outcome depends only on their inputs: a failure is final within a campaign.
# The journal fact holding a job's unique name, and how many recent hub jobs are searched
# for it after a restart inside a submission.
JOB_NAME = "job_name"
RECENT_JOBS = 200
DETERMINISTIC_STEPS = frozenset({"upload", "quantize", "compile"})


@dataclass(frozen=True)
class HubSettings:
    """How a hub agent drives jobs. Defaults suit the real service."""

    poll_interval_s: float = 10.0  # the client's own polling interval
    job_timeout_s: float = 7200.0  # per job; the job runs on (journalled) past it
    backoff_base_s: float = 5.0  # rate-limited submissions: first retry delay ...
    backoff_cap_s: float = 120.0  # ... growing up to this
    submit_tries: int = 8  # submissions tried before a rate limit fails the task


@dataclass(frozen=True)
class StepContext:
    """Which task a step runs for (failure policy and messages)."""

    campaign_id: str
    attempt: int


@dataclass
class StepResult:
    """A finished, successful step: the client's job (or model) and its journal entry."""

    job: Any
    entry: JournalEntry


class HubJobs:
    """Submits, waits on and re-attaches to hub jobs through the journal."""

    def __init__(self, hub: HubApi, journal: Journal, settings: HubSettings) -> None:
        self.hub = hub
        self.journal = journal
        self.settings = settings

    async def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` in a worker thread. Rate-limited calls are retried with
        jittered backoff; the client's other errors become task errors (a refusal of what
        we asked for is a :class:`HubJobFailed`)."""
        backoff = Backoff(base_s=self.settings.backoff_base_s, cap_s=self.settings.backoff_cap_s)
        tries = max(1, self.settings.submit_tries)
        for attempt in range(1, tries + 1):
            try:
                return await asyncio.to_thread(fn, *args, **kwargs)
            except self.hub.rate_limited as err:
                if attempt == tries:
                    raise TaskError(
                        f"{what}: still rate-limited by Qualcomm AI Hub after {tries} tries: "
                        f"{hub_message(err)}"
                    ) from None
                delay = backoff.next_delay()
                log.warning("%s: rate-limited (%s); retrying in %.1fs", what, err, delay)
                await asyncio.sleep(delay)
            except self.hub.user_error as err:
                raise HubJobFailed(
                    f"{what}: Qualcomm AI Hub refused it: {hub_message(err)}"
                ) from None
            except (self.hub.error, OSError) as err:
                raise TaskError(f"{what}: Qualcomm AI Hub: {hub_message(err)}") from None
        raise AssertionError("unreachable")

    async def submit(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Submit a job (or upload) with ``fn``: :meth:`call`, named for what it is."""
        return await self.call(what, fn, *args, **kwargs)

    async def wait(self, job: Any, step: str) -> Any:
        """Poll ``job`` until it finishes; its final ``JobStatus``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.job_timeout_s
        while True:
            status = await self.call(f"{step} job {job.job_id}", job.get_status)
            if status.finished:
                return status
            if loop.time() >= deadline:
                raise TaskTimeout(
                    f"{step} job {job.job_id} is still {status.code} after "
                    f"{self.settings.job_timeout_s:g} s; it runs on at the hub and a later "
                    "attempt re-attaches to it"
                )
            await asyncio.sleep(self.settings.poll_interval_s)

    async def upload(self, path: Path, name: str, sha256: str, ctx: StepContext) -> Any:
        """The hub model for a local model file, uploaded once per content hash.

        ``name`` (e.g. ``model.onnx``) is what the hub sees: the client tells model types
        apart by file extension, and cached artifacts are named by their hash only.
        """
        key = Journal.key("upload", sha256=sha256)
        async with self.journal.lock(key):
            entry = self.journal.get(key)
            if entry is not None and entry.state == SUCCEEDED:
                model = await self._lookup(self.hub.client.get_model, entry.hub_id)
                if model is not None:
                    return model
            with tempfile.TemporaryDirectory(prefix="edgefarm-upload-") as tmp:
                named = Path(tmp) / name
                await asyncio.to_thread(shutil.copyfile, path, named)
                model = await self.submit(
                    f"uploading {name}", self.hub.client.upload_model, str(named), name=name
                )
            self.journal.put(
                JournalEntry(
                    key=key,
                    step="upload",
                    hub_id=str(model.model_id),
                    state=SUCCEEDED,
                    campaign_id=ctx.campaign_id,
                    attempt=ctx.attempt,
                    facts={"sha256": sha256, "name": name},
                )
            )
            return model

    async def run(
        self,
        step: str,
        facts: dict[str, str],
        ctx: StepContext,
        title: str,
        submit: Callable[[str], Any],
    ) -> StepResult:
        """The finished job for ``step`` (keyed by ``facts``): re-attached or submitted once.

        ``submit(name)`` submits the job under ``name`` (``title`` plus a nonce, journalled
        before the call). Raises :class:`HubJobFailed` with the hub's reason when the job
        failed.
        """
        key = Journal.key(step, **facts)
        async with self.journal.lock(key):
            entry = self.journal.get(key)
            job = None
            if entry is not None and entry.state == FAILED:
                if _failure_stands(entry, ctx):
                    raise HubJobFailed(entry.message)
                log.info("%s: the earlier job %s failed; submitting again", step, entry.hub_id)
            elif entry is not None and entry.state == SUBMITTING:
                job = await self._find_by_name(entry.facts.get(JOB_NAME, ""))
                if job is not None:
                    log.info("%s: found hub job %s submitted before a restart", step, job.job_id)
                    entry.hub_id, entry.state = str(job.job_id), SUBMITTED
                    self.journal.put(entry)
            elif entry is not None:
                job = await self._lookup(self.hub.client.get_job, entry.hub_id)
                if job is not None:
                    log.info("%s: re-attached to hub job %s", step, entry.hub_id)
            if job is None:
                name = f"{title} #{uuid.uuid4().hex[:12]}"
                intent = JournalEntry(
                    key=key,
                    step=step,
                    hub_id="",
                    state=SUBMITTING,
                    campaign_id=ctx.campaign_id,
                    attempt=ctx.attempt,
                    facts={**facts, JOB_NAME: name},
                )
                self.journal.put(intent)  # before submitting: a restart finds it by name
                job = await self.submit(f"submitting the {step} job", submit, name)
                entry = JournalEntry(
                    key=key,
                    step=step,
                    hub_id=str(job.job_id),
                    state=SUBMITTED,
                    campaign_id=ctx.campaign_id,
                    attempt=ctx.attempt,
                    facts={**facts, JOB_NAME: name},
                )
                self.journal.put(entry)  # before waiting: a restart re-attaches
                log.info("%s: submitted hub job %s", step, job.job_id)
            assert entry is not None
            status = await self.wait(job, step)
            if not status.success:
                reason = " ".join(str(status.message or status.code).split())
                entry.state = FAILED
                entry.message = f"{step} job {job.job_id} failed on Qualcomm AI Hub: {reason}"
                entry.campaign_id, entry.attempt = ctx.campaign_id, ctx.attempt
                self.journal.put(entry)
                raise HubJobFailed(entry.message)
            if entry.state != SUCCEEDED:
                entry.state = SUCCEEDED
                self.journal.put(entry)
            return StepResult(job, entry)

    def note(self, entry: JournalEntry, **facts: str) -> None:
        """Record results of a finished step (e.g. the compiled model's size)."""
        entry.facts.update(facts)
        self.journal.put(entry)

    async def _find_by_name(self, name: str) -> Any:
        """The hub job called ``name`` among the most recent ones, or None."""
        if not name:
            return None
        summaries = await self.call(
            "listing recent hub jobs", self.hub.client.get_job_summaries, limit=RECENT_JOBS
        )
        for summary in summaries:
            if summary.name == name:
                return await self._lookup(self.hub.client.get_job, str(summary.job_id))
        return None

    async def _lookup(self, getter: Callable[[str], Any], hub_id: str) -> Any:
        """``getter(hub_id)``, or None when the hub no longer knows the id."""
        try:
            return await self.call(f"looking up {hub_id}", getter, hub_id)
        except HubJobFailed as err:  # the hub refused the lookup: unknown or deleted
            log.warning("%s; submitting anew", err)
            return None


def _failure_stands(entry: JournalEntry, ctx: StepContext) -> bool:
    """Whether a recorded failure answers this step without a new submission."""
    if entry.campaign_id != ctx.campaign_id:
        return False
    return entry.step in DETERMINISTIC_STEPS or entry.attempt == ctx.attempt
