"""Where a hub agent finds its Qualcomm AI Hub token: the client's own config files.

The same files and precedence as the ``qai_hub`` client itself:

1. an explicit file (``edgefarm agent hub --hub-config PATH``);
2. a named profile: ``~/.qai_hub/<profile>.ini`` (``--hub-profile NAME``, as
   ``qai-hub configure --profile NAME`` writes it);
3. ``$QAIHUB_CLIENT_INI``;
4. ``~/.qai_hub/client.ini`` (what ``qai-hub configure --api_token TOKEN`` writes).

The file is an INI with an ``[api]`` section holding ``api_token`` (and usually
``api_url`` / ``web_url``). A missing file or token is a one-line :class:`ConfigError`
that says how to configure one. No network is touched here.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edgefarm.errors import ConfigError, UsageError

CONFIG_ENV = "QAIHUB_CLIENT_INI"
CONFIG_DIR = "~/.qai_hub"
DEFAULT_PROFILE = "client"
HOW_TO_CONFIGURE = (
    "run `qai-hub configure --api_token YOUR_TOKEN` (the token is on your AI Hub account "
    f"page) or point {CONFIG_ENV} at a client.ini"
)


@dataclass(frozen=True)
class HubConfig:
    """A usable AI Hub client configuration (the token itself is never logged)."""

    path: Path
    source: str  # how the file was chosen, for messages
    api_token: str
    api_url: str | None = None
    web_url: str | None = None
    default_project: str | None = None


def config_path(
    config: str | Path | None = None,
    profile: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[Path, str]:
    """The config file to read and a few words on why it was chosen."""
    env = os.environ if environ is None else environ
    if config and profile:
        raise UsageError("give either --hub-config or --hub-profile, not both")
    if config:
        return Path(config).expanduser(), "--hub-config"
    if profile:
        return Path(f"{CONFIG_DIR}/{profile}.ini").expanduser(), f"profile '{profile}'"
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]).expanduser(), f"${CONFIG_ENV}"
    return Path(f"{CONFIG_DIR}/{DEFAULT_PROFILE}.ini").expanduser(), "the default"


def load_hub_config(
    config: str | Path | None = None,
    profile: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> HubConfig:
    """Find and read the AI Hub client configuration; :class:`ConfigError` without a token."""
    path, source = config_path(config, profile, environ)
    if not path.is_file():
        raise ConfigError(
            f"no Qualcomm AI Hub token: {path} ({source}) does not exist; {HOW_TO_CONFIGURE}"
        )
    parser = configparser.ConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except (OSError, UnicodeDecodeError, configparser.Error) as err:
        reason = " ".join(str(err).split())
        raise ConfigError(
            f"cannot read the Qualcomm AI Hub config {path}: {reason}; {HOW_TO_CONFIGURE}"
        ) from None
    section = parser["api"] if parser.has_section("api") else None
    token = section.get("api_token", "").strip() if section is not None else ""
    if section is None or not token:
        raise ConfigError(
            f"no Qualcomm AI Hub token in {path} ({source}): no api_token in its [api] "
            f"section; {HOW_TO_CONFIGURE}"
        )
    return HubConfig(
        path=path,
        source=source,
        api_token=token,
        api_url=section.get("api_url") or None,
        web_url=section.get("web_url") or None,
        default_project=section.get("default_project") or None,
    )
