"""edgefarm.transport: which listen addresses count as loopback, certificate files checked
into one ConfigError line naming file and option, and what a failed dial is told."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefarm.cli.options import client_tls, server_tls
from edgefarm.errors import ConfigError
from edgefarm.transport import (
    ClientTls,
    ServerTls,
    channel_credentials,
    is_loopback,
    server_credentials,
    unreachable_message,
)

pytest.importorskip("cryptography", reason="the dev extra (cryptography) is not installed")

from tests.tlscerts import Authority, make_ca


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.0.0.2:0", True),
        ("[::1]:50051", True),
        ("localhost:50051", True),
        ("unix:/tmp/edgefarm.sock", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        (":50051", False),
        ("192.168.1.10:50051", False),
        ("farm.invalid:50051", False),
    ],
)
def test_is_loopback(listen: str, loopback: bool) -> None:
    assert is_loopback(listen) is loopback


def test_good_files_make_credentials(ca: Authority) -> None:
    server = ca.issue("coordinator", server=True)
    client = ca.issue("agent", server=False)
    assert server_credentials(ca.server_tls(server, client_auth=True)) is not None
    assert channel_credentials(ca.client_tls(client)) is not None


def test_bad_files_are_one_line_naming_file_and_option(ca: Authority, tmp_path: Path) -> None:
    server = ca.issue("coordinator", server=True)
    other = ca.issue("other", server=False)
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"\x00\x01 not pem")
    cases: list[tuple[ClientTls | ServerTls, str, str]] = [
        (ClientTls(ca=tmp_path / "absent.pem"), "--tls-ca", "cannot read"),
        (ClientTls(ca=garbage), "--tls-ca", "not a PEM"),
        (ClientTls(ca=server.key), "--tls-ca", "not a PEM"),
        (ClientTls(ca=tmp_path), "--tls-ca", "cannot read"),
        (ServerTls(cert=server.cert, key=other.key), "--tls-key", "not a matching"),
        (ServerTls(cert=server.key, key=server.key), "--tls-cert", "not a PEM"),
        (ServerTls(cert=server.cert, key=server.key, client_ca=garbage), "--tls-client-ca", ""),
        (ClientTls(ca=ca.cert, cert=server.cert), "--tls-key", "go together"),
    ]
    for tls, option, words in cases:
        with pytest.raises(ConfigError) as caught:
            if isinstance(tls, ServerTls):
                server_credentials(tls)
            else:
                channel_credentials(tls)
        message = str(caught.value)
        assert "\n" not in message and option in message and words in message, message


def test_an_encrypted_key_is_refused_without_prompting(ca: Authority, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    server = ca.issue("coordinator", server=True)
    key = serialization.load_pem_private_key(server.key.read_bytes(), password=None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigError, match="encrypted"):
        server_credentials(ServerTls(cert=server.cert, key=locked))


def test_cli_option_helpers() -> None:
    assert client_tls(None, None, None) is None
    assert client_tls("ca.pem", None, None) == ClientTls(ca=Path("ca.pem"))
    with pytest.raises(ConfigError, match="go together"):
        client_tls(None, "c.pem", None)
    assert server_tls(None, None, None) is None
    with pytest.raises(ConfigError, match="both needed"):
        server_tls(None, None, "ca.pem")


def test_unreachable_messages_say_what_tls_has_to_do_with_it() -> None:
    closed = (
        "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:1.2.3.4:5: Socket closed"
    )
    verify = "last error: UNKNOWN: Tls handshake failed: CERTIFICATE_VERIFY_FAILED: unable"
    refused = "failed to connect to all addresses; last error: UNAVAILABLE: x: Connection refused"
    assert "probably serves TLS" in unreachable_message("a:1", None, closed)
    assert "client certificate" in unreachable_message("a:1", ClientTls(ca=Path("c")), closed)
    assert "does not verify" in unreachable_message("a:1", ClientTls(ca=Path("c")), verify)
    plain = unreachable_message("a:1", None, refused)
    assert plain == "coordinator a:1 unreachable (UNAVAILABLE: x: Connection refused)"
