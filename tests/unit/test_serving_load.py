"""The serving workload's streaming client and load levels (agent.serving), against a
small OpenAI-compatible test server of this file's own: only for what real servers
cannot be made to do on demand (a slow first token, a dropped connection, a malformed or
oversized event, an error status), plus the normal and reasoning-model streams and the
scheduling and summary arithmetic."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from agent.backends.serving import Endpoint
from agent.serving.load import arrival_offsets, measure_level, summarize
from agent.serving.plan import Level, Slo
from agent.serving.sse import MAX_LINE_BYTES, RequestRecord, stream_chat
from edgefarm.domain import ServingLevel

Writer = Callable[[asyncio.StreamWriter], "asyncio.Future[None] | object"]


def _event(delta: dict[str, object] | None = None, **extra: object) -> bytes:
    body = {"choices": [{"delta": delta}]} if delta is not None else {"choices": []}
    return f"data: {json.dumps({**body, **extra})}\n\n".encode()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@asynccontextmanager
async def serve(scenario: str) -> AsyncIterator[Endpoint]:
    """A loopback server answering every request with ``scenario``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        request = json.loads(await reader.readexactly(length))
        assert request["stream"] is True and request["messages"][0]["role"] == "user"
        try:
            await SCENARIOS[scenario](writer)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Endpoint(f"http://127.0.0.1:{port}/v1", "test-model")
    finally:
        server.close()
        await server.wait_closed()


OK_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


async def _normal(writer: asyncio.StreamWriter) -> None:
    writer.write(OK_HEAD)
    writer.write(_chunk(_event({"role": "assistant"})))  # no token
    for word in ("Hello", " there", ",", " friend", "."):
        await asyncio.sleep(0.01)
        writer.write(_chunk(_event({"content": word})))
        await writer.drain()
    writer.write(_chunk(_event(None, usage={"prompt_tokens": 7, "completion_tokens": 5})))
    writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    await writer.drain()


