"""Runs a measurement's trials, each in a fresh, supervised child process.

Each trial is ``python -m agent.trial`` (see :mod:`agent.trial`) so that load time,
memory and warm-up are measured from a cold process, and so that a runtime that
crashes or hangs takes down only its child. The child:

- gets ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` set to
  ``settings.threads``;
- on Linux dies with the agent: it sets ``PR_SET_PDEATHSIG`` = SIGKILL on itself
  (:mod:`agent.parent_watch`, given our pid in its environment), so a killed agent
  never leaves a measuring orphan;
- is killed past ``settings.timeout_s`` (:class:`TaskTimeout`); death by a signal is
  a :class:`BackendCrash` naming it; a typed error it reports is re-raised as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import platform
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.backend_envs import BackendEnv, env_child_environment
from agent.device_state import HOT_PREFIX, THROTTLED_PREFIX
from agent.host_activity import BUSY_PREFIX, BUSY_RETRIES
from agent.parent_watch import PARENT_PID_ENV
from agent.trial import TrialRequest
from edgefarm.domain import MeasureSettings, TrialOutcome
from edgefarm.errors import BackendCrash, TaskError, TaskTimeout, task_error_from_kind

log = logging.getLogger(__name__)

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
STDERR_TAIL_BYTES = 4096  # how much of a child's stderr is kept for a crash report
STDERR_TAIL_LINES = 10  # how many of its last lines a crash report quotes
_PIPE_GRACE_S = 2.0  # how long to wait for stderr to close after the child exited

OnTrial = Callable[[int, int], Awaitable[None]]


@dataclass
class TrialsReport:
    """What a measurement's trials produced (the body of a MeasurementResult)."""

    trials: list[TrialOutcome]
    accuracy: dict[str, float] = field(default_factory=dict)
    backend_version: str = ""
    environment: dict[str, str] = field(default_factory=dict)
    model_size_bytes: int = 0
    example_outcomes: list[int] = field(default_factory=list)


async def run_measurement(
    backend: str,
    scheme: str,
    model_path: Path,
    eval_path: Path | None,
    settings: MeasureSettings,
    options: dict[str, str],
    on_trial: OnTrial | None = None,
    env: BackendEnv | None = None,
) -> TrialsReport:
    """Run ``settings.trials`` trials one after another, each in a fresh child (with
    ``env``'s interpreter when the backend runs in its own environment).

    Accuracy is computed in the first trial only (when ``eval_path`` is given).
    ``on_trial(done, total)`` is awaited after each finished trial. Raises the
    :class:`TaskError` subclass that describes the first failing trial.
    """
    if settings.trials < 1:
        raise TaskError(f"settings.trials must be at least 1, got {settings.trials}")
    report = TrialsReport(trials=[])
    with tempfile.TemporaryDirectory(prefix="edgefarm-trial-") as tmp:
        for index in range(settings.trials):
            request = TrialRequest(
                backend=backend,
                scheme=scheme,
                model_path=model_path,
                eval_path=eval_path,
                settings=settings,
                options=options,
                compute_accuracy=index == 0 and eval_path is not None and settings.evaluate,
            )
            result = await _run_child(request, Path(tmp), index, env)
            for _ in range(BUSY_RETRIES):
                if not _host_was_busy(result):
                    break
                log.info("trial %d: host busy or device hot, measuring it again", index + 1)
                result = await _run_child(request, Path(tmp), index, env)
            try:
                report.trials.append(TrialOutcome.from_dict(result["trial"]))
                if index == 0:
                    report.accuracy = {k: float(v) for k, v in result["accuracy"].items()}
                    report.backend_version = str(result["backend_version"])
                    report.environment = {
                        **host_environment(settings),
                        **{str(k): str(v) for k, v in result["environment"].items()},
                    }
                    if env is not None:
                        report.environment["backend_env"] = str(env.path)
                        report.environment["backend_env.python"] = str(result.get("python", ""))
                    report.model_size_bytes = int(result["model_size_bytes"])
                    report.example_outcomes = [int(x) for x in result.get("example_outcomes", [])]
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                raise BackendCrash(f"trial {index + 1} wrote a malformed result: {err!r}") from err
            if on_trial is not None:
                await on_trial(index + 1, settings.trials)
    return report


