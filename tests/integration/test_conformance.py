"""A coordinator driven by an agent built only from the stubs generated from protos/.

``tests/conformance/minimal_agent.py`` and the generated ``protos`` package are copied
into a temporary folder and run with ``python -I -S``: no site-packages processing (so
no editable install of this project), only the folders holding ``grpc`` and
``google.protobuf`` on the path. The agent enrols, completes a noop campaign with
its own measurements and accuracy, and reports the modules it loaded.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.localfarm import LocalFarm
from tests.integration.conftest import HEARTBEAT_S, LEASE_S, open_store

pytestmark = pytest.mark.integration
pytest.importorskip("ray", reason="the coordinator extra is not installed")

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"agent", "coordinator", "edgefarm", "results", "inventory", "numpy"}
TRIALS = 2
MIN_ITERATIONS = 50
SPEC = f"""name: conformance
models:
  - name: digits-mlp
    source: builtin:digits-mlp
backends:
  - name: noop
    schemes: [none]
measurement:
  warmup_iterations: 5
  min_iterations: {MIN_ITERATIONS}
  min_duration_s: 0.002  # noop steps take ~0.2 us: 100,000 of them must reach it
  trials: {TRIALS}
  threads: 1
  timeout_s: 60
  max_other_cpu_cores: 0  # record only: the suite shares a loaded host
"""


def _site_dirs() -> list[str]:
    """The folders that hold grpc and google.protobuf (nothing else is put on the path)."""
    import google.protobuf
    import grpc

    folders = [Path(grpc.__file__).parents[1], Path(google.protobuf.__file__).parents[2]]
    return sorted({str(f) for f in folders})


def _agent_root(tmp: Path) -> Path:
    """The minimal agent beside a copy of the generated stubs (and nothing else)."""
    root = tmp / "conformance"
    stubs = root / "protos" / "edgefarm" / "v1"
    stubs.mkdir(parents=True)
    for package in (root / "protos", root / "protos" / "edgefarm", stubs):
        (package / "__init__.py").write_text("")
    for generated in (ROOT / "protos" / "edgefarm" / "v1").glob("*_pb2*.py"):
        shutil.copy(generated, stubs / generated.name)
    shutil.copy(ROOT / "tests" / "conformance" / "minimal_agent.py", root)
    return root


def _agent_cmd(root: Path, farm: LocalFarm, work: Path, *args: str) -> list[str]:
    cmd = [sys.executable, "-I", "-S", str(root / "minimal_agent.py")]
    cmd += ["--coordinator", farm.address, "--name", "conformance", "--work-dir", str(work)]
    for folder in _site_dirs():
        cmd += ["--site-packages", folder]
    return [*cmd, *args]


def test_isolated_interpreter_cannot_import_the_project(tmp_path: Path) -> None:
    root = _agent_root(tmp_path)
    code = (
        "import sys; sys.path[:0] = [sys.argv[1]]; sys.path += sys.argv[2:]; "
        "import grpc, protos.edgefarm.v1.agent_pb2_grpc as g; "
        "assert g.__file__.startswith(sys.argv[1]), g.__file__; "
        "bad = []\n"
        "for name in ('agent', 'coordinator', 'edgefarm', 'results'):\n"
        "    try:\n"
        "        __import__(name); bad.append(name)\n"
        "    except ImportError:\n"
        "        pass\n"
        "print(bad)"
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, str(root), *_site_dirs()],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_minimal_agent_completes_a_campaign(tmp_path: Path) -> None:
    root = _agent_root(tmp_path)
    farm = LocalFarm(
        home=tmp_path / "home",
        store_url=f"sqlite:///{tmp_path / 'r.sqlite'}",
        agents=0,
        lease_s=LEASE_S,
        heartbeat_s=HEARTBEAT_S,
    )
    work = tmp_path / "agent-work"
    report_path = tmp_path / "report.json"
    log = (tmp_path / "agent.log").open("w")
    with farm:
        cmd = _agent_cmd(root, farm, work, "--token", farm.token, "--results", "1")
        cmd += ["--idle-exit", "120", "--report", str(report_path)]
        agent = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        try:
            farm.wait_for_agents(1)
            with farm.client() as client:
                reply = client.submit(SPEC, "conformance.yaml")
                assert reply.tasks_total == 1, reply
                final = list(client.watch(reply.campaign_id))[-1]
            assert final.finished and final.tasks_failed == 0, final
            assert agent.wait(timeout=60) == 0, (tmp_path / "agent.log").read_text()
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
            log.close()

        report = json.loads(report_path.read_text())
        assert report["enrolled"] and report["accepted"] == 1 and not report["refused"]
        assert report["protos_file"].startswith(str(root)), report["protos_file"]
        loaded = {name.split(".")[0] for name in report["modules"]}
        assert not loaded & FORBIDDEN, loaded & FORBIDDEN
        assert report["limits"]["max_trials"] > 0

        # The credential is kept owner-only and is enough to register again (no token).
        credential = work / "credential"
        assert stat.S_IMODE(credential.stat().st_mode) == 0o600
        again = subprocess.run(
            _agent_cmd(root, farm, work, "--register-only"), capture_output=True, text=True
        )
        assert again.returncode == 0, again.stderr
        # The fleet token alone cannot take over the enrolled identity.
        impostor = subprocess.run(
            _agent_cmd(root, farm, tmp_path / "impostor", "--token", farm.token, "--register-only"),
            capture_output=True,
            text=True,
        )
        assert impostor.returncode == 6, impostor.stderr

        with open_store(farm) as store:
            (row,) = store.results_for_campaign(reply.campaign_id, samples=True)
        assert row["agent_id"] == report["agent_id"]
        assert row["ok"] and row["valid"], row
        assert row["trials"] == TRIALS
        assert len(row["samples_ms"]) >= TRIALS * MIN_ITERATIONS
        assert all(s >= 0 for s in row["samples_ms"])
        # Its accuracy is the noop backend's, computed from the documented eval layout.
        assert row["accuracy"]["examples"] > 0
        eval_file = _noop_reference_accuracy(work)
        assert row["accuracy"] == pytest.approx(eval_file)


def _noop_reference_accuracy(work: Path) -> dict[str, float]:
    """The project's own noop backend scored on the eval file the agent downloaded."""
    from agent.backends.base import score_classification
    from agent.backends.noop import NoopBackend
    from agent.evaldata import load_eval_data

    for path in (work / "artifacts").iterdir():
        try:
            load_eval_data(path)
        except Exception:
            continue
        return score_classification(NoopBackend(), path, 1)
    raise AssertionError("the agent downloaded no eval data")
