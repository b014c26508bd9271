"""Nightly runs end to end: a real farm, three nights, an injected slowdown."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.localfarm import LocalFarm
from tests.integration.conftest import cli, open_store, write_spec

pytestmark = pytest.mark.integration
pytest.importorskip("onnxruntime", reason="the onnxruntime extra is not installed")
pytest.importorskip("ray", reason="the coordinator extra is not installed")

MakeFarm = Callable[[int], LocalFarm]


def _night(farm: LocalFarm, suite: Path, label: str, reports: Path) -> tuple[int, str]:
    done = cli(
        "nightly", "run", str(suite), "--coordinator", farm.address, "--token", farm.token,
        "--store", farm.store_url, "--night", label, "--report-dir", str(reports),
        "--report-format", "json",
        timeout=400,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def test_two_nights_then_an_injected_slowdown(make_farm: MakeFarm, tmp_path: Path) -> None:
    farm = make_farm(1)
    campaign = tmp_path / "campaign.yaml"
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: it-nightly\ncampaign: campaign.yaml\n")
    reports = tmp_path / "reports"

    def spec(options: str) -> None:
        write_spec(campaign, "it-nightly", ["int8-static"], trials=5, min_duration_s=0.1,
                   options=options)  # fmt: skip

    spec("{}")
    rc, out = _night(farm, suite, "night-1", reports)
    assert rc == 0, out
    assert "first night of the suite" in out
    rc, out = _night(farm, suite, "night-2", reports)
    assert rc == 0, out  # nothing changed: nothing raised
    # Tonight's toolchain setting costs well over 5% (no graph optimizations).
    spec("{graph_optimization_level: disable}")
    rc, out = _night(farm, suite, "night-3", reports)
    assert rc == 11, out
    assert "confirmed by a re-run" in out

    with open_store(farm) as store:
        runs = store.nightly_runs("it-nightly")
        assert [(r.night, r.status) for r in runs] == [
            ("night-1", "passed"),
            ("night-2", "passed"),
            ("night-3", "regressed"),
        ]
        assert runs[1].baseline_run_id == runs[0].run_id
        assert runs[2].baseline_run_id == runs[1].run_id  # the last passing night
        assert not [
            v for v in runs[1].summary["verdicts"]
            if v["status"] == "regression" and v["confirmed"] is not False
        ]  # fmt: skip
        latency = [
            v for v in runs[2].summary["verdicts"] if v["key"]["metric"] == "latency_p50"
        ]
        assert latency and latency[0]["status"] == "regression"
        assert latency[0]["confirmed"] is True and latency[0]["ratio"] > 1.05
        # Baseline and candidate were measured interleaved, block by block, in one run.
        assert runs[2].campaign_id and runs[2].confirm_campaign_id
        tasks = store.tasks_for_campaign(runs[2].campaign_id)
        roles = [t.role for t in tasks]  # in the order the device measures them
        assert roles.count("baseline") == roles.count("candidate") == 5
        # one round per block, each holding both sides in a seeded random order
        assert all({*roles[i : i + 2]} == {"baseline", "candidate"} for i in range(0, 10, 2))
        replay = [t for t in tasks if t.role == "baseline"]
        assert all(t.options == {} for t in replay)
        rows = store.results_for_campaign(runs[2].campaign_id)
        evaluated = [r for r in rows if r["example_outcomes"]]
        assert len(evaluated) == 2  # block 0 of each side computed accuracy, per example
        assert len(evaluated[0]["example_outcomes"]) == evaluated[0]["accuracy"]["examples"]

    report = json.loads((reports / f"{runs[2].run_id}.json").read_text())
    assert any(v["status"] == "regression" for v in report["verdicts"])
    listed = cli("nightly", "list", "it-nightly", "--store", farm.store_url)
    assert listed.returncode == 0 and listed.stdout.count("\n") == 3, listed.stderr
    shown = cli("nightly", "report", runs[2].run_id, "--format", "markdown",
                "--store", farm.store_url)  # fmt: skip
    assert shown.returncode == 0 and "| regression |" in shown.stdout, shown.stderr


def test_bad_suite_is_one_line(tmp_path: Path) -> None:
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: s\ncampaign: missing.yaml\nbaseline: yesterday\n")
    done = cli("nightly", "run", str(suite), "--store", f"sqlite:///{tmp_path / 'r.sqlite'}")
    assert done.returncode == 3
    assert done.stderr.count("\n") == 1 and "suite.yaml:2" in done.stderr, done.stderr
