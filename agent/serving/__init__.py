"""Serving workloads: load against an OpenAI-compatible HTTP endpoint (a server the agent
starts for an artifact, or one a campaign names) and what it measures per request.

- :mod:`agent.serving.sse` streams one chat completion and timestamps every
  token-bearing delta (stdlib asyncio, HTTP/1.1, bounded in size and time);
- :mod:`agent.serving.load` schedules requests (a concurrency level, or constant or
  Poisson arrivals at a rate), bounded in count and time, and summarises a level: TTFT,
  TPOT, ITL and end-to-end latency percentiles, throughput, failures and goodput.
"""
