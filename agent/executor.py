"""How an agent turns one assignment into a measurement: the executor seam.

The agent (:mod:`agent.client`) owns the connection, the lease and the artifact
downloads; an :class:`Executor` does the measuring. :class:`LocalExecutor` measures on
this machine (trials in supervised child processes, :mod:`agent.runner`); the hub
executor (:mod:`agent.hub.executor`) measures on a Qualcomm AI Hub hosted device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from agent.backend_envs import BackendEnv
from agent.runner import TrialsReport, run_measurement
from edgefarm.domain import Assignment


class Progress(Protocol):
    """``progress(phase, trial)``: tells the coordinator what a task is doing (and so
    renews its lease): ``"measuring"`` with the trial number, or a phase such as
    ``"compiling"``."""

    def __call__(self, phase: str, trial: int = 0) -> None: ...


class Executor(Protocol):
    """Measures one assignment whose artifacts are already on disk."""

    async def execute(
        self, assignment: Assignment, model_path: Path, eval_path: Path | None, progress: Progress
    ) -> TrialsReport:
        """Measure; raise a :class:`~edgefarm.errors.TaskError` subclass on failure."""
        ...


class LocalExecutor:
    """Measures on this machine with the task's backend, one child process per trial (run
    by a backend environment's interpreter for the backends in ``envs``)."""

    def __init__(self, envs: dict[str, BackendEnv] | None = None) -> None:
        self.envs = dict(envs or {})

    async def execute(
        self, assignment: Assignment, model_path: Path, eval_path: Path | None, progress: Progress
    ) -> TrialsReport:
        """Run the trials of ``assignment`` (see :func:`agent.runner.run_measurement`)."""

        async def on_trial(trial: int, trials: int) -> None:
            progress("measuring", trial)

        a = assignment
        return await run_measurement(
            a.backend,
            a.scheme,
            model_path,
            eval_path,
            a.settings,
            a.options,
            on_trial,
            self.envs.get(a.backend),
        )
