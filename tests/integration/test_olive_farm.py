"""Microsoft Olive through the real farm: an Olive command and an Olive workflow file
applied to the digit classifier's ONNX on Ray, offline, measured by onnxruntime, with
Olive's version and command in the artifact's provenance; a second run reuses them, and
an Olive failure fails its own variant with Olive's message."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.localfarm import LocalFarm
from coordinator.runner import CampaignFailed, run_campaign
from tests.integration.conftest import open_store

pytestmark = pytest.mark.integration
for _module in ("ray", "olive", "onnxruntime", "sklearn"):
    pytest.importorskip(_module, reason=f"{_module} (an extra of the full suite) is not installed")

MakeFarm = Callable[[int], LocalFarm]
INT8 = "quantize --implementation ort --precision int8"


def _spec(tmp_path: Path, schemes: str, convert: str) -> Path:
    workflow = {"passes": {"int4": {"type": "OnnxBlockWiseRtnQuantization", "block_size": 32}}}
    (tmp_path / "int4-workflow.json").write_text(json.dumps(workflow))
    spec = tmp_path / "olive.yaml"
    spec.write_text(
        f"""name: olive
models:
  - name: digits-mlp
    source: builtin:digits-mlp
backends:
  - name: onnxruntime
    schemes: [{schemes}]
    convert:
{convert}
measurement:
  warmup_iterations: 5
  min_iterations: 50
  min_duration_s: 0.05
  trials: 1
  threads: 1
  timeout_s: 120
  max_other_cpu_cores: 0
"""
    )
    return spec


@pytest.mark.timeout(900)  # two Olive runs (~20 s each) and three measurements
def test_olive_variants_are_made_offline_and_measured(make_farm: MakeFarm, tmp_path: Path) -> None:
    farm = make_farm(1)
    spec = _spec(
        tmp_path,
        "fp32, olive-int8, olive-int4",
        f"      olive-int8: {{olive: '{INT8}'}}\n"
        "      olive-int4: {olive_workflow: 'file:int4-workflow.json'}",
    )
    campaign_id = run_campaign(farm.address, farm.token, spec)
    with open_store(farm) as store:
        rows = {r["scheme"]: r for r in store.results_for_campaign(campaign_id)}
        assert set(rows) == {"fp32", "olive-int8", "olive-int4"}
        for row in rows.values():
            assert row["ok"] and row["valid"], row
            assert row["accuracy"]["top1"] > 0.9, row["accuracy"]
        made = {  # a model with external data files is stored as one folder (.onnx.tar)
            r.name.removesuffix(".tar"): r.provenance for r in store.list_artifacts()
        }
        int8 = made["digits-mlp.olive-int8.onnx"]
        assert int8["tool"] == "olive" and int8["tool_versions"]["olive-ai"] == "0.13.0"
        assert int8["olive_command"] == INT8 and int8["network_attempts"] == 0
        int4 = made["digits-mlp.olive-int4.onnx"]
        assert int4["olive_workflow"]["passes"]["int4"]["block_size"] == 32
        assert int4["op_types"]["MatMulNBits"] > 0
        assert rows["olive-int4"]["model_size_bytes"] < rows["fp32"]["model_size_bytes"] / 2
        first = store.get_campaign(campaign_id)
        assert first is not None and first.conversions_run >= 2
    again = run_campaign(farm.address, farm.token, spec, fresh=True)
    with open_store(farm) as store:
        second = store.get_campaign(again)
        assert second is not None and second.conversions_run == 0


@pytest.mark.timeout(600)
def test_an_olive_failure_fails_its_own_variant(make_farm: MakeFarm, tmp_path: Path) -> None:
    farm = make_farm(1)
    spec = _spec(
        tmp_path,
        "fp32, olive-bad",
        "      olive-bad: {olive: 'quantize --implementation olive --precision int8'}",
    )
    with pytest.raises(CampaignFailed):
        run_campaign(farm.address, farm.token, spec)
    with open_store(farm) as store:
        (failed,) = store.query_results(ok=False)
        assert failed["scheme"] == "olive-bad" and failed["error_kind"] == "conversion_error"
        assert failed["error_message"].startswith(
            "preparing olive-bad failed: Olive failed on model.onnx: ValueError: Quantization"
        )
        (good,) = store.query_results(ok=True)
        assert good["scheme"] == "fp32"
