"""The serving workload as a farm task: the plan in the spec and the task options, the
prompts from the reference's vocabulary, whole trials in a real trial child against a
threaded OpenAI-compatible test server of this file's own (for failures real servers do
not produce on demand: a silent first token, a dropped stream, a malformed event, a
missing key), and serving levels on the wire, in the store and in the report."""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from agent.llm_eval import reference_from_chunks, save_llm_reference
from agent.runner import run_measurement
from agent.serving.plan import ServingPlan, Slo
from agent.serving.server_metrics import level_figures, parse
from agent.serving.workload import load_reference, make_prompts
from coordinator.spec import CampaignSpec
from coordinator.validation import check_result
from edgefarm.domain import MeasurementResult, MeasureSettings, ServingLevel, TrialOutcome
from edgefarm.errors import ArtifactError, ServingFailed, SpecError, TaskError
from protos.convert import result_from_pb, result_to_pb
from results.report import build_report, render
from results.rows import serving_levels
from results.schema import SCHEMA_VERSION
from results.store import ResultsStore

WORDS = ["", "Hello", " world", ",", " the", " river", " runs", "."]  # id 0: special


def vocab_reference(path: Path, tokens: list[int]) -> Path:
    """An LLM reference of ``tokens`` over :data:`WORDS`, with the vocabulary arrays,
    whose most likely next token is always the text's actual next token."""
    rng = np.random.default_rng(0)
    n_ctx = 8
    rows = []
    for start in range(0, len(tokens), n_ctx):
        chunk = tokens[start : start + n_ctx]
        if len(chunk) < 2:
            continue
        logits = rng.normal(0, 0.1, (len(chunk) - 1, len(WORDS)))
        logits[np.arange(len(chunk) - 1), chunk[1:]] += 4.0
        rows.append(logits - np.log(np.exp(logits).sum(axis=1, keepdims=True)))
    arrays = reference_from_chunks(rows, np.array(tokens), n_ctx, top_k=4, tail_samples=0)
    pieces = [w.encode() for w in WORDS]
    arrays["vocab_bytes"] = np.frombuffer(b"".join(pieces), dtype=np.uint8).copy()
    arrays["vocab_offsets"] = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])
    save_llm_reference(path, arrays)
    return path


def tokenize(text: str) -> list[str]:
    """The test server's tokenizer: greedy longest match over :data:`WORDS`."""
    out = []
    while text:
        word = max((w for w in WORDS if w and text.startswith(w)), key=len)
        out.append(word)
        text = text[len(word) :]
    return out


# ----------------------------------------------------------------------------- the plan


def test_the_plan_travels_as_options_and_back() -> None:
    plan = ServingPlan(
        concurrency=(1, 4),
        rates=(0.5, 2.0),
        arrival="poisson",
        requests=9,
        level_s=12.5,
        output_tokens=33,
        slo=Slo(250, 40),
        first_token_timeout_s=7,
    )
    options = plan.to_options()
    assert options["serving.concurrency"] == "1,4" and options["serving.rates"] == "0.5,2"
    back = ServingPlan.from_options({k.removeprefix("serving."): v for k, v in options.items()})
    assert back == plan
    assert [level.label() for level in back.levels()] == [
        "c=1",
        "c=4",
        "r=0.5/s poisson",
        "r=2/s poisson",
    ]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"burst": "1"}, "unknown serving option(s): burst"),
        ({"requests": "many"}, "serving option requests: cannot read 'many'"),
        ({"concurrency": "0"}, "serving options: concurrency levels must be >= 1"),
        ({"concurrency": "", "rates": ""}, "serving options: needs 1 to 64 levels, got 0"),
        ({"rates": "1", "arrival": "burst"}, "serving options: arrival must be one of"),
        ({"concurrency": ",".join(["1"] * 65)}, "needs 1 to 64 levels, got 65"),
    ],
)
def test_hostile_plan_options_are_one_line_task_errors(
    options: dict[str, str], expected: str
) -> None:
    with pytest.raises(TaskError) as info:
        ServingPlan.from_options(options)
    assert expected in str(info.value) and "\n" not in str(info.value)


SERVING_SPEC = """name: s
models:
  - name: m
    source: builtin:smollm2-135m
backends:
  - name: llama-server
    schemes: [Q8_0]
    serving:
      concurrency: [1, 2]
      requests: 5
      output_tokens: 12
  - name: openai-endpoint
    schemes: [served]
    serving:
      endpoint: http://127.0.0.1:11434/v1
      model: smollm2:135m
      api_key_env: OLLAMA_KEY
      rates: [1.5]
"""


