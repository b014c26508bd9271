"""Texts shipped for language-model evaluation (package data: ``*.txt``)."""

from __future__ import annotations

from pathlib import Path

# ~1,500 words of original, varied English prose; ~1,850 SmolLM2 tokens.
DEFAULT_EVAL_TEXT = Path(__file__).with_name("eval_en.txt")
