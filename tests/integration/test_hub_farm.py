"""Qualcomm AI Hub devices in a real farm: a coordinator (local Ray), an ordinary agent and a
hub agent process serving two hosted devices through the TEST DOUBLE of ``qai_hub``
(``tests/doubles`` first on its PYTHONPATH); and the real client without a token."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

import tests.doubles.qai_hub as double
from agent.hub.journal import SUBMITTED, Journal
from agent.hub.service import JOURNAL_DIR
from coordinator.localfarm import LocalFarm
from coordinator.runner import run_campaign
from edgefarm.domain import TaskStatus
from tests.integration.conftest import ROOT, cli, open_store, wait_until

pytestmark = pytest.mark.integration
pytest.importorskip("onnxruntime", reason="the onnxruntime extra is not installed")
pytest.importorskip("ray", reason="the coordinator extra is not installed")

MakeFarm = Callable[[int], LocalFarm]
HUB_SELECTION = ["--attribute", "os:android", "--attribute", "framework:qnn"]


def _spec(path: Path, hub_schemes: str) -> Path:
    path.write_text(
        f"""name: {path.stem}
models:
  - name: digits-mlp
    source: builtin:digits-mlp
backends:
  - name: onnxruntime
    schemes: [fp32]
  - name: qai-hub
    schemes: [{hub_schemes}]
devices:
  - selector: {{backend: onnxruntime}}
  - selector: {{form_factor: phone, accelerator: qnn-htp}}
measurement:
  warmup_iterations: 5
  min_iterations: 50
  min_duration_s: 0.2
  trials: 1
  threads: 1
  timeout_s: 60
"""
    )
    return path


def _start_hub_agent(farm: LocalFarm, tmp_path: Path) -> None:
    ini = tmp_path / "hub.ini"
    ini.write_text("[api]\napi_token = test-token\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests" / "doubles"), str(ROOT)])
    env[double.STATE_ENV] = str(tmp_path / "hub-state")
    args = [*HUB_SELECTION, "--hub-config", str(ini), "--poll-interval", "0.1"]
    farm.start_hub_agent("hub", [*args, "--rate-limit-backoff", "0.05"], env)


def test_hub_devices_measure_fp32_and_int8_and_a_restart_resubmits_nothing(
    make_farm: MakeFarm, tmp_path: Path
) -> None:
    state = tmp_path / "hub-state"
    double.write_config(state, job_seconds=1.0, rate_limit_first=2)
    farm = make_farm(1)
    _start_hub_agent(farm, tmp_path)
    farm.wait_for_agents(3)
    spec = _spec(tmp_path / "hub.yaml", "fp32, int8")
    with farm.client() as client:
        reply = client.submit(spec.read_text(), str(spec))
    assert reply.tasks_total == 1 + 2 * 2 and not reply.warnings
    journal = Journal(farm.home / "agent-hub" / JOURNAL_DIR)
    wait_until(
        lambda: any(e.state == SUBMITTED and e.step != "upload" for e in journal.entries()),
        90,
        "a first hub job to be journalled",
    )
    farm.kill_agent("hub")  # while waiting on the job, which runs on at the "hub"
    _start_hub_agent(farm, tmp_path)
    with farm.client() as client:
        final = list(client.watch(reply.campaign_id))[-1]
    assert final.finished and final.tasks_failed == 0, final

    with open_store(farm) as store:
        assert store.campaign_counts(reply.campaign_id)[TaskStatus.DONE] == 5
        rows = store.results_for_campaign(reply.campaign_id)
    hub_rows = [r for r in rows if r["backend"] == "qai-hub"]
    assert sorted((r["device_id"], r["scheme"]) for r in hub_rows) == [
        ("qai-hub:samsung-galaxy-s23-family", "fp32"),
        ("qai-hub:samsung-galaxy-s23-family", "int8"),
        ("qai-hub:samsung-galaxy-s24-family", "fp32"),
        ("qai-hub:samsung-galaxy-s24-family", "int8"),
    ]
    for row in hub_rows:
        assert row["ok"] and row["valid"], row
        assert row["lat_p50_ms"] > 0 and row["peak_rss_bytes"] > 0 and row["load_time_s"] > 0
        assert row["metrics"]["npu_layers"] > 0 and row["metrics"]["cpu_layers"] == 0
        assert row["metrics"]["inference_memory_peak_high_bytes"] > 0
        assert 0.8 < row["accuracy"]["top1"] <= 1.0
        assert row["environment"]["qai_hub.target_runtime"] == "qnn_context_binary"
    assert all(r["accuracy"]["agreement"] == 1.0 for r in hub_rows if r["scheme"] == "fp32")
    (local,) = [r for r in rows if r["backend"] == "onnxruntime"]
    assert local["ok"] and local["device_id"] != hub_rows[0]["device_id"]

    # Each (model, scheme, device) job was submitted exactly once despite the restart
    # and the rate-limited submissions; the int8 quantize job serves both devices.
    submitted = Counter(
        (job["name"].rsplit(" #", 1)[0], (job["device"] or {}).get("name"), job["profile"])
        for job in double.jobs(state)
    )
    assert set(submitted.values()) == {1}, submitted
    kinds = Counter(job["type"] for job in double.jobs(state))
    assert kinds == {"quantize": 1, "compile": 4, "inference": 8}
    assert double.counters(state)["rate_limited"] == 2


def test_without_a_token_the_hub_agent_says_so_and_the_campaign_runs_its_local_devices(
    make_farm: MakeFarm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    farm = make_farm(1)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", double.STATE_ENV)}
    env.update(HOME=str(tmp_path), QAIHUB_CLIENT_INI=str(tmp_path / "missing.ini"))
    proc = cli(
        "agent",
        "hub",
        "--coordinator",
        farm.address,
        *HUB_SELECTION,
        "--work-dir",
        str(tmp_path / "hub"),
        env=env,
        timeout=60,
    )
    assert proc.returncode == 10, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "missing.ini" in lines[0] and "qai-hub configure --api_token" in lines[0]

    campaign_id = run_campaign(farm.address, farm.token, _spec(tmp_path / "nohub.yaml", "fp32"))
    hub_lines = [line for line in capsys.readouterr().err.splitlines() if "qai-hub" in line]
    assert len(hub_lines) == 1 and "edgefarm agent hub" in hub_lines[0], hub_lines
    with open_store(farm) as store:
        (row,) = store.results_for_campaign(campaign_id)
    assert row["backend"] == "onnxruntime" and row["ok"]
