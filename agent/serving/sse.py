"""One streamed chat completion against an OpenAI-compatible endpoint, timed per token.

``POST {base}/chat/completions`` with ``"stream": true`` over HTTP/1.1 (plain or TLS),
read as server-sent events. Every ``data:`` event whose first choice's ``delta`` carries
text in ``content``, ``reasoning_content`` or ``reasoning``, or ``tool_calls``, is a
token-bearing event and gets a ``perf_counter_ns`` timestamp: reasoning models stream
their thinking before any content, and a harness that waits for content reports false
time-to-first-token collapses. ``usage`` (when the server sends it) gives the token
count; otherwise the count of token-bearing events stands for it.

An endpoint with ``api="ollama"`` is asked through Ollama's native ``POST {base}/api/chat``
instead (newline-delimited JSON; ``message.content`` or ``message.thinking`` carry
tokens): its last line's own figures (load, prompt-evaluation and evaluation counts and
durations) are kept in :attr:`RequestRecord.native`, and ``eval_count`` is the token count.

Bounded against a hostile or broken server: a response line longer than
:data:`MAX_LINE_BYTES`, a body over ``max_bytes``, a status other than 200, a malformed
event, a connection dropped before ``data: [DONE]`` (or the end of the body), or no
first token / no next event within the time limits each end the request with a
:class:`StreamError` naming what happened; nothing raises past :func:`stream_chat`.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

from agent.backends.serving import Endpoint

MAX_LINE_BYTES = 1 << 20
DEFAULT_MAX_BYTES = 64 << 20
TOKEN_KEYS = ("content", "reasoning_content", "reasoning")
OLLAMA = "ollama"  # Endpoint.api of Ollama's native chat API
OLLAMA_FIELDS = (
    "total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
    "eval_count", "eval_duration",
)  # fmt: skip


class StreamError(Exception):
    """Why one streamed request failed (one line)."""


@dataclass
class RequestRecord:
    """What one request did: clock readings in ``perf_counter_ns``."""

    start_ns: int
    token_ns: list[int] = field(default_factory=list)  # one per token-bearing event
    end_ns: int = 0
    output_tokens: int = 0  # usage.completion_tokens when sent, else len(token_ns)
    prompt_tokens: int = 0
    error: str = ""
    # Ollama's native figures of the request (counts; *_duration_ms), when it sends them
    native: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.token_ns)


async def stream_chat(
    endpoint: Endpoint,
    prompt: str,
    max_tokens: int,
    *,
    first_token_timeout_s: float = 60.0,
    idle_timeout_s: float = 30.0,
    max_bytes: int = DEFAULT_MAX_BYTES,
    extra: dict[str, Any] | None = None,
) -> RequestRecord:
    """Send one streaming chat completion and time it; failures are in ``error``."""
    record = RequestRecord(start_ns=time.perf_counter_ns())
    writer: asyncio.StreamWriter | None = None
    try:
        try:
            host, netloc, port, prefix, tls = endpoint.parts()
        except ValueError as err:
            raise StreamError(str(err)) from None
        ollama = endpoint.api == OLLAMA
        body = json.dumps(
            {
                "model": endpoint.model,
                "messages": [{"role": "user", "content": prompt}],
                "stream": True,
                **(
                    {"options": {"temperature": 0, "num_predict": max_tokens}}
                    if ollama
                    else {
                        "max_tokens": max_tokens,
                        "stream_options": {"include_usage": True},
                        "temperature": 0,
                    }
                ),
                **(extra or {}),
            }
        ).encode()
        headers = [
            f"POST {prefix}{'/api/chat' if ollama else '/chat/completions'} HTTP/1.1",
            f"Host: {netloc}",
            "Content-Type: application/json",
            f"Accept: {'application/x-ndjson' if ollama else 'text/event-stream'}",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        if endpoint.api_key:
            headers.append(f"Authorization: Bearer {endpoint.api_key}")
        context = ssl.create_default_context() if tls else None
        reader, connected = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, limit=MAX_LINE_BYTES),
            first_token_timeout_s,
        )
        writer = connected
        connected.write(("\r\n".join(headers) + "\r\n\r\n").encode() + body)
        await connected.drain()
        await _read_stream(reader, record, first_token_timeout_s, idle_timeout_s, max_bytes, ollama)
    except StreamError as err:
        record.error = str(err)
    except TimeoutError:
        which = "first token" if not record.token_ns else "next event"
        record.error = f"no {which} within the time limit"
    except (OSError, ssl.SSLError, ValueError) as err:
        record.error = " ".join(f"{type(err).__name__}: {err}".split())[:300]
    finally:
        record.end_ns = time.perf_counter_ns()
        if writer is not None:
            writer.close()
    if not record.output_tokens:
        record.output_tokens = len(record.token_ns)
    if not record.error and not record.token_ns:
        record.error = "the stream ended without a token"
    return record


async def _read_stream(
    reader: asyncio.StreamReader,
    record: RequestRecord,
    first_s: float,
    idle_s: float,
    max_bytes: int,
    ollama: bool = False,
) -> None:
    """Read the status, headers and the SSE (or Ollama's NDJSON) body into ``record``."""
    status = await _line(reader, first_s) or ""
    parts = status.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise StreamError(f"not an HTTP response: {status[:80]!r}")
    chunked = False
    while header := await _line(reader, first_s):
        name, _, value = header.partition(":")
        if name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if parts[1] != "200":
        detail = (await _body_text(reader, chunked, first_s))[:200]
        raise StreamError(f"HTTP {parts[1]}: {' '.join(detail.split())}")
    lines = _chunked_lines(reader, first_s, idle_s, record) if chunked else None
    received = 0
    while True:
        timeout = first_s if not record.token_ns else idle_s
        line = await (lines.__anext__() if lines is not None else _line(reader, timeout, eof=True))
        if line is None:
            raise StreamError("the connection closed before the end of the stream")
        received += len(line)
        if received > max_bytes:
            raise StreamError(f"the response passed {max_bytes} bytes")
        if ollama:
            if line.strip() and _take_ollama_event(line.strip(), record):
                return
            continue
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        _take_event(data, record)


def _event(data: str) -> dict[str, Any]:
    """One event's JSON object; StreamError for malformed JSON or an error event."""
    try:
        event = json.loads(data)
    except json.JSONDecodeError:
        raise StreamError(f"malformed event: {data[:80]!r}") from None
    if not isinstance(event, dict):
        raise StreamError(f"malformed event: {data[:80]!r}")
    if "error" in event:
        raise StreamError(f"server error: {str(event['error'])[:200]}")
    return event


def _take_event(data: str, record: RequestRecord) -> None:
    """One ``data:`` event: a token timestamp when it carries a token, usage when sent."""
    event = _event(data)
    usage = event.get("usage")
    if isinstance(usage, dict):
        record.output_tokens = int(usage.get("completion_tokens") or 0)
        record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return
    delta = choices[0].get("delta")
    if not isinstance(delta, dict):
        return
    if any(isinstance(delta.get(k), str) and delta[k] for k in TOKEN_KEYS) or delta.get(
        "tool_calls"
    ):
        record.token_ns.append(time.perf_counter_ns())


def _take_ollama_event(data: str, record: RequestRecord) -> bool:
    """One line of Ollama's ``/api/chat`` stream: a token timestamp when its message
    carries content or thinking; True for the last (``done``), whose native counts and
    durations (nanoseconds) are kept in milliseconds."""
    event = _event(data)
    message = event.get("message")
    if isinstance(message, dict) and any(
        isinstance(message.get(k), str) and message[k] for k in ("content", "thinking")
    ):
        record.token_ns.append(time.perf_counter_ns())
    if not event.get("done"):
        return False
    for key in OLLAMA_FIELDS:
        value = event.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            name = key.replace("_duration", "_duration_ms")
            record.native[name] = float(value) / (1e6 if key.endswith("_duration") else 1.0)
    if record.native.get("eval_count"):
        record.output_tokens = int(record.native["eval_count"])
    return True


async def _line(reader: asyncio.StreamReader, timeout_s: float, eof: bool = False) -> str | None:
    """One CRLF/LF-terminated line (without it); None at the end of the body when
    ``eof``; :class:`StreamError` for a line over :data:`MAX_LINE_BYTES`."""
    try:
        raw = await asyncio.wait_for(reader.readuntil(b"\n"), timeout_s)
    except asyncio.IncompleteReadError as partial:
        if eof and not partial.partial:
            return None
        raise StreamError("the connection closed in the middle of a line") from None
    except asyncio.LimitOverrunError:
        raise StreamError(f"a response line is longer than {MAX_LINE_BYTES} bytes") from None
    return raw.decode("utf-8", "replace").rstrip("\r\n")


async def _chunked_lines(
    reader: asyncio.StreamReader, first_s: float, idle_s: float, record: RequestRecord
) -> Any:
    """The lines of a chunked body (None once it ends without ``[DONE]``)."""
    pending = b""
    while True:
        timeout = first_s if not record.token_ns else idle_s
        size_line = await _line(reader, timeout, eof=True)
        if size_line is None:
            yield None
            return
        try:
            size = int(size_line.split(";")[0].strip() or "x", 16)
        except ValueError:
            raise StreamError(f"malformed chunk size {size_line[:40]!r}") from None
        if size == 0:
            yield None
            return
        if size > MAX_LINE_BYTES:
            raise StreamError(f"a chunk of {size} bytes is over the {MAX_LINE_BYTES}-byte bound")
        try:
            chunk = await asyncio.wait_for(reader.readexactly(size + 2), timeout)
        except asyncio.IncompleteReadError:
            raise StreamError("the connection closed in the middle of a chunk") from None
        pending += chunk[:-2]
        if len(pending) > MAX_LINE_BYTES:
            raise StreamError(f"a response line is longer than {MAX_LINE_BYTES} bytes")
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.decode("utf-8", "replace").rstrip("\r")


async def _body_text(reader: asyncio.StreamReader, chunked: bool, timeout_s: float) -> str:
    """Up to 4 KiB of an error response's body."""
    try:
        data = await asyncio.wait_for(reader.read(4096), timeout_s)
    except (TimeoutError, OSError):
        return ""
    text = data.decode("utf-8", "replace")
    if chunked:
        text = "\n".join(line for line in text.splitlines()[1::2])
    return text