def test_the_spec_writes_the_plan_and_the_endpoint_descriptor() -> None:
    spec = CampaignSpec.from_text(SERVING_SPEC, "s.yaml")
    server, endpoint = spec.variants()
    assert server.options["serving.concurrency"] == "1,2"
    assert server.options["serving.requests"] == "5" and server.convert == {}
    assert "serving.concurrency" not in endpoint.options  # rates only
    assert endpoint.options["serving.rates"] == "1.5"
    assert endpoint.convert == {
        "endpoint": "http://127.0.0.1:11434/v1",
        "model": "smollm2:135m",
        "api_key_env": "OLLAMA_KEY",
        "api": "openai",
    }


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "  - name: llama-server\n    schemes: [Q8_0]\n",
            "  - name: llama-cpp\n    schemes: [Q8_0]\n",
            "s.yaml:8: backends[0].serving: serving: is for serving backends",
        ),
        (
            "      endpoint: http://127.0.0.1:11434/v1\n",
            "",
            "s.yaml:14: backends[1].serving.endpoint: openai-endpoint needs serving.endpoint",
        ),
        (
            "http://127.0.0.1:11434/v1",
            "file:///etc/passwd",
            "s.yaml:15: backends[1].serving.endpoint: invalid endpoint 'file:///etc/passwd'",
        ),
        (
            "      output_tokens: 12\n",
            "      output_tokens: 12\n      model: x\n",
            "s.yaml:12: backends[0].serving.model: model is for openai-endpoint",
        ),
        (
            "      requests: 5\n",
            "      requests: 5\n      level_s: 400\n",
            "backends[0].serving: 2 level(s) of up to 400 s plus start-up need 920 s, over "
            "the trial time limit timeout_s=300",
        ),
        (
            "api_key_env: OLLAMA_KEY",
            "api_key_env: 'X; rm -rf /'",
            "backends[1].serving.api_key_env: invalid environment variable name",
        ),
        (
            "concurrency: [1, 2]",
            "concurrency: [0]",
            "s.yaml:9: backends[0].serving.concurrency[0]: input should be greater than or equal",
        ),
    ],
)
def test_bad_serving_specs_are_one_line(old: str, new: str, expected: str) -> None:
    assert old in SERVING_SPEC
    with pytest.raises(SpecError) as info:
        CampaignSpec.from_text(SERVING_SPEC.replace(old, new), "s.yaml")
    assert expected in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


# -------------------------------------------------------------------------- the prompts


def test_prompts_are_windows_of_the_reference_text_without_special_tokens(
    tmp_path: Path,
) -> None:
    reference = vocab_reference(tmp_path / "r.npz", [0, 1, 2, 3, 4, 5, 6, 7] * 3)
    prompts = make_prompts(load_reference(reference), prompt_tokens=3, count=3)
    assert prompts == ["Hello world,", " the river runs", ".Hello world"]
    with pytest.raises(TaskError, match="needs the model's LLM reference"):
        load_reference(None)


def test_an_old_reference_without_a_vocabulary_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "old.npz"
    rows = [np.log(np.full((7, 8), 1 / 8))]
    save_llm_reference(path, reference_from_chunks(rows, np.arange(8), 8, top_k=2, tail_samples=0))
    with pytest.raises(ArtifactError, match="carries no vocabulary"):
        make_prompts(load_reference(path), 2, 1)


