"""One trial in a fresh child process: ``python -m agent.trial REQUEST_JSON RESULT_JSON``.

The request JSON holds ``backend``, ``scheme``, ``model_path``, ``eval_path`` (or
null), ``settings`` (a :class:`MeasureSettings` dict), ``options`` and
``compute_accuracy``. The child loads the model, times it and, when asked and eval
data is given, computes accuracy over the whole eval set. It writes the result JSON
and exits:

- 0: ``{"ok": true, "trial": {...}, "accuracy": {...}, "backend_version",
  "environment", "model_size_bytes"}``; the trial's ``metrics`` come from the backend's
  ``extra_metrics`` and the accuracy from its ``evaluate``;
- 3: a typed task error, ``{"ok": false, "error_kind": ..., "error_message": ...}``
  (a missing backend extra is reported as ``backend_unavailable``);
- 4: any other exception, as ``error_kind`` ``task_error``;
- 2: wrong command line (no result file is written).

Thread-count environment variables (``OMP_NUM_THREADS`` ...) are set by the parent.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.backends import get_backend
from agent.backends.serving import ServingBackend
from agent.device_state import (
    guard_reasons,
    read_state,
    state_environment,
    state_metrics,
    wait_until_cool,
)
from agent.energy import EnergyMeter, energy_environment, energy_sources
from agent.host_activity import OTHER_CPU_METRIC, OtherCpuMeter, busy_reason, other_cpu_limit
from agent.measure import current_rss_bytes, peak_rss_bytes, time_iterations
from agent.parent_watch import die_with_parent
from agent.serving.workload import run_serving_trial
from edgefarm.domain import MeasureSettings, TrialOutcome
from edgefarm.errors import BackendUnavailable, MissingExtra, TaskError

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_TASK_ERROR = 3
EXIT_UNEXPECTED = 4


@dataclass(frozen=True)
class TrialRequest:
    """What the parent asks one measuring child to do."""

    backend: str
    scheme: str
    model_path: Path
    eval_path: Path | None
    settings: MeasureSettings
    options: dict[str, str] = field(default_factory=dict)
    compute_accuracy: bool = False

    def to_json(self) -> dict[str, Any]:
        """The request as a JSON-ready dict."""
        return {
            "backend": self.backend,
            "scheme": self.scheme,
            "model_path": str(self.model_path),
            "eval_path": str(self.eval_path) if self.eval_path is not None else None,
            "settings": self.settings.to_dict(),
            "options": dict(self.options),
            "compute_accuracy": self.compute_accuracy,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrialRequest:
        """Parse a request dict (as written by :meth:`to_json`)."""
        eval_path = data.get("eval_path")
        return cls(
            backend=str(data["backend"]),
            scheme=str(data["scheme"]),
            model_path=Path(data["model_path"]),
            eval_path=Path(eval_path) if eval_path else None,
            settings=MeasureSettings(**data["settings"]),
            options={str(k): str(v) for k, v in (data.get("options") or {}).items()},
            compute_accuracy=bool(data.get("compute_accuracy", False)),
        )


def _serving_result(backend: ServingBackend, request: TrialRequest) -> dict[str, Any]:
    """A serving trial's success result (:mod:`agent.serving.workload`)."""
    served = run_serving_trial(
        backend,
        request.model_path,
        request.eval_path,
        request.settings,
        request.options,
        request.compute_accuracy,
        request.scheme,
    )
    return {
        "ok": True,
        "trial": asdict(served.trial),
        "accuracy": served.accuracy,
        "backend_version": backend.version(),
        "environment": served.environment,
        "model_size_bytes": path_size_bytes(request.model_path),
        "python": f"{platform.python_version()} at {sys.prefix}",
        "example_outcomes": [],
    }