def _host_was_busy(result: dict[str, Any]) -> bool:
    """Whether the child rejected its trial because the host was busy (it judged the
    reading against the limit resolved on this host: agent.host_activity) or the device
    was hot or throttled (the thermal guard: agent.device_state)."""
    try:
        reason = str(result["trial"]["invalid_reason"])
    except (KeyError, TypeError):
        return False  # a malformed result is reported as such below
    return any(p in reason for p in (BUSY_PREFIX, HOT_PREFIX, THROTTLED_PREFIX))


async def _run_child(
    request: TrialRequest, workdir: Path, index: int, env: BackendEnv | None = None
) -> dict[str, Any]:
    """Run one trial child under the time limit; its successful result dict."""
    request_path = workdir / f"request-{index}.json"
    result_path = workdir / f"result-{index}.json"
    request_path.write_text(json.dumps(request.to_json()), encoding="utf-8")
    timeout_s = request.settings.timeout_s

    proc = await asyncio.create_subprocess_exec(
        str(env.python) if env is not None else sys.executable,
        "-X",
        "faulthandler",  # a crash prints the Python stack to stderr before dying
        "-m",
        "agent.trial",
        str(request_path),
        str(result_path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=child_environment(request.settings.threads, env is not None),
        # Its own session: a Ctrl-C or a service manager's stop signal to the agent's
        # process group reaches the agent only, which drains (lets the trial finish).
        start_new_session=True,
    )
    tail = bytearray()
    assert proc.stderr is not None
    drain = asyncio.ensure_future(_keep_tail(proc.stderr, tail))
    try:
        try:
            async with asyncio.timeout(timeout_s):
                returncode = await proc.wait()
        except TimeoutError:
            raise TaskTimeout(
                f"trial {index + 1} ran past its time limit of {timeout_s:g} s and was killed"
            ) from None
        await asyncio.wait({drain}, timeout=_PIPE_GRACE_S)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        drain.cancel()

    stderr_tail = _last_lines(tail)
    if returncode < 0:
        raise BackendCrash(
            f"trial {index + 1}: the measuring process was killed by {_signal_name(-returncode)}"
            + (f"; stderr: {stderr_tail}" if stderr_tail else "")
        )
    try:
        result: dict[str, Any] = json.loads(result_path.read_text(encoding="utf-8"))
        ok = result["ok"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BackendCrash(
            f"trial {index + 1}: the measuring process exited with code {returncode} "
            f"without a readable result ({type(err).__name__})"
            + (f"; stderr: {stderr_tail}" if stderr_tail else "")
        ) from None
    if not ok:
        raise task_error_from_kind(
            str(result.get("error_kind", TaskError.kind)), str(result.get("error_message", ""))
        )
    return result


async def _keep_tail(stream: asyncio.StreamReader, tail: bytearray) -> None:
    """Read ``stream`` to its end, keeping only its last STDERR_TAIL_BYTES in ``tail``."""
    while chunk := await stream.read(65536):
        tail.extend(chunk)
        if len(tail) > STDERR_TAIL_BYTES:
            del tail[: len(tail) - STDERR_TAIL_BYTES]


def _last_lines(tail: bytearray) -> str:
    lines = bytes(tail).decode("utf-8", "replace").strip().splitlines()
    return " | ".join(line.strip() for line in lines[-STDERR_TAIL_LINES:] if line.strip())


def _signal_name(signum: int) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
    if signum == signal.SIGKILL:
        return f"{name} (out of memory, or killed from outside)"
    return name


def child_environment(threads: int, own_env: bool = False) -> dict[str, str]:
    """The trial child's environment: ours, thread counts pinned, this agent's code first
    (only this agent's packages when it runs in a backend's own environment)."""
    env = dict(os.environ)
    for var in THREAD_ENV_VARS:
        env[var] = str(threads)
    if own_env:
        env = env_child_environment(env)
    else:
        root = str(Path(__file__).resolve().parent.parent)  # the directory holding agent/
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    # The child ties its life to ours (agent.parent_watch); no preexec_fn here: running
    # Python between fork and exec in a process with gRPC threads crashes the child.
    env[PARENT_PID_ENV] = str(os.getpid())
    return env


def host_environment(settings: MeasureSettings) -> dict[str, str]:
    """The host's fingerprint keys stored with every result."""
    return {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "logical_cpus": str(os.cpu_count() or 0),
        "threads": str(settings.threads),
        "batch_size": str(settings.batch_size),
    }


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name where cheaply known (``/proc/cpuinfo``), else platform's guess."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
