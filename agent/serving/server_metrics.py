"""What a server says about a load level: its Prometheus ``/metrics`` read before and
after the level, turned into per-level figures.

Samples are summed over their labels. From the differences across the level:

- each histogram ``X_seconds`` (``_sum`` and ``_count``) gives ``X_ms``, its mean over
  the level's observations (vLLM: ``time_to_first_token``, ``inter_token_latency``,
  ``e2e_request_latency``, ``request_queue_time``, ``request_prefill_time``,
  ``request_decode_time``...): the server's own view beside the client's timings;
- each counter ``X_total`` gives ``X``, its increase (prompt and generation tokens,
  preemptions);

and each gauge named in :data:`GAUGES` its value after the level. Names lose a ``vllm:``
style prefix. At most :data:`MAX_FIGURES` figures per level, the server's own
(namespaced) metrics before generic ones (process, Python, HTTP); reading is bounded in
bytes and time, and a server whose metrics cannot be read just has none.
"""

from __future__ import annotations

import http.client
import math
import re
from urllib.parse import urlsplit

MAX_BYTES = 4 << 20
MAX_FIGURES = 32
TIMEOUT_S = 5.0
GAUGES = ("kv_cache_usage_perc", "gpu_cache_usage_perc", "num_requests_waiting")
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse(text: str) -> dict[str, float]:
    """Sample values by metric name (labels summed), comments skipped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        if math.isfinite(value):
            name = match.group(1)
            out[name] = out.get(name, 0.0) + value
    return out


def scrape(base_url: str, path: str) -> dict[str, float]:
    """The server's metrics at ``path`` under ``base_url``'s host; empty when unreadable."""
    url = urlsplit(base_url)
    if not url.hostname:
        return {}
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=TIMEOUT_S)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read(MAX_BYTES + 1)
        if response.status != 200 or len(body) > MAX_BYTES:
            return {}
        return parse(body.decode("utf-8", "replace"))
    except (OSError, http.client.HTTPException):
        return {}
    finally:
        conn.close()


def _short(name: str) -> str:
    return name.rsplit(":", 1)[-1]


def level_figures(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The level's figures from the readings before and after it."""
    found: list[tuple[bool, str, float]] = []  # (not the server's own namespace, key, value)
    for name, total in after.items():
        generic = ":" not in name  # process_*, python_gc_*, http_*: not the server's own
        if name.endswith("_seconds_sum"):
            base = name.removesuffix("_sum")
            count = after.get(base + "_count", 0.0) - before.get(base + "_count", 0.0)
            if count > 0:
                seconds = (total - before.get(name, 0.0)) / count
                key = _short(base).removesuffix("_seconds") + "_ms"
                found.append((generic, key, seconds * 1000.0))
        elif name.endswith("_total"):
            found.append(
                (generic, _short(name).removesuffix("_total"), total - before.get(name, 0.0))
            )
        elif _short(name) in GAUGES:
            found.append((generic, _short(name), total))
    kept = [(k, v) for _, k, v in sorted(found) if math.isfinite(v) and v >= 0]
    return dict(kept[:MAX_FIGURES])
