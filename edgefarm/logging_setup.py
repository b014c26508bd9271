"""Logging configuration, called by entry points only (never at import)."""

from __future__ import annotations

import logging
import sys


def configure_logging(verbosity: int = 0, stream: object = None) -> None:
    """WARNING by default, INFO with -v, DEBUG with -vv; noisy libraries stay quiet."""
    level = logging.WARNING - 10 * min(verbosity, 2)
    logging.basicConfig(
        level=level,
        stream=stream or sys.stderr,  # type: ignore[arg-type]
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    for noisy in ("grpc", "ray", "urllib3"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
