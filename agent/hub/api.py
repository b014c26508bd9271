"""The one place that imports the Qualcomm AI Hub client (``qai_hub``).

Production code gets the real client from :func:`open_hub`. Everything else in
:mod:`agent.hub` talks to the :class:`HubApi` it returns, so tests can hand in a test
double of the ``qai_hub`` module through :func:`hub_api` instead.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from agent.hub.config import HubConfig
from edgefarm.errors import MissingExtra

# Box-drawing frames and padding the client draws around its messages.
_FRAME = re.compile(r"[\u2500-\u257f|]+")
_MAX_MESSAGE_CHARS = 500


@dataclass(frozen=True)
class HubApi:
    """The ``qai_hub`` module, a configured ``qai_hub.Client`` and its error types."""

    module: Any  # the qai_hub module: Device, QuantizeDtype, JobStatus, ...
    client: Any  # a qai_hub.Client bound to one token
    version: str  # the client's version
    error: type[Exception]  # qai_hub.Error: every error the client raises on purpose
    user_error: type[Exception]  # qai_hub.UserError: the hub refused what we asked
    rate_limited: type[Exception]  # qai_hub.client.RateLimitedError


def open_hub(config: HubConfig) -> HubApi:
    """The real client, configured with ``config``'s token (quiet: no progress bars)."""
    if importlib.util.find_spec("qai_hub") is None:
        raise MissingExtra("qai-hub", "qai_hub")
    import qai_hub
    import qai_hub.client

    return hub_api(qai_hub, qai_hub.client, config)


def hub_api(module: ModuleType, client_module: ModuleType, config: HubConfig) -> HubApi:
    """A :class:`HubApi` over ``module`` (``qai_hub`` or a test double of it)."""
    settings: dict[str, Any] = {"api_token": config.api_token, "verbose": False}
    if config.api_url:
        settings["api_url"] = config.api_url
    if config.web_url:
        settings["web_url"] = config.web_url
    if config.default_project:
        settings["default_project"] = config.default_project
    client = module.Client(config=module.ClientConfig(**settings))
    return HubApi(
        module=module,
        client=client,
        version=str(module.__version__),
        error=module.Error,
        user_error=module.UserError,
        rate_limited=client_module.RateLimitedError,
    )


def hub_message(error: BaseException) -> str:
    """The client's (often framed, multi-line) message of ``error`` on one short line."""
    text = " ".join(_FRAME.sub(" ", str(error)).split()) or type(error).__name__
    if len(text) > _MAX_MESSAGE_CHARS:
        text = text[: _MAX_MESSAGE_CHARS - 3] + "..."
    return text
