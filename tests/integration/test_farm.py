"""The real thing on loopback: coordinator (local Ray) + agent processes + onnxruntime +
a SQLite file. Each test starts its own farm."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.localfarm import LocalFarm
from coordinator.runner import run_campaign
from edgefarm.domain import TaskStatus
from edgefarm.errors import CampaignFailed
from results.store import ResultsStore
from tests.integration.conftest import cli, open_store, wait_until, write_spec

pytestmark = pytest.mark.integration
pytest.importorskip("onnxruntime", reason="the onnxruntime extra is not installed")
pytest.importorskip("ray", reason="the coordinator extra is not installed")

MakeFarm = Callable[[int], LocalFarm]


def test_campaign_runs_on_two_agents_and_is_reused(make_farm: MakeFarm, tmp_path: Path) -> None:
    farm = make_farm(2)
    spec = write_spec(tmp_path / "e2e.yaml", "e2e", ["fp32", "int8-dynamic", "int8-static"])
    campaign_id = run_campaign(farm.address, farm.token, spec)
    with open_store(farm) as store:
        rows = store.results_for_campaign(campaign_id, samples=True)
        assert {r["scheme"] for r in rows} == {"fp32", "int8-dynamic", "int8-static"}
        for row in rows:
            assert row["ok"] and row["valid"], row
            assert row["lat_p50_ms"] > 0 and row["peak_rss_bytes"] > 0
            assert row["model_size_bytes"] > 0 and row["trials"] == 2
            assert 0.8 < row["accuracy"]["top1"] <= 1.0
            assert len(row["samples_ms"]) >= 2 * 50
        fp32 = next(r for r in rows if r["scheme"] == "fp32")
        assert fp32["accuracy"]["agreement"] == 1.0
        first = store.get_campaign(campaign_id)
        assert first is not None and first.conversions_run >= 3
    # The CLI reads the same rows back.
    listed = cli("results", "list", "--json", "--campaign", campaign_id, "--store", farm.store_url)
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 3
    # ...and so does the coordinator: samples only when asked.
    with farm.client() as client:
        slim = {r["result_id"]: r for r in client.results(campaign_id=campaign_id)}
        full = {r["result_id"]: r for r in client.results(campaign_id=campaign_id, samples=True)}
    assert all("samples_ms" not in r for r in slim.values())
    assert {i: r["samples_ms"] for i, r in full.items()} == {
        r["result_id"]: r["samples_ms"] for r in rows
    }
    # A second run redoes neither conversion nor measurement.
    again = run_campaign(farm.address, farm.token, spec)
    with open_store(farm) as store:
        second = store.get_campaign(again)
        assert second is not None and second.conversions_run == 0
        assert second.conversions_cached >= 3
        counts = store.campaign_counts(again)
        assert counts[TaskStatus.REUSED] == 3
        rows2 = store.results_for_campaign(again)
        assert sorted(r["result_id"] for r in rows2) == sorted(r["result_id"] for r in rows)


def test_agent_killed_mid_task(make_farm: MakeFarm, tmp_path: Path) -> None:
    farm = make_farm(2)
    spec = write_spec(tmp_path / "kill.yaml", "kill", ["fp32"], min_duration_s=2.0, trials=3)
    with farm.client() as client:
        reply = client.submit(spec.read_text(), str(spec))
    store = open_store(farm)
    (task,) = store.tasks_for_campaign(reply.campaign_id)

    def assigned() -> bool:
        t = store.get_task(task.task_id)
        return t is not None and t.status == TaskStatus.ASSIGNED

    wait_until(assigned, 60, "the task to be assigned")
    holder_id = store.get_task(task.task_id).agent_id  # type: ignore[union-attr]
    names = {d.agent_id: d.agent_name for d in store.list_devices_seen()}
    victim = names[holder_id]
    wait_until(
        lambda: (
            (farm.home / f"agent-{victim}" / "artifacts").exists()
            and any((farm.home / f"agent-{victim}" / "artifacts").iterdir())
        ),
        30,
        "the agent to start measuring",
    )
    farm.kill_agent(victim)

    def finished() -> bool:
        t = store.get_task(task.task_id)
        return t is not None and t.status in {TaskStatus.DONE, TaskStatus.FAILED}

    wait_until(finished, 120, "the task to finish on the other agent")
    rows = store.query_results(campaign_id=reply.campaign_id)
    assert len(rows) == 1, rows
    (row,) = rows
    assert row["ok"] and row["agent_id"] != holder_id and row["attempt"] == 2
    store.close()


def test_coordinator_restarted_mid_campaign(make_farm: MakeFarm, tmp_path: Path) -> None:
    farm = make_farm(1)
    spec = write_spec(
        tmp_path / "restart.yaml", "restart", ["fp32", "fp16", "int8-dynamic"], min_duration_s=0.5
    )
    with farm.client() as client:
        reply = client.submit(spec.read_text(), str(spec))
    store = open_store(farm)
    wait_until(
        lambda: store.campaign_counts(reply.campaign_id).get(TaskStatus.DONE, 0) >= 1,
        90,
        "a first result",
    )
    farm.kill_coordinator()
    farm.start_coordinator()  # same port, same store: resumes from the store
    with farm.client() as client:
        final = list(client.watch(reply.campaign_id))[-1]
    assert final.finished and final.tasks_failed == 0
    rows = store.query_results(campaign_id=reply.campaign_id)
    assert sorted(r["scheme"] for r in rows) == ["fp16", "fp32", "int8-dynamic"]
    assert len({r["task_id"] for r in rows}) == len(rows) == 3
    store.close()


def test_corrupt_onnx_fails_one_task_and_agent_stays_up(
    make_farm: MakeFarm, tmp_path: Path
) -> None:
    farm = make_farm(1)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07this is not an onnx protobuf" * 50)
    bad = write_spec(tmp_path / "bad.yaml", "corrupt", ["fp32"], source=f"file:{corrupt}")
    with pytest.raises(CampaignFailed):
        run_campaign(farm.address, farm.token, bad)
    with open_store(farm) as store:
        (row,) = store.query_results(model="digits-mlp", ok=False)
        assert row["error_kind"] == "model_load_error"
    # the same agent is still up and measures the next campaign
    good = write_spec(tmp_path / "good.yaml", "good", ["fp32"])
    run_campaign(farm.address, farm.token, good)
    assert all(proc.poll() is None for proc in farm.agent_procs.values())


def test_wrong_token_is_refused(make_farm: MakeFarm, tmp_path: Path) -> None:
    farm = make_farm(0)
    proc = cli(
        "agent",
        "serve",
        "--coordinator",
        farm.address,
        "--token",
        "wrong",
        "--name",
        "intruder",
        "--work-dir",
        str(tmp_path / "w"),
        timeout=60,
    )
    assert proc.returncode == 6
    assert "refused" in proc.stderr and "invalid fleet token" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_spec_is_one_line(tmp_path: Path) -> None:
    spec = tmp_path / "typo.yaml"
    spec.write_text(
        "name: typo\nmodels:\n  - name: m\n    source: builtin:digits-mlp\n"
        "backends:\n  - name: onnxruntime\n    schemes: [fp32, int3]\n"
    )
    proc = cli("campaign", "run", str(spec), "--dry-run")
    assert proc.returncode == 3
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "typo.yaml:7" in lines[0] and "int3" in lines[0]


def test_farm_on_postgresql(tmp_path: Path) -> None:
    url = os.environ.get("EDGEFARM_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("set EDGEFARM_TEST_POSTGRES_URL (a throwaway database) to run on PostgreSQL")
    import sqlalchemy as sa

    from results.schema import metadata

    engine = sa.create_engine(url)
    metadata.drop_all(engine)
    try:
        spec = write_spec(tmp_path / "pg.yaml", "pg", ["fp32", "int8-dynamic"])
        with LocalFarm(home=tmp_path / "home", store_url=url, agents=1) as farm:
            campaign_id = run_campaign(farm.address, farm.token, spec)
        with ResultsStore.open(url) as store:
            rows = store.results_for_campaign(campaign_id)
            assert sorted(r["scheme"] for r in rows) == ["fp32", "int8-dynamic"]
            assert all(r["ok"] and r["valid"] and r["lat_p50_ms"] > 0 for r in rows)
    finally:
        metadata.drop_all(engine)
        engine.dispose()


def test_backend_missing_on_every_device_is_named_and_the_rest_runs(
    make_farm: MakeFarm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    farm = make_farm(1)
    spec = write_spec(tmp_path / "extras.yaml", "extras", ["fp32"])
    text = spec.read_text().replace(
        "backends:\n", "backends:\n  - name: qai-hub\n    schemes: [fp32]\n", 1
    )
    spec.write_text(text)
    campaign_id = run_campaign(farm.address, farm.token, spec)
    err = capsys.readouterr().err
    assert "backend 'qai-hub' is not installed on" in err and "'qai-hub' extra" in err
    with open_store(farm) as store:
        (row,) = store.results_for_campaign(campaign_id)
        assert row["backend"] == "onnxruntime" and row["ok"]
