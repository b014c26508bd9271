"""gRPC channels and server credentials, plaintext or TLS, in one place.

The coordinator serves TLS when given a certificate and key (and requires client
certificates when given a client CA); agents and the CLI dial with :class:`ClientTls`
(a CA to trust, and a certificate and key of their own for mutual TLS). Without TLS
settings everything stays plaintext, which is fine on loopback and nowhere else.

Certificate files are read and checked here, once, so a missing, unreadable or
non-PEM file ends in one :class:`~edgefarm.errors.ConfigError` line naming the file
and the option it came from, never in a gRPC handshake failure later.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from edgefarm.errors import ConfigError

# The options (and environment variables) each file comes from, for error messages.
OPTION_CA = "--tls-ca"
OPTION_CERT = "--tls-cert"
OPTION_KEY = "--tls-key"
OPTION_CLIENT_CA = "--tls-client-ca"


@dataclass(frozen=True)
class ClientTls:
    """How a client dials a TLS coordinator.

    ``ca``: the CA bundle that signed the coordinator's certificate (None: the system's
    roots). ``cert`` and ``key``: this client's own certificate and key, for a
    coordinator that requires client certificates (mutual TLS); both or neither.
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class ServerTls:
    """The coordinator's certificate and key; with ``client_ca``, every client must
    present a certificate signed by it (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


def _read_pem(path: Path, option: str, marker: bytes, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(f"{option} {path}: cannot read the file ({reason})") from None
    if b"-----BEGIN " not in data or marker not in data:
        raise ConfigError(f"{option} {path}: not a PEM {what} (expected a '-----BEGIN ...' block)")
    return data


def _read_ca(path: Path, option: str) -> bytes:
    data = _read_pem(path, option, b"CERTIFICATE", "CA certificate")
    try:
        ssl.create_default_context().load_verify_locations(cadata=data.decode("ascii"))
    except (ssl.SSLError, ValueError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"{option} {path}: not a usable CA certificate ({_reason(error)})"
        ) from None
    return data


def _refuse_password() -> bytes:
    raise _EncryptedKey


class _EncryptedKey(Exception):
    """The key file asks for a passphrase."""


def _read_pair(cert: Path, key: Path, cert_option: str, key_option: str) -> tuple[bytes, bytes]:
    """(certificate chain, private key), checked to belong together."""
    cert_data = _read_pem(cert, cert_option, b"CERTIFICATE", "certificate")
    key_data = _read_pem(key, key_option, b"PRIVATE KEY", "private key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(str(cert), str(key), password=_refuse_password)
    except _EncryptedKey:
        raise ConfigError(
            f"{key_option} {key}: the key is encrypted; give an unencrypted key "
            "(readable by this user only)"
        ) from None
    except (ssl.SSLError, OSError, ValueError) as error:
        raise ConfigError(
            f"{cert_option} {cert} / {key_option} {key}: not a matching certificate and "
            f"private key ({_reason(error)})"
        ) from None
    return cert_data, key_data


def _reason(error: BaseException) -> str:
    if isinstance(error, ssl.SSLError) and error.reason:
        return str(error.reason)
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def channel_credentials(tls: ClientTls) -> grpc.ChannelCredentials:
    """Credentials for dialling a TLS coordinator (files checked, errors named)."""
    if (tls.cert is None) != (tls.key is None):
        raise ConfigError(
            f"{OPTION_CERT} and {OPTION_KEY} go together (a client certificate needs its key)"
        )
    root = _read_ca(tls.ca, OPTION_CA) if tls.ca is not None else None
    chain = key = None
    if tls.cert is not None and tls.key is not None:
        chain, key = _read_pair(tls.cert, tls.key, OPTION_CERT, OPTION_KEY)
    return grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key, certificate_chain=chain
    )


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    """Credentials for serving TLS; with a client CA, client certificates are required."""
    chain, key = _read_pair(tls.cert, tls.key, OPTION_CERT, OPTION_KEY)
    client_ca = _read_ca(tls.client_ca, OPTION_CLIENT_CA) if tls.client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(key, chain)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def sync_channel(
    address: str, tls: ClientTls | None, options: list[tuple[str, Any]]
) -> grpc.Channel:
    """A blocking channel to ``address``: TLS with ``tls``, plaintext without."""
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, channel_credentials(tls), options=options)


def aio_channel(
    address: str, tls: ClientTls | None, options: list[tuple[str, Any]]
) -> grpc.aio.Channel:
    """An asyncio channel to ``address``: TLS with ``tls``, plaintext without."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, channel_credentials(tls), options=options)


def listen_host(listen: str) -> str:
    """The host part of a gRPC listen address (``host:port``, ``[v6]:port``)."""
    if listen.startswith("unix:"):
        return listen
    host, sep, _port = listen.rpartition(":")
    if not sep:
        host = listen
    return host.strip("[]")


def is_loopback(listen: str) -> bool:
    """True when ``listen`` only accepts connections from this machine (loopback
    addresses, ``localhost``, a Unix socket); wildcard and other addresses are not."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return True
    host = listen_host(listen)
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if host.lower() == "localhost":
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    addresses = {info[4][0] for info in infos}
    try:
        return bool(addresses) and all(
            ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses
        )
    except ValueError:
        return False


def unreachable_message(address: str, tls: ClientTls | None, details: str) -> str:
    """One line for a coordinator that could not be reached, saying what TLS has to do
    with it when the failure looks like a TLS mismatch (gRPC reports those as UNAVAILABLE)."""
    if "CERTIFICATE_VERIFY_FAILED" in details or "certificate verify failed" in details:
        return (
            f"coordinator {address}: TLS handshake failed, its certificate does not verify "
            f"against {OPTION_CA} {tls.ca if tls and tls.ca else '(the system CAs)'} "
            "(wrong CA, or the certificate does not name this address)"
        )
    if "handshake" in details.lower() or "Socket closed" in details:
        if tls is None:
            return (
                f"coordinator {address} closed the connection: it probably serves TLS; "
                f"pass {OPTION_CA} (and {OPTION_CERT}/{OPTION_KEY} if it requires client "
                "certificates)"
            )
        if tls.cert is None:
            return (
                f"coordinator {address} closed the TLS connection: it may require a client "
                f"certificate ({OPTION_CERT}/{OPTION_KEY}), or not serve TLS at all"
            )
        return (
            f"coordinator {address} closed the TLS connection: it refused this client "
            f"certificate ({OPTION_CERT} {tls.cert}), or does not serve TLS at all"
        )
    last = details.rsplit("last error: ", 1)[-1].strip() if details else ""
    return f"coordinator {address} unreachable" + (f" ({last})" if last else "")
