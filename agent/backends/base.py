"""The interface every measuring backend implements."""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from agent.accuracy import classification_accuracy, top1_outcomes
from agent.evaldata import load_eval_data, load_eval_inputs
from edgefarm.domain import MeasureSettings
from edgefarm.errors import MissingExtra, ModelLoadError, TaskError

# Seed of the generator that synthesizes inputs when a task has no eval data.
SYNTHETIC_INPUT_SEED = 0

# Longest backend error message kept in a ModelLoadError.
_MAX_MESSAGE_CHARS = 500


class Backend(ABC):
    """One runtime that loads a model file and runs it, in the measuring child process.

    Lifecycle: ``read_eval_inputs`` (when the task has eval data), ``load`` once,
    ``make_inputs`` once, ``timed_call`` once and its callable for every warm-up and
    timed iteration, then ``extra_metrics`` once and (in the first trial) ``evaluate``.
    """

    NAME: ClassVar[str]
    # Per-example correctness (1/0, eval-set order) left by the last ``evaluate``, for
    # paired comparisons between runs; empty when the backend's evaluation has none.
    example_outcomes: Sequence[int] = ()
    MODULE: ClassVar[str] = ""  # the importable module the backend needs ("" = none)
    EXTRA: ClassVar[str] = ""  # the pip extra of edgefarm that installs MODULE
    DISTRIBUTIONS: ClassVar[tuple[str, ...]] = ()  # pip distributions that provide MODULE

    @classmethod
    def require(cls) -> ModuleType:
        """Import and return :attr:`MODULE`, or raise :class:`MissingExtra`."""
        if not cls.MODULE:
            raise TypeError(f"backend {cls.NAME} needs no runtime module")
        if importlib.util.find_spec(cls.MODULE) is None:
            raise MissingExtra(cls.EXTRA, cls.MODULE)
        return importlib.import_module(cls.MODULE)

    @classmethod
    def installed_version(cls) -> str | None:
        """The runtime's version when installed here, else None; imports nothing heavy."""
        if not cls.MODULE or importlib.util.find_spec(cls.MODULE) is None:
            return None
        for dist in cls.DISTRIBUTIONS or (cls.MODULE,):
            try:
                return importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
        return "unknown"

    @abstractmethod
    def load(self, model_path: Path, settings: MeasureSettings, options: dict[str, str]) -> None:
        """Load the model; raise :class:`ModelLoadError` when it cannot be loaded."""

    @abstractmethod
    def make_inputs(self, eval_inputs: np.ndarray | None, batch_size: int) -> Any:
        """The fixed input of every timed iteration.

        The first ``batch_size`` eval examples when given, else a seeded synthetic
        batch shaped like the model's declared input.
        """

    @abstractmethod
    def run_once(self, inputs: Any) -> None:
        """Run one inference on ``inputs`` (one timed iteration)."""

    def timed_call(self, inputs: Any) -> Callable[[], object]:
        """A no-argument callable doing exactly one ``run_once``, for the timing loop.

        Backends may override it to hand the loop the runtime's own call and so
        save a Python frame per iteration.
        """
        return functools.partial(self.run_once, inputs)

    def read_eval_inputs(self, eval_path: Path, settings: MeasureSettings) -> np.ndarray:
        """What :meth:`make_inputs` gets from the task's eval data file.

        Default: the first ``settings.batch_size`` inputs of a classification eval file.
        """
        return load_eval_inputs(eval_path, settings.batch_size)

    def extra_metrics(self, settings: MeasureSettings) -> dict[str, float]:
        """Backend-specific figures of this trial, taken after the timing loop.

        Stored in :attr:`TrialOutcome.metrics`; the default has none.
        """
        return {}

    def evaluate(self, eval_path: Path, settings: MeasureSettings) -> dict[str, float]:
        """Accuracy over the whole eval set.

        Default: classification accuracy against the FP32 reference outputs
        (:func:`score_classification`).
        """
        return score_classification(self, eval_path, settings.batch_size)

    @abstractmethod
    def predict(self, batch: np.ndarray) -> np.ndarray:
        """The model's outputs (logits) for ``batch``, one row per example."""

    @abstractmethod
    def version(self) -> str:
        """The runtime's version."""

    @abstractmethod
    def environment(self) -> dict[str, str]:
        """What the runtime ran with: version, devices, threads, optimization level."""


def score_classification(backend: Backend, eval_path: Path, batch_size: int) -> dict[str, float]:
    """Classification accuracy over the whole eval set, ``batch_size`` examples at a time.

    The last batch is padded to ``batch_size`` (models may have a fixed batch).
    """
    data = load_eval_data(eval_path)
    n = len(data)
    outputs: list[np.ndarray] = []
    for start in range(0, n, batch_size):
        batch = data.inputs[start : start + batch_size]
        real = len(batch)
        if real < batch_size:
            pad = np.repeat(batch[-1:], batch_size - real, axis=0)
            batch = np.concatenate([batch, pad])
        outputs.append(np.asarray(backend.predict(batch))[:real])
    stacked = np.concatenate(outputs)
    backend.example_outcomes = top1_outcomes(stacked, data.labels)
    return classification_accuracy(stacked, data.labels, data.reference)


def check_model_file(model_path: Path) -> int:
    """Cheap checks before a native loader sees the file; returns its size in bytes."""
    if not model_path.is_file():
        raise ModelLoadError(f"model file not found: {model_path}")
    size = model_path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"model file is empty: {model_path}")
    return size


def one_line(message: str) -> str:
    """A backend's (often multi-line) error message squeezed onto one short line."""
    text = " ".join(message.split())
    if len(text) > _MAX_MESSAGE_CHARS:
        text = text[: _MAX_MESSAGE_CHARS - 3] + "..."
    return text


def check_options(backend: str, options: dict[str, str], known: frozenset[str]) -> None:
    """Reject option keys the backend does not understand (a typo must not go unnoticed)."""
    unknown = sorted(set(options) - known)
    if unknown:
        allowed = ", ".join(sorted(known)) or "none"
        raise TaskError(
            f"unknown {backend} option(s): {', '.join(unknown)} (known options: {allowed})"
        )
