"""The device probe: real values on this machine, and its parsers."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from agent.probe import (
    DEVICE_ID_ENV,
    host_device_id,
    normalize_arch,
    ort_accelerators,
    ort_providers,
    parse_cpuinfo,
    parse_sysctl_optional,
    probe_device,
)


def test_probe_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEVICE_ID_ENV, raising=False)
    caps = probe_device()
    assert caps.arch == normalize_arch(platform.machine()) != ""
    assert caps.os == platform.system().lower()
    assert caps.logical_cores > 0
    assert 0 < caps.physical_cores <= caps.logical_cores
    assert caps.ram_bytes > 64 * 2**20
    assert caps.python_version == platform.python_version()
    assert caps.hostname
    assert all(isinstance(v, str) for v in caps.backends.values())
    assert len(caps.device_id) == 16
    int(caps.device_id, 16)  # hex


def test_device_id_is_stable_and_hashed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEVICE_ID_ENV, raising=False)
    first = probe_device().device_id
    assert first == probe_device().device_id == host_device_id()
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path) as handle:
                assert handle.read().strip() not in (first, "")
        except OSError:
            pass


def test_device_id_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEVICE_ID_ENV, "bench-7")
    assert probe_device().device_id == "bench-7"
    assert probe_device("explicit").device_id == "explicit"


def test_normalize_arch() -> None:
    assert normalize_arch("AMD64") == "x86_64"
    assert normalize_arch("x86_64") == "x86_64"
    assert normalize_arch("aarch64") == "arm64"
    assert normalize_arch("arm64") == "arm64"
    assert normalize_arch("armv7l") == "armv7l"


def test_parse_cpuinfo_x86_and_arm() -> None:
    x86 = (
        "processor\t: 0\nmodel\t\t: 167\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: sse AVX2 sse\n"
    )
    assert parse_cpuinfo(x86) == ("Intel(R) Xeon(R)", ["avx2", "sse"])
    arm = (
        "processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd crc32\nCPU part\t: 0xd0b\n\n"
        "Model\t\t: Raspberry Pi 5 Model B Rev 1.0\n"
    )
    assert parse_cpuinfo(arm) == ("Raspberry Pi 5 Model B Rev 1.0", ["asimd", "crc32", "fp"])
    assert parse_cpuinfo("") == ("", [])


def test_parse_sysctl_optional() -> None:
    text = (
        "hw.optional.arm.FEAT_BF16: 1\nhw.optional.arm.FEAT_SME: 0\n"
        "hw.optional.neon: 1\nhw.optional.floatingpoint: 1\nkern.other: 1\n"
    )
    assert parse_sysctl_optional(text) == ["feat_bf16", "floatingpoint", "neon"]


def test_ort_accelerators() -> None:
    providers = ["QNNExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_accelerators(providers) == ["qnn-htp", "cuda"]


def test_openvino_devices_become_accelerators() -> None:
    from agent.probe import openvino_accelerators

    assert openvino_accelerators(["CPU", "GPU.0", "GPU.1", "NPU"]) == [
        "intel-gpu",
        "intel-gpu",
        "intel-npu",
    ]
    assert openvino_accelerators(["CPU"]) == []


def test_runtimes_are_asked_in_a_child_and_not_loaded_here() -> None:
    assert "CPUExecutionProvider" in ort_providers()
    code = (
        "import sys; from agent.probe import probe_device; caps = probe_device(); "
        "print(caps.extra.get('onnxruntime.providers', ''), "
        "sorted({'onnxruntime', 'openvino'} & set(sys.modules)))"
    )
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    providers, loaded = done.stdout.strip().split(" ", 1)
    assert "CPUExecutionProvider" in providers.split(",")
    assert loaded == "[]"  # an idle agent does not carry the runtimes it probed
