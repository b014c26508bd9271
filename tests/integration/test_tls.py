"""A fleet over TLS and mutual TLS: a coordinator serving TLS, agents and the CLI dialling
it with --tls-ca (and their own certificates for mutual TLS); clients that do not speak
TLS, trust the wrong CA or bring no certificate are refused with a ConnectionFailed
saying why, and the coordinator keeps serving. Plaintext on a non-loopback address
draws one warning line unless --insecure.

One farm per class (Ray starts once per farm), torn down before the next starts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from coordinator.client import ControlClient
from coordinator.localfarm import LocalFarm
from coordinator.runner import run_campaign
from edgefarm.errors import ConnectionFailed
from edgefarm.transport import ClientTls
from tests.integration.conftest import HEARTBEAT_S, LEASE_S, cli, open_store, write_spec

pytestmark = pytest.mark.integration
pytest.importorskip("cryptography", reason="the dev extra (cryptography) is not installed")
pytest.importorskip("onnxruntime", reason="the onnxruntime extra is not installed")
pytest.importorskip("ray", reason="the coordinator extra is not installed")

from tests.tlscerts import Authority, Issued, make_ca  # noqa: E402

TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Certs:
    ca: Authority
    other_ca: Authority
    server: Issued
    agent: Issued  # signed by ca: an agent's (and the operator's) client certificate
    rogue: Issued  # signed by other_ca


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    base = tmp_path_factory.mktemp("certs")
    ca = make_ca(base / "ca")
    other = make_ca(base / "other", "other CA")
    return Certs(
        ca=ca,
        other_ca=other,
        server=ca.issue("coordinator", server=True),
        agent=ca.issue("agent", server=False),
        rogue=other.issue("rogue", server=False),
    )


def _farm(base: Path, certs: Certs, *, mutual: bool) -> Iterator[LocalFarm]:
    farm = LocalFarm(
        home=base / "home",
        store_url=f"sqlite:///{base / 'r.sqlite'}",
        agents=1,
        lease_s=LEASE_S,
        heartbeat_s=HEARTBEAT_S,
        server_tls=certs.ca.server_tls(certs.server, client_auth=mutual),
        client_tls=certs.ca.client_tls(certs.agent if mutual else None),
    )
    try:
        farm.start()
        yield farm
    finally:
        farm.stop()


def _tiny_campaign(farm: LocalFarm, tmp: Path, name: str) -> str:
    spec = write_spec(tmp / f"{name}.yaml", name, ["fp32"], min_duration_s=0.1, trials=1)
    campaign_id = run_campaign(farm.address, farm.token, spec, tls=farm.client_tls)
    with open_store(farm) as store:
        (row,) = store.results_for_campaign(campaign_id)
    assert row["ok"] and row["valid"], row
    return campaign_id


def _refused(address: str, token: str, tls: ClientTls | None) -> str:
    with (
        pytest.raises(ConnectionFailed) as caught,
        ControlClient(address, token, timeout_s=TIMEOUT_S, tls=tls) as client,
    ):
        client.list_devices()
    return str(caught.value)


def _still_serving(farm: LocalFarm) -> None:
    with farm.client() as client:
        names = {d.name for d in client.list_devices()}
    assert names, "the coordinator answers and still knows its device"


class TestTls:
    @pytest.fixture(scope="class")
    def farm(self, tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[LocalFarm]:
        yield from _farm(tmp_path_factory.mktemp("tls"), certs, mutual=False)

    def test_a_campaign_runs_end_to_end_over_tls(self, farm: LocalFarm, tmp_path: Path) -> None:
        _tiny_campaign(farm, tmp_path, "over-tls")
        log = (farm.log_dir / "coordinator.log").read_text()
        assert "serving TLS on" in log and "INSECURE" not in log

    def test_the_cli_dials_tls_with_tls_ca_from_the_environment(
        self, farm: LocalFarm, certs: Certs
    ) -> None:
        env = {**os.environ, "EDGEFARM_TLS_CA": str(certs.ca.cert)}
        listed = cli("devices", "list", "--coordinator", farm.address, "--json", env=env)
        assert listed.returncode == 0, listed.stderr
        assert "local-1" in listed.stdout

    def test_a_plaintext_client_is_told_the_coordinator_serves_tls(self, farm: LocalFarm) -> None:
        message = _refused(farm.address, farm.token, None)
        assert "probably serves TLS" in message and "--tls-ca" in message
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFARM_TLS")}
        listed = cli("devices", "list", "--coordinator", farm.address, env=env)
        assert listed.returncode == 5
        assert listed.stderr.strip().count("\n") == 0, listed.stderr
        assert "serves TLS" in listed.stderr
        _still_serving(farm)

    def test_a_client_trusting_another_ca_is_refused(self, farm: LocalFarm, certs: Certs) -> None:
        message = _refused(farm.address, farm.token, certs.other_ca.client_tls())
        assert "does not verify" in message and str(certs.other_ca.cert) in message
        _still_serving(farm)


class TestMutualTls:
    @pytest.fixture(scope="class")
    def farm(self, tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[LocalFarm]:
        yield from _farm(tmp_path_factory.mktemp("mtls"), certs, mutual=True)

    def test_a_campaign_runs_end_to_end_over_mutual_tls(
        self, farm: LocalFarm, tmp_path: Path
    ) -> None:
        _tiny_campaign(farm, tmp_path, "over-mtls")
        log = (farm.log_dir / "coordinator.log").read_text()
        assert "client certificates required" in log

    def test_a_client_without_a_certificate_is_refused(self, farm: LocalFarm, certs: Certs) -> None:
        message = _refused(farm.address, farm.token, certs.ca.client_tls())
        assert "client certificate" in message
        _still_serving(farm)

    def test_a_certificate_from_another_ca_is_refused(self, farm: LocalFarm, certs: Certs) -> None:
        tls = ClientTls(ca=certs.ca.cert, cert=certs.rogue.cert, key=certs.rogue.key)
        message = _refused(farm.address, farm.token, tls)
        assert "refused this client certificate" in message
        _still_serving(farm)

    def test_devices_revoke_over_mutual_tls(self, farm: LocalFarm, certs: Certs) -> None:
        tls_args = ["--tls-ca", str(certs.ca.cert), "--tls-cert", str(certs.agent.cert)]
        tls_args += ["--tls-key", str(certs.agent.key)]
        revoked = cli(
            "devices", "revoke", "local-1", "--coordinator", farm.address, "--token", farm.token,
            *tls_args,
        )  # fmt: skip
        assert revoked.returncode == 0, revoked.stderr
        assert "revoked " in revoked.stdout


class _InitRay(Exception):
    """Stands in for Ray's start: the serve command got as far as starting Ray."""


