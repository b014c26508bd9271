"""Hub agent configuration: token discovery, device selection, capabilities, schemes."""

from __future__ import annotations

from pathlib import Path

import pytest

import tests.doubles.qai_hub as double
import tests.doubles.qai_hub.client as double_client
from agent.hub.api import HubApi, hub_api, hub_message
from agent.hub.config import CONFIG_ENV, HubConfig, load_hub_config
from agent.hub.devices import capabilities, labels, select_devices
from agent.hub.executor import SCHEMES
from coordinator.spec import BACKEND_SCHEMES
from edgefarm.errors import ConfigError, UsageError
from edgefarm.selectors import device_facts, matches

INI = "[api]\napi_token = {token}\napi_url = https://example.test\nweb_url = https://example.test\n"


def _ini(path: Path, token: str = "secret") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(INI.format(token=token))
    return path


def test_token_is_found_where_the_client_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    _ini(tmp_path / ".qai_hub" / "client.ini", "default-token")
    _ini(tmp_path / ".qai_hub" / "work.ini", "work-token")
    env_ini = _ini(tmp_path / "elsewhere.ini", "env-token")
    assert load_hub_config().api_token == "default-token"
    assert load_hub_config(profile="work").api_token == "work-token"
    monkeypatch.setenv(CONFIG_ENV, str(env_ini))
    found = load_hub_config()
    assert (found.api_token, found.api_url) == ("env-token", "https://example.test")
    assert load_hub_config(profile="work").api_token == "work-token"  # a profile wins
    assert load_hub_config(config=tmp_path / "elsewhere.ini").source == "--hub-config"
    with pytest.raises(UsageError, match="not both"):
        load_hub_config(config=env_ini, profile="work")


def test_no_token_is_one_line_naming_how_to_configure(tmp_path: Path) -> None:
    missing = tmp_path / "nope.ini"
    with pytest.raises(ConfigError) as info:
        load_hub_config(environ={CONFIG_ENV: str(missing)})
    message = str(info.value)
    assert "\n" not in message and str(missing) in message
    assert "qai-hub configure --api_token" in message and CONFIG_ENV in message
    empty = tmp_path / "empty.ini"
    empty.write_text("[api]\napi_token =\n")
    with pytest.raises(ConfigError, match=r"no api_token .* `qai-hub configure"):
        load_hub_config(config=empty)


def test_hub_messages_lose_the_clients_frames() -> None:
    framed = "Failed to authenticate.\n\n┌────┐\n| Bad token. See |\n| the docs.      |\n└────┘"
    assert hub_message(RuntimeError(framed)) == "Failed to authenticate. Bad token. See the docs."


@pytest.fixture()
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubApi:
    monkeypatch.setenv(double.STATE_ENV, str(tmp_path / "state"))
    return hub_api(double, double_client, HubConfig(tmp_path / "x.ini", "test", "token"))


def test_selected_devices_become_farm_devices(api: HubApi) -> None:
    chosen = select_devices(api, attributes=["framework:qnn", "os:android"])
    assert [d.name for d in chosen] == [
        "Samsung Galaxy S23 (Family)",
        "Samsung Galaxy S24 (Family)",
    ]
    s24 = chosen[1]
    caps = capabilities(s24, api.version)
    assert caps.device_id == "qai-hub:samsung-galaxy-s24-family"
    assert (caps.os, caps.os_release, caps.arch) == ("android", "14", "arm64")
    assert caps.cpu_model == "qualcomm-snapdragon-8gen3"
    assert caps.backends == {"qai-hub": "0.56.0"}
    assert caps.accelerators == ["qnn-htp", "onnx", "qnn", "tflite"]
    assert caps.extra["qai_hub.htp"] == "v75"
    facts = device_facts(caps, labels(s24), labels(s24)["device"])
    for selector in (
        {"chipset": "qualcomm-snapdragon-8gen3"},
        {"form_factor": "phone", "os": "android", "accelerator": "qnn-htp"},
        {"backend": "qai-hub", "name": "samsung galaxy s24 (family)"},
    ):
        assert matches(selector, facts), selector


def test_device_selection_errors_are_one_line(api: HubApi) -> None:
    with pytest.raises(UsageError, match="--device NAME and/or --attribute"):
        select_devices(api)
    with pytest.raises(UsageError, match="no Qualcomm AI Hub device matches name 'Nokia 3310'"):
        select_devices(api, names=["Nokia 3310"])
    with pytest.raises(UsageError, match=r"3 Qualcomm AI Hub devices match .*at most 2\)"):
        select_devices(api, attributes=["framework:qnn"], max_devices=2)


def test_spec_schemes_are_the_executors() -> None:
    assert BACKEND_SCHEMES["qai-hub"] == tuple(SCHEMES)


def test_hub_schemes_of_one_artifact_are_distinct_measurements() -> None:
    from coordinator.campaigns import measure_key
    from edgefarm.domain import ArtifactRef, MeasureSettings

    ref, settings = ArtifactRef("a" * 64, 1), MeasureSettings()
    keys = {measure_key(ref, None, "qai-hub", {}, "d", settings, scheme=s) for s in SCHEMES}
    assert len(keys) == len(SCHEMES)
    assert measure_key(ref, None, "onnxruntime", {}, "d", settings) not in keys