# ------------------------------------------------------- whole trials, real child process


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    scenario = "normal"
    keys: list[str]  # the Authorization headers the server saw

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # readiness: GET /v1/models; GET /metrics as vLLM's
        body = b'{"data": [{"id": "m"}]}'
        if self.path == "/metrics" and type(self).scenario == "ollama":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/metrics":
            served = len(type(self).keys)
            body = (
                "# HELP vllm:time_to_first_token_seconds TTFT\n"
                "# TYPE vllm:time_to_first_token_seconds histogram\n"
                f'vllm:time_to_first_token_seconds_sum{{model_name="m"}} {0.02 * served}\n'
                f'vllm:time_to_first_token_seconds_count{{model_name="m"}} {served}\n'
                f'vllm:generation_tokens_total{{model_name="m"}} {4 * served}\n'
                "vllm:num_requests_waiting 0\n"
            ).encode()
        self.send_response(200)
        self.send_header("Server", "test-endpoint/1.0")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if type(self).scenario == "ollama":
            self._ollama_chat(request)
            return
        if self.path.endswith("/completions") and not self.path.endswith("/chat/completions"):
            self._logprobs(request["prompt"], request["logprobs"])
            return
        type(self).keys.append(self.headers.get("Authorization", ""))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        scenario = type(self).scenario
        if scenario == "silent":
            time.sleep(3)
            return
        for i in range(4):
            if scenario == "drop" and i == 2:
                return  # closes before [DONE]
            if scenario == "malformed" and i == 1:
                self.wfile.write(b"data: {not json\n\n")
                self.wfile.flush()
                continue
            event = {"choices": [{"delta": {"content": f"t{i}"}}]}
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
            time.sleep(0.01)
        self.wfile.write(b"data: [DONE]\n\n")

    def _ollama_chat(self, request: dict[str, object]) -> None:
        """Ollama's native chat: NDJSON lines, thinking first, its timings last."""
        if self.path != "/api/chat":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        type(self).keys.append(self.headers.get("Authorization", ""))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Connection", "close")
        self.end_headers()
        lines = [{"message": {"role": "assistant", "thinking": "hm"}, "done": False}]
        lines += [
            {"message": {"role": "assistant", "content": f"t{i}"}, "done": False} for i in range(3)
        ]
        lines.append(
            {
                "message": {"role": "assistant", "content": ""},
                "done": True,
                "total_duration": 90_000_000,
                "load_duration": 5_000_000,
                "prompt_eval_count": 4,
                "prompt_eval_duration": 8_000_000,
                "eval_count": 4,
                "eval_duration": 40_000_000,
            }
        )
        for line in lines:
            self.wfile.write(json.dumps(line).encode() + b"\n")
            self.wfile.flush()
            time.sleep(0.005)

    def _logprobs(self, prompt: str, k: int) -> None:
        """Prompt log-probabilities: the text's actual next token is the most likely
        (another model's server: always "Hello")."""
        tokens = tokenize(prompt)
        top: list[dict[str, float] | None] = [None]
        for token in tokens[1:]:
            best = "Hello" if type(self).scenario == "wrong-model" else token
            others = [w for w in WORDS if w and w != best][: k - 1]
            top.append({best: -0.05, **{w: -4.0 - i for i, w in enumerate(others)}})
        logprobs = {"tokens": tokens, "token_logprobs": [None] * len(tokens), "top_logprobs": top}
        body = json.dumps({"choices": [{"text": prompt, "logprobs": logprobs}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def fake_endpoint(scenario: str) -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"scenario": scenario, "keys": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", handler
    finally:
        server.shutdown()
        server.server_close()


def _measure(tmp_path: Path, url: str, key_env: str = "", api: str = "openai") -> MeasurementResult:
    descriptor = tmp_path / "endpoint.json"
    fields = {"endpoint": url, "model": "m", "api_key_env": key_env, "api": api}
    descriptor.write_text(json.dumps(fields))
    reference = vocab_reference(tmp_path / "r.npz", [1, 2, 3, 4, 5, 6, 7] * 4)
    plan = ServingPlan(concurrency=(1, 2), requests=4, output_tokens=4, first_token_timeout_s=1)
    settings = MeasureSettings(trials=1, prompt_tokens=4, timeout_s=60, max_other_cpu_cores=0)
    report = asyncio.run(
        run_measurement(
            "openai-endpoint", "served", descriptor, reference, settings, plan.to_options()
        )
    )
    return MeasurementResult(
        "t",
        1,
        "l",
        "a",
        "d",
        True,
        trials=report.trials,
        accuracy=report.accuracy,
        environment=report.environment,
    )


def test_a_trial_against_an_external_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_SERVING_KEY", "sekrit")
    with fake_endpoint("normal") as (url, handler):
        result = _measure(tmp_path, url, "TEST_SERVING_KEY")
    assert set(handler.keys) == {"Bearer sekrit"} and len(handler.keys) == 8
    (trial,) = result.trials
    assert trial.valid, trial.invalid_reason
    assert [level.label for level in trial.serving] == ["c=1", "c=2"]
    for level in trial.serving:
        assert level.requests == 4 and level.failed == 0 and level.output_tokens == [4] * 4
        assert len(level.itl_ms) == 12 and len(level.tpot_ms) == 4
    assert trial.samples_ms == trial.serving[0].tpot_ms
    assert trial.metrics["serve.c=2.output_tok_per_s"] > 0 and trial.metrics["ttft_ms"] > 0
    # this host's meters do not see a server elsewhere: no energy, and the reason
    assert not any(k.startswith("energy") for k in trial.metrics)
    assert result.environment["energy.source"].startswith("none: not measured: the endpoint")
    # the endpoint's own /metrics, read around each level
    for level in trial.serving:
        assert level.server == {
            "generation_tokens": 16.0,
            "num_requests_waiting": 0.0,
            "time_to_first_token_ms": pytest.approx(20.0),
        }
    # the endpoint serves the reference's model: its top token is the reference's
    assert result.accuracy["served_top1_agreement"] == 1.0
    assert result.accuracy["served_fidelity_positions"] == 14  # 2 chunks of 8 tokens scored
    assert 0 <= result.accuracy["served_kld_topk_mean"] < 0.2


def test_a_server_serving_another_model_is_caught_by_its_log_probabilities(
    tmp_path: Path,
) -> None:
    with fake_endpoint("wrong-model") as (url, _):
        result = _measure(tmp_path, url)
    assert result.trials[0].valid  # it streams fine...
    assert result.accuracy["served_top1_agreement"] < 0.3  # ...but not the reference's model
    assert result.accuracy["served_kld_topk_mean"] > 1.0


def test_ollamas_native_api_and_its_own_timings(tmp_path: Path) -> None:
    with fake_endpoint("ollama") as (url, handler):
        result = _measure(tmp_path, url.removesuffix("/v1"), api="ollama")
    assert len(handler.keys) == 8
    (trial,) = result.trials
    assert trial.valid, trial.invalid_reason
    for level in trial.serving:
        assert level.failed == 0 and level.output_tokens == [4] * 4  # eval_count
        assert len(level.itl_ms) == 12  # thinking + 3 content lines: 4 token timestamps
        assert level.server == {
            "ollama.eval_count": 4.0,
            "ollama.eval_duration_ms": 40.0,
            "ollama.load_duration_ms": 5.0,
            "ollama.prompt_eval_count": 4.0,
            "ollama.prompt_eval_duration_ms": 8.0,
            "ollama.total_duration_ms": 90.0,
            "ollama.eval_tok_per_s": 100.0,
        }
    # Ollama returns no prompt log-probabilities: fidelity is left out, with the reason
    assert result.accuracy == {}
    assert result.environment["fidelity.served"].startswith("not measured: ")
    assert "HTTP 404" in result.environment["fidelity.served"]


@pytest.mark.parametrize(
    ("scenario", "reason"),
    [
        ("silent", "no first token within the time limit"),
        ("drop", "the connection closed before the end of the stream"),
        ("malformed", "malformed event: '{not json'"),
    ],
)
def test_a_broken_endpoint_fails_its_task_with_a_typed_reason(
    tmp_path: Path, scenario: str, reason: str
) -> None:
    with fake_endpoint(scenario) as (url, _), pytest.raises(ServingFailed) as info:
        _measure(tmp_path, url)
    assert info.value.kind == "serving_error"
    assert str(info.value) == f"c=1: none of 4 requests succeeded: {reason}"


def test_a_missing_api_key_fails_before_any_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TEST_SERVING_KEY", raising=False)
    with (
        fake_endpoint("normal") as (url, handler),
        pytest.raises(ServingFailed, match="TEST_SERVING_KEY"),
    ):
        _measure(tmp_path, url, "TEST_SERVING_KEY")
    assert handler.keys == []


def test_prometheus_text_becomes_per_level_figures() -> None:
    before = parse(
        "# TYPE x counter\n"
        'vllm:e2e_request_latency_seconds_sum{a="1"} 1.0\n'
        'vllm:e2e_request_latency_seconds_sum{a="2"} 1.0\n'
        "vllm:e2e_request_latency_seconds_count 4\n"
        "vllm:prompt_tokens_total 100\n"
        "vllm:prompt_tokens_created 1.7e9\n"
        "garbage line\n"
        "vllm:kv_cache_usage_perc NaN\n"
    )
    assert before["vllm:e2e_request_latency_seconds_sum"] == 2.0
    after = parse(
        "vllm:e2e_request_latency_seconds_sum 5.0\n"
        "vllm:e2e_request_latency_seconds_count 6\n"
        "vllm:prompt_tokens_total 164\n"
        "vllm:kv_cache_usage_perc 0.25\n"
    )
    assert level_figures(before, after) == {
        "e2e_request_latency_ms": 1500.0,  # 3 s over 2 requests
        "kv_cache_usage_perc": 0.25,
        "prompt_tokens": 64.0,
    }
    assert level_figures(after, before) == {}  # a restarted server: no negative figures


# ----------------------------------------------------- on the wire, in the store, reports


def _level(label: str, ttft: list[float], wall_s: float = 2.0) -> ServingLevel:
    return ServingLevel(
        label=label,
        concurrency=int(label[2:]),
        requests=len(ttft),
        wall_s=wall_s,
        goodput_requests=len(ttft),
        slo_ttft_ms=500,
        slo_tpot_ms=100,
        ttft_ms=ttft,
        tpot_ms=[10.0] * len(ttft),
        e2e_ms=[t + 100 for t in ttft],
        output_tokens=[11] * len(ttft),
        itl_ms=[10.0] * 10 * len(ttft),
    )


def _result(levels: list[list[ServingLevel]]) -> MeasurementResult:
    trials = [
        TrialOutcome([10.0, 11.0], 0, 4.0, 0.5, 1 << 20, 0, True, serving=trial) for trial in levels
    ]
    return MeasurementResult("t", 1, "l", "a", "d", True, trials=trials)


def test_levels_cross_the_wire_and_hostile_ones_are_refused() -> None:
    result = _result([[_level("c=1", [50.0, 60.0]), _level("c=2", [90.0, 95.0])]])
    wire = result_to_pb(result)
    assert check_result(wire) is None
    back = result_from_pb(wire, "a", "d")
    assert back.trials[0].serving == result.trials[0].serving
    wire.trials[0].serving[1].ttft_ms.append(math.nan)
    assert (
        check_result(wire) == "trials[0].serving[1].ttft_ms must hold finite, non-negative numbers"
    )
    wire = result_to_pb(_result([[_level("c=1", [1.0])] * 65]))
    assert check_result(wire) == "trials[0].serving has 65 levels (at most 64)"
    wire = result_to_pb(result)
    wire.trials[0].serving[0].failed = 9
    assert "more failed or good requests than requests" in (check_result(wire) or "")


def test_the_store_pools_trials_per_level_and_the_report_charts_them() -> None:
    result = _result(
        [[_level("c=1", [50.0, 60.0]), _level("c=2", [90.0])], [_level("c=1", [70.0])]]
    )
    c1, c2 = serving_levels(result.trials) or []
    assert c1["trials"] == 2 and c1["requests"] == 3 and c1["samples"]["ttft_ms"] == [50, 60, 70]
    assert c1["ttft_p50_ms"] == 60.0 and c1["output_tok_per_s"] == pytest.approx(33 / 4.0)
    assert c2["trials"] == 1 and c2["e2e_p50_ms"] == 190.0
    base = {"model": "m", "device_name": "dev", "ok": True, "valid": True, "scheme": "Q8_0"}
    served = {
        **base,
        "backend": "llama-server",
        "serving": [c1, c2],
        "artifact_sha256": "a",
        "lat_p50_ms": 10.0,
        "load_time_s": 0.5,
    }
    micro = {**base, "backend": "llama-cpp", "artifact_sha256": "a", "lat_p50_ms": 5.0}
    micro["metrics"] = {"prompt_tok_per_s": 500.0, "ttft_ms": 80.0}
    report = build_report("r", [served, micro])
    assert [s.label for s in report.serving] == ["llama-server/Q8_0"]
    assert all(c.framework != "llama-server" for c in report.comparison)
    (pair,) = report.serving_vs_in_process
    assert pair.speed_ratio == pytest.approx(0.5) and pair.in_process_ttft_ms == 80.0
    html = render(report, "html")
    assert html.count('class="level"') == 2 and 'class="sweep"' in html
    assert "<script" not in html
    assert json.loads(render(report, "json"))["serving"][0]["points"][0]["label"] == "c=1"


def test_a_v6_store_gains_the_serving_column(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    ResultsStore.open(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as db:  # make it look like a v6 store
        db.execute("ALTER TABLE results DROP COLUMN serving")
        db.execute("UPDATE meta SET value='6' WHERE key='schema_version'")
    ResultsStore.open(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(results)")}
        version = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
    assert "serving" in columns and version == str(SCHEMA_VERSION)
