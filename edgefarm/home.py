"""Where edgefarm keeps its state: one overridable home directory."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "EDGEFARM_HOME"


def edgefarm_home(override: str | Path | None = None) -> Path:
    """``override``, else $EDGEFARM_HOME, else ~/.edgefarm (created on first use)."""
    raw = override or os.environ.get(HOME_ENV) or Path.home() / ".edgefarm"
    home = Path(raw).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def default_store_url(home: Path) -> str:
    """The embedded default store: a SQLite file in the home directory."""
    return f"sqlite:///{home / 'results.sqlite'}"