@pytest.fixture
def serve_until_ray(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Callable[..., str]]:
    """``edgefarm coordinator serve ARGS`` run in-process up to the point where Ray would
    start; returns its stderr."""
    import coordinator.server
    from edgefarm.cli.coordinator_cmd import coordinator as group

    def no_ray() -> None:
        raise _InitRay

    monkeypatch.setattr(coordinator.server, "init_ray", no_ray)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)

    def run(*args: str) -> str:
        store = f"sqlite:///{tmp_path / 'r.sqlite'}"
        result = CliRunner().invoke(
            group, ["serve", "--home", str(tmp_path), "--store", store, *args]
        )
        assert isinstance(result.exception, _InitRay), result.output
        return result.stderr

    yield run
    root.handlers[:], root.level = saved


def test_plaintext_on_a_public_address_warns_once_and_insecure_silences_it(
    serve_until_ray: Callable[..., str],
) -> None:
    loud = serve_until_ray("--listen", "0.0.0.0:0")
    warnings = [line for line in loud.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, loud
    assert "INSECURE" in warnings[0] and "clear text" in warnings[0]
    assert "token" in warnings[0] and "results" in warnings[0]
    chosen = serve_until_ray("--listen", "0.0.0.0:0", "--insecure")
    assert "WARNING" not in chosen and "(--insecure)" in chosen
    local = serve_until_ray("--listen", "127.0.0.1:0")
    assert "WARNING" not in local


def test_bad_certificate_files_end_in_one_line(tmp_path: Path, certs: Certs) -> None:
    missing = tmp_path / "missing.pem"
    served = cli(
        "coordinator", "serve", "--listen", "127.0.0.1:0", "--home", str(tmp_path),
        "--tls-cert", str(missing), "--tls-key", str(certs.server.key),
    )  # fmt: skip
    assert served.returncode == 10
    assert served.stderr.strip().count("\n") == 0, served.stderr
    assert "--tls-cert" in served.stderr and str(missing) in served.stderr
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("hello\n")
    agent = cli(
        "agent", "serve", "--coordinator", "127.0.0.1:1", "--work-dir", str(tmp_path / "a"),
        "--tls-ca", str(not_pem),
    )  # fmt: skip
    assert agent.returncode == 10
    assert agent.stderr.strip().count("\n") == 0, agent.stderr
    assert "--tls-ca" in agent.stderr and "not a PEM" in agent.stderr
