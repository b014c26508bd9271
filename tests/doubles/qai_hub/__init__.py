"""TEST DOUBLE of the Qualcomm AI Hub client ``qai_hub`` (mirrors qai-hub 0.56).

NOT the real client and never used in production: production code imports the real
``qai_hub``. Tests put ``tests/doubles`` first on ``PYTHONPATH`` (agent processes) or
import ``tests.doubles.qai_hub`` and hand it to ``agent.hub.api.hub_api`` (unit tests).

It mirrors the names and signatures the farm uses (``Client``, ``ClientConfig``,
``Device``, ``QuantizeDtype``, ``JobStatus``, the job classes, ``UserError`` /
``qai_hub.client.RateLimitedError`` ...) and returns profile dictionaries with exactly
the real client's keys and units. Its jobs are deterministic and kept on disk in
``$QAI_HUB_DOUBLE_STATE`` so that several processes (and a restarted agent) share them;
``config.json`` there makes jobs take time, fail with a message, or rate-limit the
first N submissions (see ``_state``).
"""

from __future__ import annotations

from typing import Any

from ._state import STATE_ENV, counters, jobs, write_config
from .client import *  # noqa: F403
from .client import Client as _Client
from .client import __all__ as _client_all

__version__ = "0.56.0"

_global_client = _Client()


def get_devices(name: str = "", os: str = "", attributes: Any = None) -> Any:
    """As ``qai_hub.get_devices`` (the default client, configured from the ini file)."""
    return _global_client.get_devices(name, os, attributes)


def get_job(job_id: str) -> Any:
    """As ``qai_hub.get_job``."""
    return _global_client.get_job(job_id)


get_job_summaries = _global_client.get_job_summaries
upload_model = _global_client.upload_model
get_model = _global_client.get_model
submit_compile_job = _global_client.submit_compile_job
submit_quantize_job = _global_client.submit_quantize_job
submit_inference_job = _global_client.submit_inference_job
submit_profile_job = _global_client.submit_profile_job

__all__ = [
    *_client_all,
    "STATE_ENV",
    "__version__",
    "counters",
    "get_devices",
    "get_job",
    "get_model",
    "jobs",
    "submit_compile_job",
    "submit_inference_job",
    "submit_profile_job",
    "submit_quantize_job",
    "upload_model",
    "write_config",
]
