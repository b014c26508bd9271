"""The serving workload: one trial makes a serving backend's endpoint ready (timed),
sends the plan's load levels to it, and stops it.

The plan travels in the task's options as ``serving.*`` keys (written by the campaign
spec from its ``serving:`` block; :meth:`ServingPlan.to_options` is the one encoding):

- ``serving.concurrency`` "1,2,4" and/or ``serving.rates`` "0.5,1" (requests/s) with
  ``serving.arrival`` "constant" | "poisson": the levels, concurrency levels first;
- ``serving.requests`` requests per level and ``serving.level_s``: no new request
  after that many seconds of a level;
- ``serving.output_tokens``: ``max_tokens`` of every request;
- ``serving.slo_ttft_ms`` / ``serving.slo_tpot_ms``: the objective goodput counts;
- ``serving.first_token_timeout_s``: a request without a first token (or without a
  next event) that long fails.

Prompts are windows of ``settings.prompt_tokens`` tokens of the model's evaluation
text (the task's LLM reference, decoded with the vocabulary it carries), one per
request, cycled. The trial's samples are the time per output token of the first
level's successful requests (so a serving row's latency and tok/s sit beside the
micro-benchmark's decode step); its metrics name every level's figures. Where the
trial started the server and the host measures energy (:mod:`agent.energy`), the
sweep's energy per generated token (prefill included) is ``energy_per_inference_j``;
the device state before and after is recorded and the thermal guard applies, as for
a micro-benchmark trial.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from agent.backends.serving import Endpoint, ServingBackend
from agent.device_state import (
    guard_reasons,
    read_state,
    state_environment,
    state_metrics,
    wait_until_cool,
)
from agent.energy import EnergyMeter, energy_environment, energy_sources
from agent.host_activity import OTHER_CPU_METRIC, OtherCpuMeter, busy_reason, other_cpu_limit
from agent.llm_eval import decode_with_vocabulary, load_llm_reference
from agent.serving.fidelity import SERVED_KLD_METHOD, TOP_K, served_fidelity
from agent.serving.load import measure_level
from agent.serving.plan import ServingPlan, split_options
from agent.serving.server_metrics import level_figures, scrape
from agent.serving.sse import RequestRecord, stream_chat
from edgefarm.domain import MeasureSettings, ServingLevel, TrialOutcome, median
from edgefarm.errors import ServingFailed, TaskError

MAX_PROMPTS = 64  # distinct prompts per trial (requests cycle through them)
FIDELITY_CHUNKS = 2  # reference chunks scored through the endpoint (first trial only)
FLAT_LEVELS = 16  # levels named in the trial's metrics (8 figures each, within 256)


def load_reference(reference_path: Path | None) -> dict[str, np.ndarray]:
    """The task's LLM reference (prompts and fidelity come from it)."""
    if reference_path is None:
        raise TaskError("a serving task needs the model's LLM reference (its prompts)")
    return load_llm_reference(reference_path)


def make_prompts(reference: dict[str, np.ndarray], prompt_tokens: int, count: int) -> list[str]:
    """``count`` prompts of ``prompt_tokens`` tokens each: consecutive windows of the
    reference's evaluation text (wrapping around), decoded with its vocabulary."""
    tokens = np.asarray(reference["tokens"])
    pieces = reference.get("vocab_offsets")
    if pieces is not None:  # special tokens (empty pieces) are no text
        tokens = tokens[np.diff(pieces)[np.clip(tokens, 0, len(pieces) - 2)] > 0]
    if len(tokens) < 1:
        raise TaskError("the LLM reference has no text tokens for prompts")
    prompts = []
    for i in range(max(1, count)):
        start = (i * prompt_tokens) % len(tokens)
        window = np.take(tokens, range(start, start + prompt_tokens), mode="wrap")
        prompts.append(decode_with_vocabulary(reference, window))
    return prompts


async def run_plan(
    endpoint: Endpoint,
    plan: ServingPlan,
    prompts: Sequence[str],
    metrics_path: str | None = None,
) -> list[ServingLevel]:
    """Every level of ``plan`` against ``endpoint``, one after another; with
    ``metrics_path``, the server's own figures of each level (read off the loop)."""

    async def send(prompt: str) -> RequestRecord:
        return await stream_chat(
            endpoint,
            prompt,
            plan.output_tokens,
            first_token_timeout_s=plan.first_token_timeout_s,
            idle_timeout_s=plan.first_token_timeout_s,
        )

    levels = []
    for level in plan.levels():
        if metrics_path:
            before = await asyncio.to_thread(scrape, endpoint.base_url, metrics_path)
        measured = await measure_level(level, prompts, send, plan.slo)
        if metrics_path:
            after = await asyncio.to_thread(scrape, endpoint.base_url, metrics_path)
            measured.server.update(level_figures(before, after))
        levels.append(measured)
    return levels


def level_metrics(levels: Sequence[ServingLevel]) -> dict[str, float]:
    """The headline figures of the first :data:`FLAT_LEVELS` levels as trial metrics
    ``serve.<label>.<figure>`` (every level's are in the trial's levels), and the first
    level's TTFT and TPOT as ``ttft_ms`` / ``tpot_ms`` (finite values only)."""
    out: dict[str, float] = {}
    keys = ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "e2e_p50_ms")
    keys_rates = ("output_tok_per_s", "request_per_s", "goodput_per_s")
    for level in levels[:FLAT_LEVELS]:
        summary = level.summary()
        tag = level.label.replace(" ", "_").replace("/", "")
        for key in keys + keys_rates:
            value = float(summary[key])
            if np.isfinite(value):
                out[f"serve.{tag}.{key}"] = value
        out[f"serve.{tag}.failed"] = float(level.failed)
    if levels and levels[0].ttft_ms:
        out["ttft_ms"] = median(levels[0].ttft_ms)
    if levels and levels[0].tpot_ms:
        out["tpot_ms"] = median(levels[0].tpot_ms)
    return out


