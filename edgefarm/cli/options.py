"""Options shared by several command groups."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_COORDINATOR = "127.0.0.1:50051"


def token_option(f: F) -> F:
    """--token / $EDGEFARM_TOKEN."""
    return click.option(
        "--token",
        envvar="EDGEFARM_TOKEN",
        default="edgefarm-local",
        show_default=True,
        help="Fleet token shared by coordinator and agents.",
    )(f)


def home_option(f: F) -> F:
    """--home / $EDGEFARM_HOME."""
    return click.option(
        "--home",
        envvar="EDGEFARM_HOME",
        default=None,
        help="State directory (default ~/.edgefarm).",
    )(f)


def store_option(f: F) -> F:
    """--store URL."""
    return click.option(
        "--store",
        "store_url",
        default=None,
        help="SQLAlchemy URL of the results store (default: SQLite file in the home directory).",
    )(f)


def verbose_option(f: F) -> F:
    """-v / -vv."""
    return click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")(f)


def parse_labels(items: tuple[str, ...]) -> dict[str, str]:
    """k=v pairs from repeated --label options."""
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--label")
        labels[key.strip()] = value.strip()
    return labels
