"""The hub job journal: which hub job answers which step, kept on disk.

Hub jobs are slow and billable, so every job id is written down (atomically, fsynced)
*before* the agent waits on it. After a restart of the agent or the coordinator, a
step whose entry exists re-attaches to that job instead of submitting a new one.
Failed jobs are recorded too, with the hub's reason, so a step is not resubmitted
blindly (:mod:`agent.hub.jobs` decides when a failure may be retried).

One JSON file per entry, named by the entry's key (a hash of everything that determines
the job: step, input artifact, scheme, device, runtime, options ...), under the hub
agent's work directory. Several agents in one process share a journal and its locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgefarm.errors import TaskError

log = logging.getLogger(__name__)

JOURNAL_VERSION = 1

# Written before the submission call: after a crash inside that call the job (if the
# hub got it) is found again by its unique name instead of being submitted twice.
SUBMITTING = "submitting"
SUBMITTED = "submitted"
SUCCEEDED = "succeeded"
FAILED = "failed"


@dataclass
class JournalEntry:
    """One hub job (or model upload) standing for one step."""

    key: str
    step: str  # upload | quantize | compile | profile | inference
    hub_id: str  # the job id (the model id for an upload); "" while submitting
    state: str  # submitting | submitted | succeeded | failed
    campaign_id: str = ""
    attempt: int = 0
    message: str = ""  # the hub's reason, for a failed job
    recorded_at: float = 0.0
    facts: dict[str, str] = field(default_factory=dict)  # the key's parts and results


class Journal:
    """Journal entries under ``root``, one file each, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, asyncio.Lock] = {}

    @staticmethod
    def key(step: str, **parts: object) -> str:
        """The key of a step: a hash of the step and everything that determines its job."""
        blob = json.dumps({"step": step, **parts}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def lock(self, key: str) -> asyncio.Lock:
        """The lock that makes concurrent tasks share one submission per key."""
        return self._locks.setdefault(key, asyncio.Lock())

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str) -> JournalEntry | None:
        """The entry for ``key``, or None."""
        path = self._path(key)
        try:
            data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.warning("ignoring unreadable journal entry %s: %s", path, err)
            return None
        version = int(data.pop("version", 0))
        if version > JOURNAL_VERSION:
            raise TaskError(
                f"hub journal entry {path} was written by a newer edgefarm "
                f"(journal version {version}); upgrade this agent"
            )
        fields = JournalEntry.__dataclass_fields__
        return JournalEntry(**{k: v for k, v in data.items() if k in fields})

    def put(self, entry: JournalEntry) -> None:
        """Write ``entry`` durably: temp file, fsync, rename, fsync of the directory."""
        entry.recorded_at = time.time()
        path = self._path(entry.key)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        payload = json.dumps({"version": JOURNAL_VERSION, **asdict(entry)}, sort_keys=True)
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # directories cannot be opened on Windows
            fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def entries(self) -> list[JournalEntry]:
        """Every readable entry, oldest first."""
        found = [self.get(p.stem) for p in self.root.glob("*.json")]
        return sorted((e for e in found if e is not None), key=lambda e: e.recorded_at)
