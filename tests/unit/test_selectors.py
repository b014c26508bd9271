"""Device selectors: parsing, facts and matching."""

from __future__ import annotations

import pytest

from edgefarm.domain import DeviceCapabilities
from edgefarm.selectors import device_facts, explain_mismatch, matches, parse_selector


def _caps(**overrides: object) -> DeviceCapabilities:
    fields: dict[str, object] = {
        "device_id": "ABC123",
        "hostname": "Pi5.lan",
        "os": "Linux",
        "arch": "aarch64",
        "cpu_flags": ["NEON", "asimd"],
        "logical_cores": 4,
        "accelerators": ["npu"],
        "backends": {"onnxruntime": "1.18", "noop": "0.1"},
    }
    fields.update(overrides)
    return DeviceCapabilities(**fields)  # type: ignore[arg-type]


def test_parse_list_dict_and_string_forms() -> None:
    assert parse_selector(["arch=x86_64", "label.rack = a"]) == {
        "arch": "x86_64",
        "label.rack": "a",
    }
    assert parse_selector({"Arch": "arm64", "cores": 4}) == {"arch": "arm64", "cores": "4"}  # type: ignore[dict-item]
    assert parse_selector("os=linux,arch!=x86_64") == {"os": "linux", "!arch": "x86_64"}
    assert parse_selector([]) == {}


@pytest.mark.parametrize(
    ("items", "words"),
    [
        (["arch"], "bad selector item 'arch'"),
        (["=x"], "bad selector item '=x'"),
        (["arch="], "empty value"),
        (["arch=a", "arch=b"], "given twice"),
        ({"arch": ["a", "b"]}, "needs a single value"),
        ([3], "bad selector item 3"),
    ],
)
def test_parse_rejects_bad_items(items: object, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_selector(items)  # type: ignore[arg-type]


def test_device_facts_aliases_and_labels() -> None:
    facts = device_facts(_caps(), {"rack": "A", "os": "ignored-bare", "Board": "rpi5"}, "rpi-01")
    assert facts["os"] == {"linux"}
    assert facts["arch"] == {"aarch64", "arm64"}
    assert facts["cpu_flag"] == {"neon", "asimd"}
    assert facts["backend"] == {"onnxruntime", "noop"}
    assert facts["hostname"] == {"pi5.lan", "pi5"}
    assert facts["cores"] == {"4"}
    assert facts["name"] == {"rpi-01"}
    assert facts["device_id"] == {"abc123"}
    assert facts["label.rack"] == {"a"}
    assert facts["rack"] == {"a"}
    assert facts["board"] == {"rpi5"}
    assert facts["label.os"] == {"ignored-bare"}
    assert facts["os"] == {"linux"}  # a label never shadows a built-in key


def test_macos_and_x86_aliases() -> None:
    facts = device_facts(_caps(os="Darwin", arch="AMD64"), {}, "mac")
    assert {"darwin", "macos"} <= facts["os"]
    assert {"x86_64", "amd64"} <= facts["arch"]


def test_matches() -> None:
    facts = device_facts(_caps(), {"rack": "a"}, "rpi-01")
    assert matches({}, facts)
    assert matches({"arch": "ARM64"}, facts)
    assert matches({"arch": "x86_64|aarch64", "label.rack": "a"}, facts)
    assert matches({"backend": "onnxruntime", "cpu_flag": "neon"}, facts)
    assert matches({"!arch": "x86_64"}, facts)
    assert matches({"!label.zone": "*"}, facts)
    assert matches({"rack": "*"}, facts)
    assert not matches({"arch": "x86_64"}, facts)
    assert not matches({"!backend": "noop"}, facts)
    assert not matches({"label.zone": "*"}, facts)
    assert not matches({"arch": "arm64", "rack": "b"}, facts)


def test_explain_mismatch_names_the_failing_key() -> None:
    facts = device_facts(_caps(), {}, "rpi-01")
    assert explain_mismatch({"arch": "arm64"}, facts) == ""
    assert explain_mismatch({"os": "linux", "cores": "8"}, facts) == "cores is 4, wanted 8"
    assert explain_mismatch({"label.rack": "a"}, facts) == "device has no label.rack, wanted a"
    assert explain_mismatch({"!os": "linux"}, facts) == "os is linux, wanted anything but linux"
