"""The registry of measuring backends.

Backends are named here as ``"module:Class"`` strings and imported only when asked
for, so listing them never imports a heavy runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from edgefarm.errors import BackendUnavailable

if TYPE_CHECKING:
    from agent.backends.base import Backend

BACKENDS: dict[str, str] = {
    "onnxruntime": "agent.backends.onnxruntime:OnnxRuntimeBackend",
    "noop": "agent.backends.noop:NoopBackend",
    "llama-cpp": "agent.backends.llama_cpp:LlamaCppBackend",
    "mlx": "agent.backends.mlx:MlxBackend",
    "openvino": "agent.backends.openvino:OpenVinoBackend",
    "onnxruntime-genai": "agent.backends.onnxruntime_genai:OnnxRuntimeGenaiBackend",
    "foundry-local": "agent.backends.foundry_local:FoundryLocalBackend",
    "llama-server": "agent.backends.llama_server:LlamaServerBackend",
    "openai-endpoint": "agent.backends.openai_endpoint:OpenAiEndpointBackend",
    "vllm": "agent.backends.vllm:VllmBackend",
}


def get_backend(name: str) -> type[Backend]:
    """The backend class registered as ``name``.

    Raises :class:`BackendUnavailable` for a name this agent does not know.
    """
    target = BACKENDS.get(name)
    if target is None:
        known = ", ".join(sorted(BACKENDS))
        raise BackendUnavailable(f"unknown backend '{name}' (known backends: {known})")
    module_name, _, class_name = target.partition(":")
    cls: type[Backend] = getattr(importlib.import_module(module_name), class_name)
    return cls


def installed_backends() -> dict[str, str]:
    """Backends whose runtime is installed here: name -> runtime version.

    Uses only ``importlib.util.find_spec`` and package metadata: no runtime is imported.
    """
    found: dict[str, str] = {}
    for name in BACKENDS:
        version = get_backend(name).installed_version()
        if version is not None:
            found[name] = version
    return found
