"""A nightly suite: a saved campaign plus a baseline policy (pydantic-validated YAML).

```yaml
name: nightly-classifier
campaign: nightly-classifier.yaml   # relative to this file
baseline: last-passing              # last-passing (default) | previous | <run id>
blocks: 0                           # interleaving blocks per series; 0: one per trial
confirm: true                       # re-measure a flagged series before reporting it
```
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from coordinator.spec import CampaignSpec
from edgefarm.yamlfile import load_file

_NAME = re.compile(r"^[a-z0-9._-]+$")
BASELINE_POLICIES = ("last-passing", "previous")


class Suite(BaseModel):
    """A saved campaign run every night and compared with a baseline night."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    campaign: str
    baseline: str = "last-passing"
    blocks: int = Field(default=0, ge=0, strict=True)
    confirm: bool = True

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be lowercase letters, digits, '.', '_' or '-'")
        return value

    @field_validator("campaign")
    @classmethod
    def _check_campaign(cls, value: str, info: ValidationInfo) -> str:
        base_dir = (info.context or {}).get("base_dir")
        if base_dir is not None and not (Path(base_dir) / value).is_file():
            raise ValueError(f"campaign file not found: {Path(base_dir) / value}")
        return value

    @field_validator("baseline")
    @classmethod
    def _check_baseline(cls, value: str) -> str:
        if value not in BASELINE_POLICIES and not value.startswith("n-"):
            raise ValueError(
                f"must be one of {', '.join(BASELINE_POLICIES)} or a nightly run id (n-...)"
            )
        return value

    @classmethod
    def load(cls, path: Path) -> Suite:
        """Read and validate a suite file (its campaign must exist next to it)."""
        return load_file(cls, path, context={"base_dir": path.parent})


def load_suite(path: Path) -> tuple[Suite, Path, CampaignSpec]:
    """The suite, its campaign file's path and the validated campaign."""
    suite = Suite.load(path)
    campaign_path = (path.parent / suite.campaign).resolve()
    return suite, campaign_path, CampaignSpec.load(campaign_path)