async def _reasoning(writer: asyncio.StreamWriter) -> None:
    writer.write(OK_HEAD)
    for _ in range(3):
        writer.write(_chunk(_event({"reasoning_content": "hmm"})))
        await writer.drain()
        await asyncio.sleep(0.05)
    writer.write(_chunk(_event({"content": "42"})) + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    await writer.drain()


async def _plain_body(writer: asyncio.StreamWriter) -> None:
    """No chunked encoding: the body runs to the connection's end."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
    for word in ("a", "b", "c"):
        writer.write(_event({"content": word}))
    writer.write(b"data: [DONE]\n\n")
    await writer.drain()


async def _slow_first(writer: asyncio.StreamWriter) -> None:
    writer.write(OK_HEAD)
    await writer.drain()
    await asyncio.sleep(2.0)


async def _drop(writer: asyncio.StreamWriter) -> None:
    writer.write(OK_HEAD + _chunk(_event({"content": "one"})) + _chunk(_event({"content": "two"})))
    await writer.drain()


async def _malformed(writer: asyncio.StreamWriter) -> None:
    writer.write(OK_HEAD + _chunk(_event({"content": "one"})) + _chunk(b"data: {not json\n\n"))
    await writer.drain()


async def _huge(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
    writer.write(b"data: " + b"x" * (MAX_LINE_BYTES + 10) + b"\n\n")
    await writer.drain()


async def _error(writer: asyncio.StreamWriter) -> None:
    body = b'{"error": {"message": "model not found"}}'
    writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()


SCENARIOS = {
    "normal": _normal,
    "reasoning": _reasoning,
    "plain": _plain_body,
    "slow": _slow_first,
    "drop": _drop,
    "malformed": _malformed,
    "huge": _huge,
    "error": _error,
}


def _run(scenario: str, **kwargs: float) -> RequestRecord:
    async def go() -> RequestRecord:
        async with serve(scenario) as endpoint:
            return await stream_chat(endpoint, "hi", 16, **kwargs)  # type: ignore[arg-type]

    return asyncio.run(go())


def test_a_stream_is_timed_per_token_and_counted_by_usage() -> None:
    record = _run("normal")
    assert record.ok, record.error
    assert len(record.token_ns) == 5 and record.output_tokens == 5 and record.prompt_tokens == 7
    gaps = [b - a for a, b in itertools.pairwise(record.token_ns)]
    assert all(gap >= 5_000_000 for gap in gaps)  # the server's 10 ms between tokens
    assert record.start_ns < record.token_ns[0] <= record.token_ns[-1] <= record.end_ns
    plain = _run("plain")
    assert plain.ok and plain.output_tokens == 3  # no usage: token-bearing events


def test_reasoning_deltas_count_for_the_first_token() -> None:
    record = _run("reasoning")
    assert record.ok and len(record.token_ns) == 4
    # the first token is the first reasoning delta, not the content 100+ ms later
    assert record.token_ns[-1] - record.token_ns[0] > 100_000_000
    assert record.token_ns[0] - record.start_ns < record.token_ns[-1] - record.start_ns


@pytest.mark.parametrize(
    ("scenario", "message"),
    [
        ("slow", "no first token within the time limit"),
        ("drop", "the connection closed before the end of the stream"),
        ("malformed", "malformed event: '{not json'"),
        ("huge", f"a response line is longer than {MAX_LINE_BYTES} bytes"),
        ("error", 'HTTP 404: {"error": {"message": "model not found"}}'),
    ],
)
def test_broken_servers_fail_one_request_with_the_reason(scenario: str, message: str) -> None:
    record = _run(scenario, first_token_timeout_s=0.5, idle_timeout_s=0.5)
    assert not record.ok and record.error == message
    assert record.end_ns >= record.start_ns


def test_bad_endpoints_and_refused_connections_are_reasons() -> None:
    async def go(url: str) -> RequestRecord:
        return await stream_chat(Endpoint(url, "m"), "hi", 4, first_token_timeout_s=2)

    assert "expected http(s)://" in asyncio.run(go("ftp://x/v1")).error
    refused = asyncio.run(go("http://127.0.0.1:9/v1"))  # discard port: nothing listens
    assert not refused.ok and "ConnectionRefusedError" in refused.error


def test_arrivals_constant_and_poisson() -> None:
    constant = arrival_offsets(Level(rate=4.0, max_requests=5))
    assert constant == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    poisson = arrival_offsets(Level(rate=10.0, arrival="poisson", max_requests=2000, seed=3))
    assert poisson == arrival_offsets(
        Level(rate=10.0, arrival="poisson", max_requests=2000, seed=3)
    )
    gaps = [b - a for a, b in itertools.pairwise(poisson)]
    assert 0.09 < sum(gaps) / len(gaps) < 0.11  # mean gap 1/rate
    assert max(gaps) > 3 * min(gaps) * 10  # exponential, not constant
    for bad in ({}, {"concurrency": 2, "rate": 1.0}, {"rate": 1.0, "arrival": "burst"}):
        with pytest.raises(ValueError):
            Level(**bad)  # type: ignore[arg-type]


def test_levels_against_the_test_server_and_their_summary() -> None:
    async def go(level: Level) -> ServingLevel:
        async with serve("normal") as endpoint:

            async def send(prompt: str) -> RequestRecord:
                return await stream_chat(endpoint, prompt, 8)

            return await measure_level(level, ["a", "b"], send, Slo(ttft_ms=500, tpot_ms=100))

    result = asyncio.run(go(Level(concurrency=3, max_requests=6)))
    assert result.requests == 6 and result.failed == 0
    assert len(result.ttft_ms) == 6 and len(result.itl_ms) == 24
    figures = result.summary()
    assert 5 <= figures["itl_p50_ms"] < 1000
    assert figures["goodput_per_s"] == pytest.approx(figures["request_per_s"])
    rated = asyncio.run(go(Level(rate=20.0, max_requests=4)))
    assert rated.requests == 4 and rated.failed == 0
    # the time bound: nothing starts after max_duration_s
    bounded = asyncio.run(go(Level(rate=2.0, max_requests=100, max_duration_s=1.2)))
    assert bounded.requests == 3


def test_summary_arithmetic_and_goodput() -> None:
    ms = 1_000_000
    fast = RequestRecord(start_ns=0, token_ns=[100 * ms, 120 * ms, 140 * ms], end_ns=140 * ms)
    fast.output_tokens = 3
    slow = RequestRecord(start_ns=0, token_ns=[900 * ms, 1000 * ms], end_ns=1000 * ms)
    slow.output_tokens = 2
    failed = RequestRecord(start_ns=0, end_ns=5 * ms, error="HTTP 500: boom")
    result = summarize(Level(concurrency=1), [fast, slow, failed], 2.0, Slo(500, 100))
    assert result.requests == 3 and result.failed == 1 and result.errors == ["HTTP 500: boom"]
    assert result.ttft_ms == [100.0, 900.0] and result.tpot_ms == [20.0, 100.0]
    assert len(result.itl_ms) == 3 and result.e2e_ms == [140.0, 1000.0]
    assert result.output_tokens == [3, 2] and result.goodput_requests == 1
    figures = result.summary()
    assert figures["ttft_p50_ms"] == 500.0 and figures["tpot_p50_ms"] == 60.0  # (20+100)/2
    assert figures["e2e_p99_ms"] == pytest.approx(991.4)  # linear between 140 and 1000
    assert figures["request_per_s"] == 1.0 and figures["output_tok_per_s"] == 2.5
    assert figures["goodput_per_s"] == 0.5  # only the fast one meets TTFT <= 500 ms
