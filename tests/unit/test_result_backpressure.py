"""The gateway's backpressure on one agent's stream: results being stored at once are
bounded by count and by wire size, and the stream is read again as they finish."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from coordinator import gateway
from coordinator.gateway import AgentGateway
from protos.edgefarm.v1 import agent_pb2, common_pb2


def _stream(sizes: list[int]) -> AsyncIterator[agent_pb2.AgentMessage]:
    async def messages() -> AsyncIterator[agent_pb2.AgentMessage]:
        for i, size in enumerate(sizes):
            result = common_pb2.TaskResult(task_id=f"t{i}", error_message="x" * size)
            yield agent_pb2.AgentMessage(result=result)

    return messages()


def _peaks(sizes: list[int]) -> tuple[int, int, int]:
    """Read a stream of results of these error-message sizes through the gateway; the
    most results and bytes in storage at once, and how many were answered."""
    gw = AgentGateway.__new__(AgentGateway)  # only _read and _deliver are exercised
    gw._deliveries = set()
    storing: dict[str, int] = {}
    peak = [0, 0]

    async def store(session: Any, pb: common_pb2.TaskResult) -> str:
        storing[pb.task_id] = pb.ByteSize()
        peak[0] = max(peak[0], len(storing))
        peak[1] = max(peak[1], sum(storing.values()))
        await asyncio.sleep(0.005)
        del storing[pb.task_id]
        return pb.task_id

    gw._result = store  # type: ignore[method-assign,assignment]
    session = SimpleNamespace(outbox=asyncio.Queue(), name="sim")

    async def run() -> int:
        await gw._read(session, _stream(sizes))  # type: ignore[arg-type]
        await asyncio.gather(*gw._deliveries)
        return session.outbox.qsize()

    answered = asyncio.run(run())
    return peak[0], peak[1], answered


def test_small_results_are_bounded_by_count() -> None:
    most, _, answered = _peaks([10] * 100)
    assert most == gateway.RESULTS_IN_FLIGHT and answered == 100


def test_large_results_are_bounded_by_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway, "RESULT_BYTES_IN_FLIGHT", 1000)
    most, most_bytes, answered = _peaks([300] * 20)  # three fit, a fourth does not
    assert most == 3 and most_bytes <= 1000 and answered == 20
    most, most_bytes, answered = _peaks([5000, 10, 5000])  # above the bound: alone
    assert most == 1 and most_bytes > 1000 and answered == 3
