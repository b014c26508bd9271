"""Find out what the device an agent runs on is: OS, CPU, memory, accelerators, backends.

Everything here is best effort and cheap: files are read, a few ``sysctl`` /
``ioreg`` calls are made on macOS, nothing is benchmarked and nothing raises.
This module must stay light: no ray, coordinator or results imports.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psutil

from edgefarm.domain import DeviceCapabilities

T = TypeVar("T")

DEVICE_ID_ENV = "EDGEFARM_DEVICE_ID"
_CHILD_QUERY_TIMEOUT_S = 60.0

_MACHINE_ID_FILES = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))

_ARCH_NAMES = {
    "amd64": "x86_64",
    "x64": "x86_64",
    "x86_64": "x86_64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv8l": "arm64",
    "i386": "x86",
    "i686": "x86",
    "x86": "x86",
}

# onnxruntime execution provider -> accelerator name
ORT_PROVIDER_ACCELERATORS = {
    "CUDAExecutionProvider": "cuda",
    "TensorrtExecutionProvider": "tensorrt",
    "ROCMExecutionProvider": "rocm",
    "MIGraphXExecutionProvider": "migraphx",
    "QNNExecutionProvider": "qnn-htp",
    "OpenVINOExecutionProvider": "openvino",
    "CoreMLExecutionProvider": "coreml",
    "DmlExecutionProvider": "directml",
    "NnapiExecutionProvider": "nnapi",
    "CANNExecutionProvider": "cann",
    "VitisAIExecutionProvider": "vitisai",
    "WebGpuExecutionProvider": "webgpu",
}

_CPU_MODEL_KEYS = ("model name", "Processor", "cpu model", "Model", "Hardware")
_CPU_FLAG_KEYS = ("flags", "Features")


def probe_device(
    device_id: str | None = None, env_backends: dict[str, dict[str, str]] | None = None
) -> DeviceCapabilities:
    """Describe this machine. ``device_id`` overrides :func:`default_device_id`;
    ``env_backends`` are the backends that run in their own environments, as
    :func:`agent.backend_envs.probe_env_backends` found them (their versions replace what
    the agent's own environment has)."""
    system = platform.system()
    arch = normalize_arch(platform.machine())
    cpu_model, cpu_flags = _cpu_info(system)
    extra: dict[str, str] = {"python.implementation": platform.python_implementation()}
    usable = _usable_cores()
    if usable:
        extra["usable_cores"] = str(usable)
    accelerators = _accelerators(system, arch, extra)
    backends = _installed_backends(extra)
    for name, found in (env_backends or {}).items():
        backends[name] = found["version"]
        extra[f"backend_env.{name}"] = f"{found['prefix']} (Python {found['python']})"
    return DeviceCapabilities(
        device_id=device_id or default_device_id(),
        hostname=_safe(socket.gethostname, "") or platform.node(),
        os=system.lower(),
        os_release=_os_release(system),
        arch=arch,
        cpu_model=cpu_model,
        cpu_flags=cpu_flags,
        physical_cores=_physical_cores(),
        logical_cores=_logical_cores(),
        ram_bytes=_safe(lambda: int(psutil.virtual_memory().total), 0),
        accelerators=accelerators,
        backends=backends,
        python_version=platform.python_version(),
        extra=extra,
    )


def default_device_id() -> str:
    """``$EDGEFARM_DEVICE_ID`` when set, else :func:`host_device_id`."""
    override = os.environ.get(DEVICE_ID_ENV, "").strip()
    return override or host_device_id()


def host_device_id() -> str:
    """A stable id of this host: sha256 of the machine id (16 hex chars), never the raw id.

    Sources, first found wins: /etc/machine-id, /var/lib/dbus/machine-id, the macOS
    IOPlatformUUID, the MAC address (``uuid.getnode``).
    """
    raw = _machine_id() or _mac_platform_uuid() or f"node-{uuid.getnode():012x}"
    return hashlib.sha256(f"edgefarm:{raw}".encode()).hexdigest()[:16]


def normalize_arch(machine: str) -> str:
    """``AMD64``/``x86_64`` -> ``x86_64``, ``aarch64``/``arm64`` -> ``arm64``; others lowercased."""
    lowered = machine.strip().lower()
    return _ARCH_NAMES.get(lowered, lowered)


def parse_cpuinfo(text: str) -> tuple[str, list[str]]:
    """CPU model and sorted flags from the text of ``/proc/cpuinfo`` (first value wins)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key and key not in fields and value.strip():
            fields[key] = value.strip()
    model = next((fields[key] for key in _CPU_MODEL_KEYS if key in fields), "")
    flags_text = next((fields[key] for key in _CPU_FLAG_KEYS if key in fields), "")
    return model, sorted({flag.lower() for flag in flags_text.split()})


def parse_sysctl_optional(text: str) -> list[str]:
    """Features set to 1 in ``sysctl hw.optional`` output (``arm.FEAT_BF16`` -> ``feat_bf16``)."""
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep or value.strip() != "1" or not key.startswith("hw.optional."):
            continue
        name = key.strip().removeprefix("hw.optional.").removeprefix("arm.")
        flags.add(name.lower())
    return sorted(flags)


def ort_accelerators(providers: list[str]) -> list[str]:
    """Accelerator names implied by onnxruntime execution providers."""
    return [ORT_PROVIDER_ACCELERATORS[p] for p in providers if p in ORT_PROVIDER_ACCELERATORS]


# --- helpers ---------------------------------------------------------------------------


def _safe(func: Callable[[], T | None], default: T) -> T:
    """``func()``, or ``default`` when it raises or returns None."""
    try:
        result = func()
    except Exception:
        return default
    return result if result is not None else default


def _read(path: str | Path) -> str:
    """File text, or '' when unreadable."""
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _run(*argv: str) -> str:
    """Output of a quick command, or '' on any failure."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=3, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout if done.returncode == 0 else ""


def _machine_id() -> str:
    for path in _MACHINE_ID_FILES:
        value = _read(path).strip()
        if value:
            return value
    return ""


def _mac_platform_uuid() -> str:
    if platform.system() != "Darwin":
        return ""
    out = _run("ioreg", "-rd1", "-c", "IOPlatformExpertDevice")
    found = re.search(r'"IOPlatformUUID"\s*=\s*"([^"]+)"', out)
    return found.group(1) if found else ""


def _os_release(system: str) -> str:
    if system == "Darwin":
        version = platform.mac_ver()[0]
        if version:
            return version
    return platform.release()


def _cpu_info(system: str) -> tuple[str, list[str]]:
    """CPU model and flags, by platform."""
    model, flags = "", list[str]()
    if system == "Linux":
        model, flags = parse_cpuinfo(_read("/proc/cpuinfo"))
        if not model:
            model = _read("/proc/device-tree/model").strip("\x00 \n")
    elif system == "Darwin":
        model = _run("sysctl", "-n", "machdep.cpu.brand_string").strip()
        flags = parse_sysctl_optional(_run("sysctl", "hw.optional"))
        intel = _run("sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features")
        flags = sorted(set(flags) | {flag.lower() for flag in intel.split()})
    if not model:
        model = _safe(platform.processor, "")
    return model, flags


def _physical_cores() -> int:
    return _safe(lambda: psutil.cpu_count(logical=False), 0) or _logical_cores()


def _logical_cores() -> int:
    return _safe(lambda: psutil.cpu_count(logical=True), 0) or os.cpu_count() or 0


def _usable_cores() -> int:
    """Cores this process may run on (container / affinity limits), 0 if unknown."""
    getter = getattr(os, "sched_getaffinity", None)
    if getter is None:
        return 0
    return _safe(lambda: len(getter(0)), 0)


def _accelerators(system: str, arch: str, extra: dict[str, str]) -> list[str]:
    """Cheap accelerator detection; details go to ``extra``."""
    found: list[str] = []
    if system == "Darwin" and arch == "arm64":
        found.append("metal")
    if system == "Linux":
        render_nodes = sorted(glob.glob("/dev/dri/renderD*"))
        mobile_gpus = [p for p in ("/dev/kgsl-3d0", "/dev/mali0") if os.path.exists(p)]
        if render_nodes or mobile_gpus:
            found.append("gpu")
            drivers = sorted({_driver_of(Path(p).name, "drm") for p in render_nodes} - {""})
            if drivers:
                extra["gpu.drivers"] = ",".join(drivers)
        npus = sorted(glob.glob("/dev/accel/accel*") + glob.glob("/dev/accel[0-9]*"))
        if npus:
            found.append("npu")
            drivers = sorted({_driver_of(Path(p).name, "accel") for p in npus} - {""})
            if drivers:
                extra["npu.drivers"] = ",".join(drivers)
    if (
        os.path.exists("/proc/driver/nvidia")
        or os.path.exists("/dev/nvhost-ctrl-gpu")
        or shutil.which("nvidia-smi")
    ):
        found.append("nvidia")
    providers = ort_providers()
    if providers:
        extra["onnxruntime.providers"] = ",".join(providers)
        found.extend(ort_accelerators(providers))
    ov_devices = openvino_devices()
    if ov_devices:
        extra["openvino.devices"] = ",".join(ov_devices)
        found.extend(openvino_accelerators(ov_devices))
    return list(dict.fromkeys(found))


def openvino_accelerators(devices: list[str]) -> list[str]:
    """Accelerators OpenVINO can drive: Intel GPUs and NPUs ("GPU.0" -> "intel-gpu")."""
    names = {"GPU": "intel-gpu", "NPU": "intel-npu"}
    return [names[d.split(".")[0]] for d in devices if d.split(".")[0] in names]


def openvino_devices() -> list[str]:
    """The devices OpenVINO can use here (``Core().available_devices``), e.g. ``["CPU",
    "GPU.0", "NPU"]``; [] when OpenVINO is not installed or the query fails."""
    if importlib.util.find_spec("openvino") is None:
        return []
    return _ask_child(
        "import json, openvino; print(json.dumps(list(openvino.Core().available_devices)))"
    )


def ort_providers() -> list[str]:
    """onnxruntime's available execution providers; [] when it is not installed."""
    if importlib.util.find_spec("onnxruntime") is None:
        return []
    return _ask_child(
        "import json, onnxruntime; print(json.dumps(onnxruntime.get_available_providers()))"
    )


def _ask_child(code: str) -> list[str]:
    """The JSON list ``code`` prints last, run in a short-lived child interpreter.

    Importing a runtime to ask it what it sees costs the asking process for good
    (onnxruntime ~20 MB of RSS, OpenVINO's device plugins ~80 MB): too much
    for an idle agent, so the question is asked where the memory goes away again.
    """
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=_CHILD_QUERY_TIMEOUT_S,
            check=True,
        )
        found = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return []
    return [str(item) for item in found] if isinstance(found, list) else []


def _driver_of(device: str, subsystem: str) -> str:
    """Kernel driver name of ``/sys/class/<subsystem>/<device>``, or ''."""
    link = Path("/sys/class") / subsystem / device / "device" / "driver"
    return _safe(lambda: Path(os.readlink(link)).name, "")


def _installed_backends(extra: dict[str, str]) -> dict[str, str]:
    """``agent.backends.installed_backends()``, or {} when unavailable."""
    try:
        from agent.backends import installed_backends
    except ImportError:
        return {}
    try:
        return dict(installed_backends())
    except Exception as exc:
        extra["backends.error"] = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        return {}
