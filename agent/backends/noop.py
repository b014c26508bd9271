"""The noop backend: measures the farm itself, and stands in for a real runtime in tests.

``load`` only records the model file's size and ``run_once`` does nothing, so its
latencies are the farm's own dispatch overhead.

``predict`` is deterministic: for each example it returns the one-hot (10 classes)
of the argmax over the example's first 10 flattened features.

Fault-injection options, for tests of the measuring child's supervision only:

- ``noop_crash``: ``segv`` (the child sends itself SIGSEGV) or ``abort`` (``os.abort``),
  during ``load``.
- ``noop_sleep_s``: seconds to sleep in ``load`` (a hang, to test time limits).
- ``noop_call_s``: seconds each timed call sleeps (a stand-in for a model of known
  speed, for tests of what the agent records around the loop).
- ``noop_exit``: an exit code; in ``load`` the child says so on stderr and exits at
  once, writing no result (a runtime that calls ``exit`` behind our back).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

import edgefarm
from agent.backends.base import SYNTHETIC_INPUT_SEED, Backend, check_model_file, check_options
from edgefarm.domain import MeasureSettings
from edgefarm.errors import TaskError

NUM_CLASSES = 10
_CRASHES = ("segv", "abort")


class NoopBackend(Backend):
    """Loads nothing, runs nothing: the farm's overhead, and a fake backend for tests."""

    NAME: ClassVar[str] = "noop"
    OPTIONS: ClassVar[frozenset[str]] = frozenset(
        {"noop_crash", "noop_sleep_s", "noop_call_s", "noop_exit"}
    )

    def __init__(self) -> None:
        self.model_size_bytes = 0
        self.call_s = 0.0

    @classmethod
    def installed_version(cls) -> str | None:
        """Always installed: it is edgefarm's own."""
        return edgefarm.__version__

    def load(self, model_path: Path, settings: MeasureSettings, options: dict[str, str]) -> None:
        """Record the file's size; apply the fault-injection options."""
        check_options(self.NAME, options, self.OPTIONS)
        self.model_size_bytes = check_model_file(model_path)
        crash = options.get("noop_crash")
        if crash is not None and crash not in _CRASHES:
            raise TaskError(f"unknown noop_crash '{crash}' (known: {', '.join(_CRASHES)})")
        if "noop_sleep_s" in options:
            time.sleep(float(options["noop_sleep_s"]))
        self.call_s = float(options.get("noop_call_s", 0.0))
        if "noop_exit" in options:
            code = int(options["noop_exit"])
            print(f"noop: exiting with code {code} without a result", file=sys.stderr, flush=True)
            os._exit(code)
        if crash == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif crash == "abort":
            os.abort()

    def make_inputs(self, eval_inputs: np.ndarray | None, batch_size: int) -> np.ndarray:
        """The first ``batch_size`` eval examples, or a seeded (batch_size, 10) batch."""
        if eval_inputs is not None and len(eval_inputs) > 0:
            return np.asarray(eval_inputs[:batch_size])
        rng = np.random.default_rng(SYNTHETIC_INPUT_SEED)
        return rng.standard_normal((batch_size, NUM_CLASSES)).astype(np.float32)

    def run_once(self, inputs: Any) -> None:
        """Nothing (or sleep ``noop_call_s``)."""
        if self.call_s > 0:
            time.sleep(self.call_s)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """One-hot of the argmax of each example's first 10 flattened features."""
        flat = np.asarray(batch).reshape(len(batch), -1)[:, :NUM_CLASSES]
        out = np.zeros((len(batch), NUM_CLASSES), dtype=np.float32)
        out[np.arange(len(batch)), np.argmax(flat, axis=1)] = 1.0
        return out

    def version(self) -> str:
        """edgefarm's version."""
        return edgefarm.__version__

    def environment(self) -> dict[str, str]:
        """The recorded model size."""
        return {"noop.model_size_bytes": str(self.model_size_bytes)}
