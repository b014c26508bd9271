"""NVIDIA GPU energy through NVML, the library that ships with the driver.

``nvmlDeviceGetTotalEnergyConsumption`` is each GPU's energy in millijoules since the
driver loaded (Volta and newer); a measurement is the difference of two reads. NVML is
loaded with ctypes from ``libnvidia-ml.so.1`` (``nvml.dll`` on Windows): no package to
install, and a machine without the driver only loses the GPU's energy. Reading needs
no privileges. The counter updates every 20-100 ms, so loops shorter than that read
coarsely.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Protocol

NVML_SUCCESS = 0
NVML_ERROR_NOT_SUPPORTED = 3
_NAME_LENGTH = 96


class NvmlLibrary(Protocol):
    """What the source needs from NVML (the ctypes binding, or a test double)."""

    def device_count(self) -> int:
        """GPUs the driver sees."""
        ...

    def device_name(self, index: int) -> str:
        """Product name of GPU ``index``."""
        ...

    def energy_mj(self, index: int) -> int | None:
        """Millijoules since the driver loaded; None where not supported."""
        ...


class CtypesNvml:
    """NVML through ctypes. Raises OSError when the library or driver is missing."""

    def __init__(self) -> None:
        name = "nvml.dll" if sys.platform == "win32" else "libnvidia-ml.so.1"
        self._lib = ctypes.CDLL(name)
        code = self._lib.nvmlInit_v2()
        if code != NVML_SUCCESS:
            raise OSError(f"nvmlInit failed with NVML error {code} (is the driver loaded?)")
        self._handles: dict[int, ctypes.c_void_p] = {}

    def _handle(self, index: int) -> ctypes.c_void_p:
        if index not in self._handles:
            handle = ctypes.c_void_p()
            code = self._lib.nvmlDeviceGetHandleByIndex_v2(
                ctypes.c_uint(index), ctypes.byref(handle)
            )
            if code != NVML_SUCCESS:
                raise OSError(f"NVML has no handle for GPU {index} (error {code})")
            self._handles[index] = handle
        return self._handles[index]

    def device_count(self) -> int:
        count = ctypes.c_uint()
        if self._lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != NVML_SUCCESS:
            return 0
        return int(count.value)

    def device_name(self, index: int) -> str:
        buffer = ctypes.create_string_buffer(_NAME_LENGTH)
        code = self._lib.nvmlDeviceGetName(self._handle(index), buffer, ctypes.c_uint(_NAME_LENGTH))
        return buffer.value.decode(errors="replace") if code == NVML_SUCCESS else f"GPU {index}"

    def energy_mj(self, index: int) -> int | None:
        value = ctypes.c_ulonglong()
        code = self._lib.nvmlDeviceGetTotalEnergyConsumption(
            self._handle(index), ctypes.byref(value)
        )
        return int(value.value) if code == NVML_SUCCESS else None


def nvml_status(library: NvmlLibrary | None = None) -> tuple[NvmlSource | None, str]:
    """The GPUs whose energy NVML reads, as one source, or None and why (one line)."""
    if library is None:
        try:
            library = CtypesNvml()
        except (OSError, AttributeError) as exc:
            return None, f"no NVML: {str(exc).splitlines()[0] if str(exc) else 'not found'}"
    count = library.device_count()
    if count == 0:
        return None, "no NVML: no NVIDIA GPU"
    gpus = [i for i in range(count) if library.energy_mj(i) is not None]
    if not gpus:
        return None, (
            f"NVML sees {count} GPU(s) but none reports its energy counter (Volta or newer)"
        )
    return NvmlSource(library, gpus), ""


class NvmlSource:
    """The GPUs' energy counters as one source (:class:`agent.energy.EnergySource`)."""

    kind = "nvml"

    def __init__(self, library: NvmlLibrary, gpus: list[int]) -> None:
        self.library = library
        self.gpus = gpus
        self.name = "nvml: " + ", ".join(f"gpu{i} ({library.device_name(i)})" for i in gpus)
        self.method = "NVML total-energy counter deltas (mJ, updated every 20-100 ms)"
        self._start: list[int | None] = []

    def begin(self) -> None:
        """Read every GPU's counter."""
        self._start = [self.library.energy_mj(i) for i in self.gpus]

    def end(self) -> float | None:
        """Joules since :meth:`begin`; None when a counter could not be read or went back
        (the driver reloaded)."""
        total = 0
        for index, before in zip(self.gpus, self._start, strict=True):
            after = self.library.energy_mj(index)
            if before is None or after is None or after < before:
                return None
            total += after - before
        return total / 1e3

    def extra_figures(self) -> dict[str, float]:
        """Nothing beyond energy."""
        return {}
