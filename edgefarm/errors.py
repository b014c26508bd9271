"""The one error hierarchy of edgefarm, and its mapping to process exit codes.

Every error a user can cause or meet derives from :class:`EdgefarmError`. The CLI
catches these at a single place and prints ``error: <message>`` without a traceback,
exiting with :attr:`EdgefarmError.exit_code`.
"""

from __future__ import annotations


class EdgefarmError(Exception):
    """Base of every expected edgefarm failure."""

    exit_code: int = 1


class UsageError(EdgefarmError):
    """The user asked for something that cannot be done as asked."""

    exit_code = 2


class SpecError(EdgefarmError):
    """A campaign spec, inventory file or other YAML input is invalid.

    The message names the file, line and field.
    """

    exit_code = 3


class StoreError(EdgefarmError):
    """The results store cannot be opened, migrated or written."""

    exit_code = 4


class SchemaVersionError(StoreError):
    """The store was written by a newer edgefarm than this one."""


class ConnectionFailed(EdgefarmError):
    """A coordinator or agent could not be reached."""

    exit_code = 5


class AuthError(EdgefarmError):
    """A token was missing or wrong."""

    exit_code = 6


class CampaignFailed(EdgefarmError):
    """A campaign finished but at least one of its tasks failed."""

    exit_code = 7


class RegressionFound(EdgefarmError):
    """A nightly run found a confirmed regression (the report says which)."""

    exit_code = 11


class MissingExtra(EdgefarmError):
    """An optional dependency is not installed; the message names the extra."""

    exit_code = 8

    def __init__(self, extra: str, module: str) -> None:
        super().__init__(
            f"the '{extra}' extra is required (module '{module}' is not installed): "
            f"pip install 'edgefarm[{extra}]'"
        )
        self.extra = extra
        self.module = module


class ConfigError(EdgefarmError):
    """Local configuration (credentials, a client's config file) is missing or unusable.

    The message names the file looked at and how to fix it.
    """

    exit_code = 10


class TaskError(EdgefarmError):
    """A measurement task failed. ``kind`` is stored with the result."""

    kind = "task_error"
    exit_code = 9


class ArtifactError(TaskError):
    """An artifact is missing, truncated, corrupt or fails its sha256 check."""

    kind = "artifact_error"


class ModelLoadError(TaskError):
    """The backend refused to load the model (corrupt or unsupported file)."""

    kind = "model_load_error"


class BackendCrash(TaskError):
    """The measuring child process died (segfault, abort, out of memory)."""

    kind = "backend_crash"


class TaskTimeout(TaskError):
    """The measuring child process ran past its time limit and was killed."""

    kind = "timeout"


class BackendUnavailable(TaskError):
    """The task asks for a backend this agent does not have."""

    kind = "backend_unavailable"


class UnsupportedScheme(TaskError):
    """The backend does not know the requested quantization scheme."""

    kind = "unsupported_scheme"


class LeaseExpired(TaskError):
    """The agent holding the task went silent past its lease, too many times."""

    kind = "lease_expired"


class HubJobFailed(TaskError):
    """A Qualcomm AI Hub job (upload, quantize, compile, profile, inference) failed or was
    refused; the message carries the hub's own reason and the job id."""

    kind = "hub_job_failed"


class ConversionError(TaskError):
    """A conversion step failed, or its output failed the check against the source
    checkpoint's logits (the message names the step, the model and the measured error)."""

    kind = "conversion_error"


class UnsupportedArchitecture(TaskError):
    """A backend (or its converter) cannot take this model architecture; the message
    names the architecture and the backend."""

    kind = "unsupported_architecture"


class ServingFailed(TaskError):
    """A serving measurement got no usable answer from its endpoint (every request of a
    level failed, or the endpoint cannot be reached); the message says why."""

    kind = "serving_error"


TASK_ERROR_KINDS: dict[str, type[TaskError]] = {
    cls.kind: cls
    for cls in (
        TaskError,
        ArtifactError,
        ModelLoadError,
        BackendCrash,
        TaskTimeout,
        BackendUnavailable,
        UnsupportedScheme,
        LeaseExpired,
        HubJobFailed,
        ConversionError,
        UnsupportedArchitecture,
        ServingFailed,
    )
}


def task_error_from_kind(kind: str, message: str) -> TaskError:
    """Rebuild a typed task error from its stored ``kind`` and message."""
    return TASK_ERROR_KINDS.get(kind, TaskError)(message)


def exit_code_for(error: BaseException) -> int:
    """The process exit code for an error: one mapping for the whole program."""
    if isinstance(error, EdgefarmError):
        return error.exit_code
    if isinstance(error, KeyboardInterrupt):
        return 130
    return 1
