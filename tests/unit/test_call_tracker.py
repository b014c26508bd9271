"""The coordinator's CallTracker on a real asyncio gRPC server on loopback: at shutdown
the server ends open calls itself (UNAVAILABLE), so gRPC never cancels a handler and
logs nothing; a call the client cancels is left to gRPC."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import pytest

from coordinator.server import CallTracker

SERVICE = "test.Slow"


class Handlers:
    def __init__(self) -> None:
        self.started: dict[str, asyncio.Event] = {
            name: asyncio.Event() for name in ("Wait", "Generate", "Write")
        }
        self.cleaned_up: list[str] = []

    async def wait(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.started["Wait"].set()
        try:
            await asyncio.sleep(60)
        finally:
            self.cleaned_up.append("Wait")
        return b"late"

    async def generate(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        try:
            yield b"first"
            self.started["Generate"].set()
            await asyncio.sleep(60)
            yield b"never"
        finally:
            self.cleaned_up.append("Generate")

    async def write(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        await context.write(b"first")
        self.started["Write"].set()
        try:
            await asyncio.sleep(60)
        finally:
            self.cleaned_up.append("Write")

    def generic(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Wait": grpc.unary_unary_rpc_method_handler(self.wait),
                "Generate": grpc.unary_stream_rpc_method_handler(self.generate),
                "Write": grpc.unary_stream_rpc_method_handler(self.write),
            },
        )


async def start() -> tuple[grpc.aio.Server, CallTracker, Handlers, grpc.aio.Channel]:
    tracker = CallTracker()
    handlers = Handlers()
    server = grpc.aio.server(interceptors=[tracker])
    server.add_generic_rpc_handlers((handlers.generic(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, tracker, handlers, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


async def drain(call: grpc.aio.UnaryStreamCall) -> tuple[list[bytes], grpc.StatusCode]:
    received = []
    try:
        async for message in call:
            received.append(message)
    except grpc.aio.AioRpcError as error:
        return received, error.code()
    return received, grpc.StatusCode.OK


def test_shutdown_ends_streams_then_unary_calls_with_unavailable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        server, tracker, handlers, channel = await start()
        unary = channel.unary_unary(f"/{SERVICE}/Wait")(b"")
        generated = asyncio.ensure_future(drain(channel.unary_stream(f"/{SERVICE}/Generate")(b"")))
        written = asyncio.ensure_future(drain(channel.unary_stream(f"/{SERVICE}/Write")(b"")))
        for started in handlers.started.values():
            await asyncio.wait_for(started.wait(), 10)
        stopping = asyncio.ensure_future(server.stop(30))
        tracker.end_streams()
        assert await generated == ([b"first"], grpc.StatusCode.UNAVAILABLE)
        assert await written == ([b"first"], grpc.StatusCode.UNAVAILABLE)
        assert not await tracker.wait_idle(0.2)  # the unary call is still open
        assert not unary.done()
        tracker.end_all()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await unary
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert ended.value.details() == "coordinator shutting down"
        assert await tracker.wait_idle(5)
        await asyncio.wait_for(stopping, 5)  # long before gRPC's own grace
        assert sorted(handlers.cleaned_up) == ["Generate", "Wait", "Write"]
        await channel.close()

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    assert "Exception not handled" not in caplog.text
    assert "Task was destroyed" not in caplog.text


def test_a_call_the_client_cancels_is_cancelled_not_aborted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        server, tracker, handlers, channel = await start()
        call = channel.unary_stream(f"/{SERVICE}/Generate")(b"")
        assert await call.read() == b"first"
        await asyncio.wait_for(handlers.started["Generate"].wait(), 10)
        call.cancel()
        assert await tracker.wait_idle(5)
        assert handlers.cleaned_up == ["Generate"]
        assert not tracker.ending
        await server.stop(1)
        await channel.close()

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    assert "Task was destroyed" not in caplog.text
