"""Fixtures for every test."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _no_logging_to_closed_streams() -> Iterator[None]:
    """A CLI command run in-process (click's CliRunner) configures logging on the
    runner's stderr, which is closed once the command returns: drop such handlers, or
    every later log call in this process prints a 'Logging error' traceback."""
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        stream = getattr(handler, "stream", None)
        if stream is not None and getattr(stream, "closed", False):
            root.removeHandler(handler)
