"""A TCP proxy for chaos tests: sits between one agent and the coordinator.

Runs its own asyncio loop on a background thread; the test thread drives it:

- :meth:`ChaosProxy.passing` forwards bytes both ways (the default);
- :meth:`ChaosProxy.black_hole` stops forwarding both ways but keeps every socket
  open, so neither side sees a close (bytes already sent wait in the proxy and the
  kernel buffers, as a real network holds them in retransmission, and flow again on
  :meth:`passing`; a close by one side reaches the other only then);
- :meth:`ChaosProxy.reset` aborts every connection (both sides see a reset);
- :meth:`ChaosProxy.blip` black-holes for a few seconds, then passes again.

No dependencies beyond the standard library.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field

CHUNK = 65536


@dataclass
class ProxyStats:
    """What went through the proxy (read from the test thread; ints only)."""

    connections: int = 0  # connections accepted, ever
    open_connections: int = 0
    upstream_bytes: int = 0  # agent -> coordinator
    downstream_bytes: int = 0  # coordinator -> agent
    refused: int = 0  # accepted, but the target could not be reached


@dataclass(eq=False)
class _Pair:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class ChaosProxy:
    """A controllable TCP proxy from ``listen_host:<free port>`` to ``target``."""

    def __init__(self, target: str, listen_host: str = "127.0.0.1") -> None:
        self.target = target
        self.listen_host = listen_host
        self.stats = ProxyStats()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._pairs: set[_Pair] = set()
        self._waiting: set[asyncio.StreamWriter] = set()  # accepted while black-holed
        self._blip_handle: asyncio.TimerHandle | None = None
        self.address = ""

    # ----- lifecycle (test thread) -------------------------------------------------

    def start(self) -> str:
        """Start listening; returns the address the agent should dial."""
        self._thread.start()
        port = self._call(self._start())
        self.address = f"{self.listen_host}:{port}"
        return self.address

    def stop(self) -> None:
        """Close every connection and the listener; stop the thread."""
        if not self._thread.is_alive():
            return
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> ChaosProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- controls (test thread) --------------------------------------------------

    def passing(self) -> None:
        """Forward bytes both ways."""
        self._call(self._set_flowing(True))

    def black_hole(self) -> None:
        """Stop forwarding both ways; keep every socket open."""
        self._call(self._set_flowing(False))

    def reset(self) -> None:
        """Abort every connection now (new ones are still accepted)."""
        self._call(self._reset())

    def blip(self, seconds: float, wait: bool = False) -> None:
        """Black-hole for ``seconds``, then pass again (returns at once unless ``wait``)."""
        self._call(self._blip(seconds))
        if wait:
            time.sleep(seconds)
            while not self.is_passing:
                time.sleep(0.01)

    @property
    def is_passing(self) -> bool:
        """Whether bytes flow now."""
        return self._flowing is not None and self._flowing.is_set()

    # ----- the loop's side ---------------------------------------------------------

    def _call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _start(self) -> int:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, self.listen_host, 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _set_flowing(self, on: bool) -> None:
        assert self._flowing is not None
        if self._blip_handle is not None:
            self._blip_handle.cancel()
            self._blip_handle = None
        if on:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _blip(self, seconds: float) -> None:
        await self._set_flowing(False)
        assert self._flowing is not None
        self._blip_handle = self._loop.call_later(seconds, self._flowing.set)

    async def _reset(self) -> None:
        for writer in list(self._waiting):
            writer.transport.abort()
        pairs, self._pairs = list(self._pairs), set()
        for pair in pairs:
            for task in pair.tasks:
                task.cancel()
            for writer in (pair.client, pair.server):
                writer.transport.abort()
        for pair in pairs:
            await asyncio.gather(*pair.tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        assert self._flowing is not None
        # Black-holed: the connection does not reach the target until bytes flow again.
        self._waiting.add(writer)
        try:
            await self._flowing.wait()
        finally:
            self._waiting.discard(writer)
        if writer.transport.is_closing():
            return  # reset meanwhile
        host, port = self.target.rsplit(":", 1)
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            self.stats.refused += 1
            writer.transport.abort()
            return
        pair = _Pair(writer, up_writer)
        self._pairs.add(pair)
        self.stats.open_connections += 1
        pair.tasks = [
            asyncio.create_task(self._pump(reader, up_writer, upstream=True)),
            asyncio.create_task(self._pump(up_reader, writer, upstream=False)),
        ]
        try:
            await asyncio.wait(pair.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # One side closed (and the close reached the other): end both directions.
            for task in pair.tasks:
                task.cancel()
            await asyncio.gather(*pair.tasks, return_exceptions=True)
            for w in (writer, up_writer):
                w.close()
            self._pairs.discard(pair)
            self.stats.open_connections -= 1

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool
    ) -> None:
        flowing = self._flowing
        assert flowing is not None
        while True:
            await flowing.wait()  # black-holed: read nothing (the kernel holds it)
            try:
                data = await src.read(CHUNK)
            except (ConnectionError, OSError):
                data = b""
            await flowing.wait()  # black-holed meanwhile: hold what was read, and any EOF
            if not data:
                with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                    if dst.can_write_eof():
                        dst.write_eof()
                return
            if upstream:
                self.stats.upstream_bytes += len(data)
            else:
                self.stats.downstream_bytes += len(data)
            try:
                dst.write(data)
                await dst.drain()
            except (ConnectionError, OSError):
                return
