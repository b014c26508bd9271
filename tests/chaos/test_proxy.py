"""The chaos proxy itself, against an echo server on loopback (no farm, a second or two)."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from tests.chaos.proxy import ChaosProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


@pytest.fixture
def proxy() -> Iterator[ChaosProxy]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    with ChaosProxy(f"127.0.0.1:{port}") as found:
        yield found
    server.shutdown()
    server.server_close()


def _dial(proxy: ChaosProxy) -> socket.socket:
    host, port = proxy.address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.settimeout(0.5)
    return sock


def _echoed(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


@pytest.mark.timeout(30)
def test_pass_black_hole_and_pass_again(proxy: ChaosProxy) -> None:
    with _dial(proxy) as sock:
        assert _echoed(sock, b"hello") == b"hello"
        proxy.black_hole()
        sock.sendall(b"held")
        with pytest.raises(TimeoutError):  # nothing comes back, and no close either
            sock.recv(4096)
        proxy.passing()
        sock.settimeout(5)
        assert sock.recv(4096) == b"held"  # what was sent meanwhile arrives, in order
        assert proxy.stats.connections == 1 and proxy.stats.open_connections == 1


@pytest.mark.timeout(30)
def test_blip_passes_again_by_itself(proxy: ChaosProxy) -> None:
    with _dial(proxy) as sock:
        proxy.blip(0.3)
        assert not proxy.is_passing
        sock.settimeout(5)
        assert _echoed(sock, b"after the blip") == b"after the blip"
        assert proxy.is_passing


@pytest.mark.timeout(30)
def test_reset_closes_every_connection_and_new_ones_work(proxy: ChaosProxy) -> None:
    with _dial(proxy) as sock:
        assert _echoed(sock, b"x") == b"x"
        proxy.reset()
        sock.settimeout(5)
        try:
            closed = sock.recv(4096) == b""
        except ConnectionResetError:
            closed = True
        assert closed
    with _dial(proxy) as again:
        assert _echoed(again, b"y") == b"y"
    assert proxy.stats.connections == 2