def _peak_rss(pid: int | None) -> int:
    """A process's peak resident set size (Linux VmHWM; else its current RSS); 0 if gone."""
    if pid is None:
        return 0
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


@dataclass
class ServingTrial:
    """What one serving trial produced, beside its :class:`TrialOutcome`."""

    trial: TrialOutcome
    environment: dict[str, str]
    accuracy: dict[str, float]


EXTERNAL_ENERGY = "not measured: the endpoint runs outside this trial, off this host's meters"


def run_serving_trial(
    backend: ServingBackend,
    model_path: Path,
    eval_path: Path | None,
    settings: MeasureSettings,
    options: dict[str, str],
    compute_accuracy: bool = False,
    scheme: str = "",
) -> ServingTrial:
    """Load (start) the endpoint, run the plan, (when asked) score fidelity through the
    endpoint, stop; the trial, its environment and the fidelity figures."""
    plan_options, own_options = split_options(options)
    plan = ServingPlan.from_options(plan_options)
    reference = load_reference(eval_path)
    prompts = make_prompts(reference, settings.prompt_tokens, min(plan.requests, MAX_PROMPTS))
    backend.scheme = scheme
    cooldown = wait_until_cool(settings.max_start_temp_c, settings.cooldown_timeout_s)
    state_before = read_state()
    started = time.perf_counter()
    try:
        backend.load(model_path, settings, own_options)
        load_time_s = time.perf_counter() - started
        endpoint = backend.endpoint
        if endpoint is None:
            raise TaskError(f"{backend.NAME} loaded without an endpoint")
        pid = backend.server_pid()
        loaded_rss = _peak_rss(pid)
        # this host's meters see a server the trial started, not an external endpoint
        meters, no_energy = energy_sources() if pid else ([], [EXTERNAL_ENERGY])
        with (
            EnergyMeter(meters) as energy,
            OtherCpuMeter(own_pids=(pid,) if pid else ()) as others,
        ):
            began = time.perf_counter()
            levels = asyncio.run(run_plan(endpoint, plan, prompts, backend.metrics_path))
            duration_s = time.perf_counter() - began
        state_after = read_state()
        peak = _peak_rss(pid)
        environment = {
            **backend.environment(),
            **backend.serving_environment(),
            **energy_environment(meters, no_energy),
            **state_environment(state_after),
        }
        accuracy: dict[str, float] = {}
        if compute_accuracy and levels[0].ok_requests:
            accuracy = _fidelity(backend, reference, environment)
    finally:
        backend.stop()
    first = levels[0]
    if first.ok_requests == 0:
        raise ServingFailed(
            f"{first.label}: none of {first.requests} requests succeeded: "
            f"{first.errors[0] if first.errors else 'no reason given'}"
        )
    metrics = level_metrics(levels)
    metrics[OTHER_CPU_METRIC] = others.cores
    metrics["prompt_tokens"] = float(settings.prompt_tokens)
    metrics["output_tokens"] = float(plan.output_tokens)
    # energy of the whole sweep (prefill included) per generated token
    metrics.update(energy.figures(sum(sum(level.output_tokens) for level in levels)))
    metrics.update(state_metrics(state_before, state_after))
    # An endpoint the trial did not start may share the host: its CPU is not "other".
    limit = other_cpu_limit(settings.max_other_cpu_cores) if pid else 0.0
    reasons = [
        busy_reason(others.cores, limit, duration_s),
        *guard_reasons(settings.max_start_temp_c, cooldown, state_before, state_after, metrics),
    ]
    if first.failed:
        reasons.append(f"{first.label}: {first.failed} of {first.requests} requests failed")
    if len(first.tpot_ms) < 2:
        reasons.append(f"{first.label}: fewer than 2 requests with 2+ tokens to time")
    trial = TrialOutcome(
        samples_ms=list(first.tpot_ms),
        warmup_iterations=0,
        duration_s=duration_s,
        load_time_s=load_time_s,
        peak_rss_bytes=peak,
        load_rss_delta_bytes=loaded_rss,  # the server's: all of it is the model's
        valid=not any(reasons),
        invalid_reason="; ".join(r for r in reasons if r),
        metrics=metrics,
        serving=levels,
    )
    environment["serving.memory"] = "server's peak RSS" if pid else "not measured (external)"
    return ServingTrial(trial, environment, accuracy)


def _fidelity(
    backend: ServingBackend, reference: dict[str, np.ndarray], environment: dict[str, str]
) -> dict[str, float]:
    """Fidelity through the endpoint (:mod:`agent.serving.fidelity`); a server without
    prompt log-probabilities leaves it unmeasured, with the reason in the environment."""
    try:
        with backend.fidelity_endpoint(int(reference["n_ctx"])) as endpoint:
            figures = served_fidelity(
                endpoint, reference, chunks=FIDELITY_CHUNKS, shift=backend.LOGPROBS_SHIFT
            )
    except ServingFailed as err:
        environment["fidelity.served"] = f"not measured: {err}"
        return {}
    environment["fidelity.served"] = (
        f"{SERVED_KLD_METHOD}, k={TOP_K}, {int(figures['served_fidelity_positions'])} "
        f"positions, log-probabilities shifted by {int(figures['served_logprob_shift'])}"
    )
    return figures
