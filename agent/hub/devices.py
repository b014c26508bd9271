"""Qualcomm AI Hub devices as farm devices: selection and capabilities.

The hub describes a device by name, OS version and attributes such as
``chipset:qualcomm-snapdragon-8gen3``, ``format:phone``, ``framework:qnn``,
``os:android``, ``vendor:samsung``. Each selected device becomes one farm device:

- ``device_id`` ``qai-hub:<slug of the name>`` (stable across hub OS updates, which are
  recorded in every result's environment);
- ``os`` from ``os:``, ``os_release`` the hub's OS version, ``arch`` from ``abi:``,
  ``cpu_model`` the chipset;
- accelerators: the hub frameworks (``qnn``, ``tflite``, ``onnx``), and ``qnn-htp`` when
  QNN is there (the same name a direct Snapdragon host's probe reports);
- labels for selectors: ``device`` (the hub's name), ``chipset``, ``form_factor``,
  ``vendor``, ``hub=qai-hub``;
- every attribute in ``extra`` as ``qai_hub.<key>``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.hub.api import HubApi, hub_message
from agent.probe import normalize_arch
from edgefarm.domain import HUB_BACKEND, HUB_DEVICE_PREFIX, DeviceCapabilities
from edgefarm.errors import ConfigError, UsageError

DEFAULT_MAX_DEVICES = 8

# Hub attribute key -> label key (the label keeps the hub's value).
_LABEL_KEYS = {"chipset": "chipset", "format": "form_factor", "vendor": "vendor"}
# Hub ABI names -> farm architecture names.
_ABI_ARCH = {"arm64-v8a": "arm64", "armeabi-v7a": "arm", "x86_64": "x86_64"}


@dataclass(frozen=True)
class HubDevice:
    """A hosted device as the hub lists it."""

    name: str
    os: str
    attributes: tuple[str, ...] = field(default_factory=tuple)

    def values(self, key: str) -> list[str]:
        """The values of every ``key:value`` attribute with this key, sorted."""
        prefix = f"{key}:"
        return sorted(a[len(prefix) :] for a in self.attributes if a.startswith(prefix))

    @property
    def frameworks(self) -> list[str]:
        """The hub frameworks this device runs (``qnn``, ``tflite``, ``onnx`` ...)."""
        return self.values("framework")

    @property
    def device_id(self) -> str:
        """The farm's id of this device."""
        return HUB_DEVICE_PREFIX + slug(self.name)

    def hub_device(self, hub: HubApi) -> Any:
        """The ``qai_hub.Device`` jobs are submitted to (exact name and OS version)."""
        return hub.module.Device(name=self.name, os=self.os)


def slug(name: str) -> str:
    """``"Samsung Galaxy S24 (Family)"`` -> ``"samsung-galaxy-s24-family"``."""
    return re.sub(r"[^a-z0-9.+]+", "-", name.lower()).strip("-") or "device"


def select_devices(
    hub: HubApi,
    names: Sequence[str] = (),
    attributes: Sequence[str] = (),
    os_version: str = "",
    max_devices: int = DEFAULT_MAX_DEVICES,
) -> list[HubDevice]:
    """The hub devices matching every name (each) and all attributes, newest OS per name.

    Raises :class:`UsageError` for an empty or too broad selection and
    :class:`ConfigError` when the hub refuses the token.
    """
    if not names and not attributes:
        raise UsageError(
            "select Qualcomm AI Hub devices with --device NAME and/or --attribute KEY:VALUE "
            "(list them with `qai-hub list-devices`)"
        )
    found: list[HubDevice] = []
    for name in names or [""]:
        listed = _get_devices(hub, name, os_version, list(attributes))
        if not listed:
            parts = [f"name '{name}'" if name else "", f"os '{os_version}'" if os_version else ""]
            parts.append(f"attributes {', '.join(attributes)}" if attributes else "")
            wanted = ", ".join(part for part in parts if part)
            raise UsageError(f"no Qualcomm AI Hub device matches {wanted}")
        found.extend(listed)
    by_name: dict[str, list[HubDevice]] = defaultdict(list)
    for device in found:
        by_name[device.name].append(device)
    chosen = [max(group, key=lambda d: _version_key(d.os)) for _, group in sorted(by_name.items())]
    if len(chosen) > max_devices:
        raise UsageError(
            f"{len(chosen)} Qualcomm AI Hub devices match the selection (at most {max_devices}); "
            "narrow it with --device / --attribute or raise --max-devices"
        )
    return chosen


def _get_devices(hub: HubApi, name: str, os_version: str, attributes: list[str]) -> list[HubDevice]:
    try:
        listed = hub.client.get_devices(name=name, os=os_version, attributes=attributes)
    except hub.user_error as err:
        message = hub_message(err)
        if "token" in message.lower() or "authenticat" in message.lower():
            raise ConfigError(f"Qualcomm AI Hub refused the token: {message}") from None
        raise UsageError(f"Qualcomm AI Hub: {message}") from None
    except hub.error as err:
        raise ConfigError(f"cannot list Qualcomm AI Hub devices: {hub_message(err)}") from None
    return [HubDevice(d.name, d.os, tuple(d.attributes)) for d in listed]


def _version_key(version: str) -> tuple[int, ...]:
    """``"14.1"`` -> ``(14, 1)``; non-numeric parts count as 0."""
    return tuple(int(part) if part.isdigit() else 0 for part in version.split("."))


def capabilities(device: HubDevice, client_version: str) -> DeviceCapabilities:
    """The farm capabilities of a hosted device (what the coordinator selects on)."""
    frameworks = device.frameworks
    accelerators = (["qnn-htp"] if "qnn" in frameworks else []) + frameworks
    abi = device.values("abi")
    extra = {
        "qai_hub.device_name": device.name,
        "qai_hub.device_os": device.os,
        "qai_hub.client_version": client_version,
    }
    keys = sorted({a.partition(":")[0] for a in device.attributes if ":" in a})
    extra.update({f"qai_hub.{key}": ",".join(device.values(key)) for key in keys})
    chipsets = device.values("chipset")
    oses = device.values("os")
    return DeviceCapabilities(
        device_id=device.device_id,
        hostname="",
        os=oses[0] if oses else "",
        os_release=device.os,
        arch=_ABI_ARCH.get(abi[0], normalize_arch(abi[0])) if abi else "",
        cpu_model=chipsets[0] if chipsets else "",
        accelerators=accelerators,
        backends={HUB_BACKEND: client_version},
        extra=extra,
    )


def labels(device: HubDevice) -> dict[str, str]:
    """Selector labels of a hosted device (the ``device`` label names it in the fleet)."""
    out = {"device": device.name, "hub": HUB_BACKEND}
    for key, label in _LABEL_KEYS.items():
        values = device.values(key)
        if values:
            out[label] = values[0]
    return out
