"""The ``openai-endpoint`` backend: a server the farm did not start (Ollama, vLLM, a
llama.cpp server elsewhere, any OpenAI-compatible service), named by the campaign.

The task's artifact is the endpoint's descriptor, a small JSON file the coordinator
writes from the spec: ``{"endpoint": "http://host:port/v1", "model": NAME,
"api_key_env": VAR, "api": "openai" | "ollama"}`` (``ollama``: Ollama's native chat API
under the server's root, whose own timings are recorded per level). The API key itself
never leaves the agent: it is read from the agent's environment variable ``api_key_env``
names. Loading waits until ``GET {endpoint}/models`` (Ollama: ``/api/version``) answers
(the time it takes is the trial's load time); when the server also answers ``GET
/metrics`` (vLLM does), it is read around every load level.
"""

from __future__ import annotations

import http.client
import json
import os
import time
from pathlib import Path
from typing import ClassVar

from agent.backends.base import check_options
from agent.backends.serving import Endpoint, ServingBackend
from edgefarm.domain import MeasureSettings
from edgefarm.errors import ArtifactError, ModelLoadError, ServingFailed

DESCRIPTOR_MAX_BYTES = 64 << 10
APIS = ("openai", "ollama")
READY_PATHS = {"openai": "/models", "ollama": "/api/version"}
METRICS_PATH = "/metrics"  # read when the endpoint's server exposes Prometheus metrics
READY_TIMEOUT_S = 30.0


def read_descriptor(path: Path) -> dict[str, str]:
    """The descriptor's fields; :class:`ArtifactError` naming what is wrong."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(DESCRIPTOR_MAX_BYTES + 1)
    except OSError as err:
        raise ArtifactError(f"cannot read endpoint descriptor {path.name}: {err}") from err
    if len(raw) > DESCRIPTOR_MAX_BYTES:
        raise ArtifactError(f"endpoint descriptor {path.name} is over {DESCRIPTOR_MAX_BYTES} bytes")
    try:
        data = json.loads(raw)
    except ValueError:
        raise ArtifactError(f"endpoint descriptor {path.name} is not JSON") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"endpoint descriptor {path.name} is not a JSON object")
    fields = {k: data.get(k, "") for k in ("endpoint", "model", "api_key_env", "api")}
    bad = [k for k, v in fields.items() if not isinstance(v, str)]
    if bad or not fields["endpoint"] or not fields["model"]:
        raise ArtifactError(
            f"endpoint descriptor {path.name}: needs text fields endpoint and model "
            "(and optionally api_key_env, api)"
        )
    fields["api"] = fields["api"] or "openai"
    if fields["api"] not in APIS:
        raise ArtifactError(f"endpoint descriptor {path.name}: api must be one of {APIS}")
    return fields


class OpenAiEndpointBackend(ServingBackend):
    """An external OpenAI-compatible endpoint, measured through the serving workload."""

    NAME: ClassVar[str] = "openai-endpoint"

    @classmethod
    def installed_version(cls) -> str | None:
        """Always available: the client is the standard library's."""
        return "http"

    def load(self, model_path: Path, settings: MeasureSettings, options: dict[str, str]) -> None:
        """Read the descriptor and the API key, and wait until the endpoint answers."""
        check_options(self.NAME, options, frozenset())
        fields = read_descriptor(model_path)
        key = ""
        if fields["api_key_env"]:
            key = os.environ.get(fields["api_key_env"], "")
            if not key:
                raise ServingFailed(
                    f"the endpoint's API key variable {fields['api_key_env']} is not set "
                    "on this agent"
                )
        self.endpoint = Endpoint(fields["endpoint"], fields["model"], key, fields["api"])
        try:
            self.endpoint.parts()
        except ValueError as err:
            raise ArtifactError(str(err)) from None
        self.server_header = wait_until_ready(
            self.endpoint, min(READY_TIMEOUT_S, settings.timeout_s / 2)
        )
        if _status(self.endpoint, METRICS_PATH, root=True) == 200:  # read around levels
            self.metrics_path = METRICS_PATH

    server_header = ""

    def version(self) -> str:
        """The endpoint's server as its ``Server`` header names it ("unknown" if not)."""
        return self.server_header or "unknown"

    def environment(self) -> dict[str, str]:
        """Where the endpoint is and which model it was asked for (never the key)."""
        return self.serving_environment()


def _status(endpoint: Endpoint, path: str, root: bool = False) -> int:
    """The status of ``GET {endpoint}{path}`` (under the server's root with ``root``);
    0 when it does not answer."""
    prefix = endpoint.parts()[3]
    conn = endpoint.connection(5.0)
    try:
        conn.request("GET", path if root else prefix + path)
        response = conn.getresponse()
        response.read(1 << 16)
        return int(response.status)
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        conn.close()


def wait_until_ready(endpoint: Endpoint, timeout_s: float) -> str:
    """Poll ``GET {endpoint}/models`` (Ollama: ``/api/version``) until it answers 200;
    its ``Server`` header
    (ModelLoadError for another status, ServingFailed when nothing answers within
    ``timeout_s``)."""
    prefix = endpoint.parts()[3]
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        conn = endpoint.connection(5.0)
        try:
            headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
            conn.request("GET", prefix + READY_PATHS[endpoint.api], headers=headers)
            response = conn.getresponse()
            body = response.read(4096).decode("utf-8", "replace")
            if response.status == 200:
                return str(response.getheader("server") or "")[:200]
            raise ModelLoadError(
                f"endpoint {endpoint.base_url} answered GET {READY_PATHS[endpoint.api]} with HTTP "
                f"{response.status}: {' '.join(body.split())[:200]}"
            )
        except (OSError, http.client.HTTPException) as err:
            last = f"{type(err).__name__}: {err}"
        finally:
            conn.close()
        time.sleep(0.5)
    raise ServingFailed(
        f"endpoint {endpoint.base_url} did not answer within {timeout_s:g} s ({last[:200]})"
    )
