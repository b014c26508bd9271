"""Options shared by several command groups."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from edgefarm.home import default_store_url, edgefarm_home

if TYPE_CHECKING:
    from edgefarm.transport import ClientTls, ServerTls
    from results.store import ResultsStore

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


def open_store(store_url: str | None, home: str | None) -> ResultsStore:
    """The results store of ``--store``, else the SQLite file in the home directory."""
    from results.store import ResultsStore  # late: SQLAlchemy, for the commands using it

    return ResultsStore.open(store_url or default_store_url(edgefarm_home(home)))


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


def client_tls_options(f: F) -> F:
    """--tls-ca / --tls-cert / --tls-key ($EDGEFARM_TLS_CA, _CERT, _KEY): how to dial a TLS
    coordinator. Pass the three values to :func:`client_tls`."""
    options = [
        click.option(
            "--tls-ca",
            envvar="EDGEFARM_TLS_CA",
            default=None,
            metavar="FILE",
            help="Dial the coordinator over TLS, trusting this CA certificate (PEM).",
        ),
        click.option(
            "--tls-cert",
            envvar="EDGEFARM_TLS_CERT",
            default=None,
            metavar="FILE",
            help="This client's certificate (PEM), for a coordinator requiring client "
            "certificates (mutual TLS); implies TLS.",
        ),
        click.option(
            "--tls-key",
            envvar="EDGEFARM_TLS_KEY",
            default=None,
            metavar="FILE",
            help="The private key of --tls-cert (PEM, unencrypted).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def client_tls(tls_ca: str | None, tls_cert: str | None, tls_key: str | None) -> ClientTls | None:
    """The TLS settings the --tls-* options give (None: plaintext)."""
    if not (tls_ca or tls_cert or tls_key):
        return None
    from pathlib import Path

    from edgefarm.errors import ConfigError
    from edgefarm.transport import ClientTls

    if bool(tls_cert) != bool(tls_key):
        raise ConfigError(
            "--tls-cert and --tls-key go together (a client certificate needs its key)"
        )
    return ClientTls(
        ca=Path(tls_ca) if tls_ca else None,
        cert=Path(tls_cert) if tls_cert else None,
        key=Path(tls_key) if tls_key else None,
    )


def server_tls_options(f: F) -> F:
    """--tls-cert / --tls-key / --tls-client-ca / --insecure of the coordinator
    ($EDGEFARM_COORDINATOR_TLS_CERT, _KEY, _CLIENT_CA). Pass them to :func:`server_tls`."""
    options = [
        click.option(
            "--tls-cert",
            envvar="EDGEFARM_COORDINATOR_TLS_CERT",
            default=None,
            metavar="FILE",
            help="Serve gRPC over TLS with this certificate (PEM; needs --tls-key).",
        ),
        click.option(
            "--tls-key",
            envvar="EDGEFARM_COORDINATOR_TLS_KEY",
            default=None,
            metavar="FILE",
            help="The private key of --tls-cert (PEM, unencrypted).",
        ),
        click.option(
            "--tls-client-ca",
            envvar="EDGEFARM_COORDINATOR_TLS_CLIENT_CA",
            default=None,
            metavar="FILE",
            help="Require every agent and CLI client to present a certificate signed by this "
            "CA (mutual TLS).",
        ),
        click.option(
            "--insecure",
            is_flag=True,
            help="Accept serving plaintext on a non-loopback address (fleet token, agent "
            "credentials and results travel in clear text).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def server_tls(
    tls_cert: str | None, tls_key: str | None, tls_client_ca: str | None
) -> ServerTls | None:
    """The coordinator's TLS settings from the --tls-* options (None: plaintext)."""
    if not (tls_cert or tls_key or tls_client_ca):
        return None
    from pathlib import Path

    from edgefarm.errors import ConfigError
    from edgefarm.transport import ServerTls

    if not (tls_cert and tls_key):
        raise ConfigError(
            "--tls-cert and --tls-key are both needed to serve TLS"
            + (" (--tls-client-ca alone is not enough)" if tls_client_ca else "")
        )
    return ServerTls(
        cert=Path(tls_cert),
        key=Path(tls_key),
        client_ca=Path(tls_client_ca) if tls_client_ca else None,
    )
