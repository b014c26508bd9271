"""What the language-model backends share: token inputs and decode-step iterations."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.backends.base import Backend
from agent.llm_eval import load_reference_tokens
from edgefarm.domain import MeasureSettings
from edgefarm.errors import TaskError


class LanguageModelBackend(Backend):
    """A backend whose timed iteration is one KV-cached decode step.

    Subclasses build the step in ``timed_call`` (running the prompt first, untimed)
    and keep it in ``_step``; fidelity is scored by ``evaluate``, not ``predict``.
    """

    _step: Callable[[], object] | None = None

    def read_eval_inputs(self, eval_path: Path, settings: MeasureSettings) -> np.ndarray:
        """The token sequence of the task's LLM reference file."""
        return load_reference_tokens(eval_path)

    def run_once(self, inputs: Any) -> None:
        """One decode step (the prompt is run before the first)."""
        if self._step is None:
            self.timed_call(inputs)
        assert self._step is not None
        self._step()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Not used: language models are scored by :meth:`evaluate`."""
        raise TaskError(f"{self.NAME} scores language models with evaluate(), not predict()")