def path_size_bytes(path: Path) -> int:
    """Size on disk of a model: the file, or every file under a model directory."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def run_trial(request: TrialRequest) -> dict[str, Any]:
    """Load, time and (optionally) score one model; the success result dict."""
    settings = request.settings
    backend_cls = get_backend(request.backend)
    if backend_cls.MODULE:
        backend_cls.require()  # import the runtime now: neither load time nor load RSS
    backend = backend_cls()
    if isinstance(backend, ServingBackend):
        return _serving_result(backend, request)
    eval_batch = (
        backend.read_eval_inputs(request.eval_path, settings)
        if request.eval_path is not None
        else None
    )

    meters, no_energy = energy_sources()
    cooldown = wait_until_cool(settings.max_start_temp_c, settings.cooldown_timeout_s)
    state_before = read_state()
    rss_before = current_rss_bytes()
    started = time.perf_counter()
    backend.load(request.model_path, settings, request.options)
    load_time_s = time.perf_counter() - started
    rss_after = current_rss_bytes()

    inputs = backend.make_inputs(eval_batch, settings.batch_size)
    # the energy meter's idle window comes before the other-CPU reading starts
    with EnergyMeter(meters) as energy, OtherCpuMeter() as others:
        timing = time_iterations(backend.timed_call(inputs), settings)
    state_after = read_state()
    metrics = backend.extra_metrics(settings)
    # one inference = one item of a batch; language models time one token per iteration
    metrics.update(energy.figures(len(timing.samples_ms) * max(1, settings.batch_size)))
    metrics.update(state_metrics(state_before, state_after))
    thermal = guard_reasons(settings.max_start_temp_c, cooldown, state_before, state_after, metrics)
    # Neighbours on the same cores (other processes, not other measurements - the
    # scheduler prevents those) distort timings: keep the evidence, and reject the
    # trial over the limit (settings.max_other_cpu_cores; by default a share of the cores).
    metrics[OTHER_CPU_METRIC] = others.cores
    if hasattr(os, "getloadavg"):
        metrics["host_load_1m"] = os.getloadavg()[0]
    limit = other_cpu_limit(settings.max_other_cpu_cores)
    busy = busy_reason(others.cores, limit, timing.duration_s)
    trial = TrialOutcome(
        samples_ms=timing.samples_ms,
        warmup_iterations=settings.warmup_iterations,
        duration_s=timing.duration_s,
        load_time_s=load_time_s,
        peak_rss_bytes=peak_rss_bytes(),  # before the accuracy pass loads the eval set
        load_rss_delta_bytes=rss_after - rss_before,
        valid=timing.valid and not busy and not any(thermal),
        invalid_reason="; ".join(r for r in (timing.invalid_reason, busy, *thermal) if r),
        metrics={str(k): float(v) for k, v in metrics.items()},
    )

    accuracy: dict[str, float] = {}
    if request.compute_accuracy and request.eval_path is not None:
        accuracy = backend.evaluate(request.eval_path, settings)

    return {
        "ok": True,
        "trial": asdict(trial),
        "accuracy": accuracy,
        "backend_version": backend.version(),
        "environment": {
            **backend.environment(),
            **energy_environment(meters, no_energy),
            **state_environment(state_after),
        },
        "model_size_bytes": path_size_bytes(request.model_path),
        # this child's Python (a backend may run in an environment of its own)
        "python": f"{platform.python_version()} at {sys.prefix}",
        "example_outcomes": list(getattr(backend, "example_outcomes", [])),
    }


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically: the parent sees the whole file or none."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump(payload, out)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Run one trial as asked by the request file; write the result file; the exit code."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m agent.trial REQUEST_JSON RESULT_JSON", file=sys.stderr)
        return EXIT_USAGE
    request_path, result_path = Path(args[0]), Path(args[1])
    die_with_parent()
    code = EXIT_OK
    try:
        request = TrialRequest.from_json(json.loads(request_path.read_text(encoding="utf-8")))
        result = run_trial(request)
    except TaskError as err:
        code = EXIT_TASK_ERROR
        result = {"ok": False, "error_kind": err.kind, "error_message": str(err)}
    except MissingExtra as err:
        code = EXIT_TASK_ERROR
        result = {"ok": False, "error_kind": BackendUnavailable.kind, "error_message": str(err)}
    except Exception as err:
        traceback.print_exc()
        code = EXIT_UNEXPECTED
        result = {
            "ok": False,
            "error_kind": TaskError.kind,
            "error_message": f"{type(err).__name__}: {err}",
        }
    _write_json(result_path, result)
    return code


if __name__ == "__main__":
    sys.exit(main())
