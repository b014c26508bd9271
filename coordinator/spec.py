"""The campaign spec: which models, backends, schemes and devices to sweep, and how to measure.

Parsed from YAML with pydantic; every model forbids unknown fields, so a typo is an
error. Every problem is a one-line :class:`~edgefarm.errors.SpecError`
``FILE:LINE: field.path: problem``.

Every value is bounded by what the wire and the store carry and by what a measurement
can sensibly ask for: numbers (measurement settings as ``uint32`` / finite doubles,
trial and sample counts by :mod:`edgefarm.wire_limits`, conversion parameters within
int64), text (names, references, options, selectors: length, no control characters)
and counts (entries of lists and maps, variants of the sweep). The limits are named
below or in :mod:`edgefarm.wire_limits`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agent.serving.plan import ServingPlan
from agent.serving.plan import Slo as ServingSlo
from coordinator.conversion.olive_convert import SCHEME_PREFIX as OLIVE_PREFIX
from coordinator.conversion.olive_convert import olive_request
from edgefarm.domain import AUTO_OTHER_CPU, MeasureSettings
from edgefarm.selectors import parse_selector
from edgefarm.wire_limits import (
    MAX_INT64,
    MAX_MAP_ENTRIES,
    MAX_NAME_BYTES,
    MAX_SAMPLES_PER_RESULT,
    MAX_SAMPLES_PER_TRIAL,
    MAX_SERVING_LEVELS,
    MAX_STRING_BYTES,
    MAX_TRIALS,
)
from edgefarm.yamlfile import FieldError, excerpt, load_file, validate

# Schemes each backend accepts; None: any scheme (not yet pinned down for that backend).
BACKEND_SCHEMES: dict[str, tuple[str, ...] | None] = {
    "onnxruntime": ("fp32", "fp16", "int8-dynamic", "int8-static", "int4-weight"),
    "noop": ("none",),
    "openvino": ("fp32", "fp16", "int8-weights", "int4-sym", "int4-asym", "int8-ptq"),
    # llama.cpp GGUF types, named as llama.cpp names them.
    "llama-cpp": ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_1", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"),
    "mlx": ("fp16", "q8", "q4"),
    # ONNX Runtime GenAI (Olive's ModelBuilder, Foundry Local): weight-only int4 / int8
    # MatMulNBits, or float weights.
    "onnxruntime-genai": ("int4", "int8", "fp32", "fp16"),
    # Foundry Local (its SDK, in its own environment on the agent): the same ONNX GenAI
    # artifacts, run in-process by the SDK.
    "foundry-local": ("int4", "int8", "fp32", "fp16"),
    # Serving: llama.cpp's server on the GGUF of each type (the agent starts it), and an
    # external OpenAI-compatible endpoint (its scheme is a label of what it serves).
    "llama-server": ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_1", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"),
    "openai-endpoint": None,
    # vLLM's server on the model's Hugging Face folder, in the dtype the scheme names (in
    # an environment of its own on the agent: --backend-env vllm=PATH).
    "vllm": ("fp32", "bf16", "fp16"),
    # Qualcomm AI Hub: fp32 / fp16 compiled as they are; the rest quantized by a hub
    # quantize job (int8 = w8a8, int16 = w8a16, w4a8, w4a16: weights x activations).
    "qai-hub": ("fp32", "fp16", "int8", "int16", "w4a8", "w4a16"),
}
KNOWN_BACKENDS = tuple(BACKEND_SCHEMES)
# Backends measured through an endpoint by the serving workload (a `serving:` block).
SERVING_BACKENDS = ("llama-server", "openai-endpoint", "vllm")
ENDPOINT_BACKEND = "openai-endpoint"
# Backends that also take "olive-*" schemes: a model made by a Microsoft Olive command or
# workflow (coordinator.conversion.olive_convert) from the model's ONNX.
OLIVE_BACKENDS = ("onnxruntime",)

SOURCE_KINDS = ("builtin", "file", "hf")

_CAMPAIGN_NAME = re.compile(r"^[a-z0-9._-]+$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SCHEME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_BUILTIN = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_HF_REPO = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+(/[^@\s]+)?(@[\w./-]+)?$")
_DEFAULTS = MeasureSettings()

# What a spec may ask for, beyond edgefarm.wire_limits (all well inside uint32).
MAX_REF_BYTES = 4096  # a file: / hf: / builtin: reference (a path)
MAX_SPEC_ENTRIES = 1024  # models, backends, devices, schemes of one entry
MAX_VARIANTS = 10_000  # models x backends x schemes
MAX_DURATION_S = 86_400.0  # min/max_duration_s and timeout_s: one day
MAX_THREADS = 1024
MAX_BATCH_SIZE = 65_536
MAX_TOKENS = 1 << 20  # prompt_tokens, context_tokens
MAX_CPU_CORES = 4096.0  # max_other_cpu_cores
# Chunk length a language model's perplexity, KLD and top-1 are scored in (the fidelity
# reference is built with it once per model, so it is a campaign-wide setting).
DEFAULT_FIDELITY_CONTEXT = 512
FIDELITY_CONTEXT_FIELD = "fidelity_context_tokens"
MAX_CONCURRENCY = 4096  # requests in flight at one serving level
SERVER_STARTUP_ALLOWANCE_S = 120.0  # a serving trial's start-up, in its time budget
_ENDPOINT = re.compile(r"^https?://[A-Za-z0-9.\[\]:-]+(:[0-9]{1,5})?(/[\w./~%-]*)?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_CONTROL_BUT_WHITESPACE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def _check_text(value: str, limit: int, multiline: bool = False) -> str:
    """``value`` when it is at most ``limit`` UTF-8 bytes and holds no control
    characters (tabs and line breaks allowed when ``multiline``)."""
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise ValueError(f"text of {size} bytes is too long (limit {limit})")
    bad = (_CONTROL_BUT_WHITESPACE if multiline else _CONTROL).search(value)
    if bad is not None:
        code = ord(bad.group())
        what = "unpaired surrogate" if 0xD800 <= code <= 0xDFFF else "control character"
        raise ValueError(f"{what} U+{code:04X} is not allowed")
    return value


def _bounded(limit: int, multiline: bool = False) -> AfterValidator:
    return AfterValidator(lambda value: _check_text(value, limit, multiline))


NameText = Annotated[str, _bounded(MAX_NAME_BYTES)]
RefText = Annotated[str, _bounded(MAX_REF_BYTES)]
ValueText = Annotated[str, _bounded(MAX_STRING_BYTES)]
Description = Annotated[str, _bounded(MAX_STRING_BYTES, multiline=True)]
ConvertValue = str | int | float | bool


def _scalar_text(value: Any) -> Any:
    """YAML numbers and booleans written as option values become text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


def _to_options(value: Any) -> Any:
    if value is None:
        return {}
    if isinstance(value, dict):
        return {key: _scalar_text(item) for key, item in value.items()}
    return value


def _to_selector(value: Any) -> Any:
    """Parse a selector after bounding it, so that no error formats a large value."""
    if value is None:
        return {}
    if isinstance(value, str):
        _check_text(value, MAX_STRING_BYTES)
    elif isinstance(value, dict | list):
        if len(value) > MAX_MAP_ENTRIES:
            raise ValueError(
                f"a selector of {len(value)} entries is too many (limit {MAX_MAP_ENTRIES})"
            )
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(value, dict):
                _check_text(str(key), MAX_NAME_BYTES)
            if isinstance(item, dict | list):
                what = "mapping" if isinstance(item, dict) else "list"
                where = f"selector key {excerpt(key)}" if isinstance(value, dict) else "an item"
                raise ValueError(
                    f"{where} is a {what}: expected 'key=value' text or a single value"
                )
            if isinstance(item, str):
                _check_text(item, MAX_STRING_BYTES)
    else:
        return value
    return parse_selector(value)


Options = Annotated[
    dict[NameText, ValueText],
    BeforeValidator(_to_options),
    Field(max_length=MAX_MAP_ENTRIES),
]
SelectorField = Annotated[dict[str, str], BeforeValidator(_to_selector)]
ConvertParams = Annotated[dict[NameText, ConvertValue], Field(max_length=MAX_MAP_ENTRIES)]


def resolve_file_ref(ref: str, base_dir: Path) -> Path:
    """The path of a ``file:PATH`` reference, relative to ``base_dir`` (the spec's folder)."""
    return (base_dir / ref.removeprefix("file:")).expanduser()


def _check_file_ref(ref: str, info: ValidationInfo, folder_ok: bool = False) -> None:
    """When loading from a file (``base_dir`` in context), the referenced file (or, with
    ``folder_ok``, folder) must exist."""
    base_dir = (info.context or {}).get("base_dir")
    if base_dir is None:
        return
    try:
        path = resolve_file_ref(ref, Path(base_dir))
        found = path.is_file() or (folder_ok and path.is_dir())
    except (OSError, ValueError, RuntimeError) as err:  # NUL, too long, ~nobody
        raise ValueError(f"cannot use {excerpt(ref)}: {excerpt(str(err), 120)}") from None
    if not found:
        # the reference is bounded (MAX_REF_BYTES), so the path is short enough to show
        raise ValueError(f"{'path' if folder_ok else 'file'} not found: {path}")


class ModelEntry(BaseModel):
    """A model to sweep and where it comes from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: NameText
    source: RefText
    eval: RefText | None = None
    calibration: RefText | None = None
    # Only these backends measure this model (default: every backend of the campaign).
    backends: list[NameText] | None = Field(default=None, max_length=MAX_SPEC_ENTRIES)

    @property
    def kind(self) -> str:
        """``builtin``, ``file`` or ``hf``."""
        return self.source.partition(":")[0]

    @property
    def ref(self) -> str:
        """The source without its kind prefix (builtin name, relative path or HF repo)."""
        return self.source.partition(":")[2]

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _MODEL_NAME.match(value):
            raise ValueError(
                f"invalid model name {excerpt(value)} (use letters, digits, '.', '_' and '-')"
            )
        return value

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str, info: ValidationInfo) -> str:
        kind, sep, ref = value.partition(":")
        good = sep and (
            (kind == "builtin" and _BUILTIN.match(ref))
            or (kind == "file" and ref.strip())
            or (kind == "hf" and _HF_REPO.match(ref))
        )
        if not good:
            raise ValueError(
                f"invalid model source {excerpt(value)} "
                "(expected 'builtin:NAME', 'file:PATH' or 'hf:ORG/REPO')"
            )
        if kind == "file":
            _check_file_ref(value, info, folder_ok=True)
        return value

    @field_validator("eval", "calibration")
    @classmethod
    def _check_data_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if not value.startswith("file:") or not value[5:].strip():
            raise ValueError(f"invalid data reference {excerpt(value)} (expected 'file:PATH')")
        _check_file_ref(value, info)
        return value


class Slo(BaseModel):
    """The service-level objective goodput counts against."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ttft_ms: float = Field(default=500.0, gt=0, le=MAX_DURATION_S * 1000, allow_inf_nan=False)
    tpot_ms: float = Field(default=100.0, gt=0, le=MAX_DURATION_S * 1000, allow_inf_nan=False)


class Serving(BaseModel):
    """How a serving backend is loaded: levels, request shape, objective, and for
    ``openai-endpoint`` which endpoint (the API key stays in the agent's environment)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    concurrency: list[Annotated[int, Field(ge=1, le=MAX_CONCURRENCY)]] | None = Field(
        default=None, max_length=MAX_SERVING_LEVELS
    )
    rates: list[Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)]] = Field(
        default_factory=list, max_length=MAX_SERVING_LEVELS
    )
    arrival: Literal["constant", "poisson"] = "constant"
    requests: int = Field(default=16, ge=1, le=MAX_SAMPLES_PER_TRIAL, strict=True)
    level_s: float = Field(default=60.0, gt=0, le=MAX_DURATION_S, allow_inf_nan=False)
    output_tokens: int = Field(default=64, ge=1, le=MAX_TOKENS, strict=True)
    first_token_timeout_s: float = Field(default=60.0, gt=0, le=MAX_DURATION_S, allow_inf_nan=False)
    slo: Slo = Field(default_factory=lambda: Slo())
    endpoint: ValueText | None = None
    model: NameText | None = None
    api_key_env: NameText | None = None
    # openai: POST {endpoint}/chat/completions; ollama: Ollama's native {endpoint}/api/chat
    # (endpoint = the server's root, e.g. http://127.0.0.1:11434), with its own timings
    api: Literal["openai", "ollama"] | None = None

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is not None and not _ENDPOINT.match(value):
            raise ValueError(
                f"invalid endpoint {excerpt(value)} (expected http(s)://HOST[:PORT]/PATH, "
                "e.g. http://127.0.0.1:11434/v1)"
            )
        return value

    @field_validator("api_key_env")
    @classmethod
    def _check_env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError(f"invalid environment variable name {excerpt(value)}")
        return value

    def plan(self) -> ServingPlan:
        """The agent-side plan of these settings."""
        return ServingPlan(
            concurrency=tuple(
                self.concurrency if self.concurrency is not None else (() if self.rates else (1,))
            ),
            rates=tuple(self.rates),
            arrival=self.arrival,
            requests=self.requests,
            level_s=self.level_s,
            output_tokens=self.output_tokens,
            slo=ServingSlo(self.slo.ttft_ms, self.slo.tpot_ms),
            first_token_timeout_s=self.first_token_timeout_s,
        )

    def descriptor(self) -> dict[str, str]:
        """What the ``openai-endpoint`` task's artifact holds."""
        return {
            "endpoint": self.endpoint or "",
            "model": self.model or "",
            "api_key_env": self.api_key_env or "",
            "api": self.api or "openai",
        }


class BackendEntry(BaseModel):
    """A backend, the quantization schemes to try on it, and options for the agent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: NameText
    schemes: list[NameText] = Field(min_length=1, max_length=MAX_SPEC_ENTRIES)
    options: Options = Field(default_factory=dict)
    # Overrides of the campaign's measurement settings for this backend.
    measurement: Measurement | None = None
    # Only these models are measured by this entry (default: every model).
    models: list[NameText] | None = Field(default=None, max_length=MAX_SPEC_ENTRIES)
    # Conversion parameters per scheme, e.g. {int4-asym: {group_size: 128}} for NNCF or
    # {q4: {group_size: 32}} for MLX; part of each conversion's cache key.
    convert: dict[NameText, ConvertParams] = Field(
        default_factory=dict, max_length=MAX_SPEC_ENTRIES
    )
    # Serving backends: the load to measure them under (and the endpoint, if external).
    serving: Serving | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if value not in BACKEND_SCHEMES:
            raise ValueError(
                f"unknown backend {excerpt(value)} (expected one of {', '.join(KNOWN_BACKENDS)})"
            )
        return value


class DeviceEntry(BaseModel):
    """Which devices to measure on: a selector (empty matches every device)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    selector: SelectorField = Field(default_factory=dict)


class Measurement(BaseModel):
    """How to measure; every field defaults to :class:`MeasureSettings`' default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    warmup_iterations: int = Field(
        default=_DEFAULTS.warmup_iterations, ge=0, le=MAX_SAMPLES_PER_TRIAL, strict=True
    )
    min_iterations: int = Field(
        default=_DEFAULTS.min_iterations, gt=0, le=MAX_SAMPLES_PER_TRIAL, strict=True
    )
    max_iterations: int = Field(
        default=_DEFAULTS.max_iterations, gt=0, le=MAX_SAMPLES_PER_TRIAL, strict=True
    )
    min_duration_s: float = Field(
        default=_DEFAULTS.min_duration_s,
        gt=0,
        le=MAX_DURATION_S,
        strict=True,
        allow_inf_nan=False,
    )
    max_duration_s: float = Field(
        default=_DEFAULTS.max_duration_s,
        gt=0,
        le=MAX_DURATION_S,
        strict=True,
        allow_inf_nan=False,
    )
    trials: int = Field(default=_DEFAULTS.trials, gt=0, le=MAX_TRIALS, strict=True)
    threads: int = Field(default=_DEFAULTS.threads, gt=0, le=MAX_THREADS, strict=True)
    batch_size: int = Field(default=_DEFAULTS.batch_size, gt=0, le=MAX_BATCH_SIZE, strict=True)
    timeout_s: float = Field(
        default=_DEFAULTS.timeout_s, gt=0, le=MAX_DURATION_S, strict=True, allow_inf_nan=False
    )
    prompt_tokens: int = Field(default=_DEFAULTS.prompt_tokens, gt=0, le=MAX_TOKENS, strict=True)
    context_tokens: int = Field(default=_DEFAULTS.context_tokens, gt=0, le=MAX_TOKENS, strict=True)
    # Language models: the chunk length fidelity (perplexity, KLD, top-1) is scored in,
    # independent of context_tokens (the timing context); campaign-wide only.
    fidelity_context_tokens: int = Field(
        default=DEFAULT_FIDELITY_CONTEXT, ge=2, le=MAX_TOKENS, strict=True
    )
    max_other_cpu_cores: float = Field(  # cores; 0: record only; -1: a share of the host's
        default=_DEFAULTS.max_other_cpu_cores,
        ge=AUTO_OTHER_CPU,
        le=MAX_CPU_CORES,
        strict=True,
        allow_inf_nan=False,
    )

    # Thermal guard: degrees C every zone must be at most before a trial (0: off), and how
    # long to wait for it; a throttled or still-hot trial is re-measured, then invalid.
    max_start_temp_c: float = Field(
        default=_DEFAULTS.max_start_temp_c, ge=0, le=150, strict=True, allow_inf_nan=False
    )
    cooldown_timeout_s: float = Field(
        default=_DEFAULTS.cooldown_timeout_s,
        ge=0,
        le=MAX_DURATION_S,
        strict=True,
        allow_inf_nan=False,
    )

    @field_validator("max_other_cpu_cores")
    @classmethod
    def _check_busy_limit(cls, value: float) -> float:
        if value < 0 and value != AUTO_OTHER_CPU:
            raise ValueError(
                "must be a number of cores (0: record only) or -1 (a quarter of the host's cores)"
            )
        return value


@dataclass(frozen=True)
class Variant:
    """One model x backend x scheme combination to prepare and measure."""

    model: ModelEntry
    backend: str
    scheme: str
    options: dict[str, str] = field(default_factory=dict)
    settings: MeasureSettings = field(default_factory=MeasureSettings)
    convert: dict[str, Any] = field(default_factory=dict)


class CampaignSpec(BaseModel):
    """A campaign: the sweep of models x backends x schemes over selected devices."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: NameText
    description: Description = ""
    models: list[ModelEntry] = Field(min_length=1, max_length=MAX_SPEC_ENTRIES)
    backends: list[BackendEntry] = Field(min_length=1, max_length=MAX_SPEC_ENTRIES)
    devices: list[DeviceEntry] = Field(
        default_factory=lambda: [DeviceEntry()], min_length=1, max_length=MAX_SPEC_ENTRIES
    )
    measurement: Measurement = Field(default_factory=lambda: Measurement())

    @classmethod
    def load(cls, path: Path) -> CampaignSpec:
        """Read and validate a spec file; ``file:`` references must exist next to it."""
        return load_file(cls, path, context={"base_dir": path.parent})

    @classmethod
    def from_text(cls, text: str, source: str, base_dir: Path | None = None) -> CampaignSpec:
        """Validate spec YAML; ``source`` names it in errors. With ``base_dir``,
        ``file:`` references are checked to exist relative to it."""
        context = {"base_dir": base_dir} if base_dir is not None else None
        return validate(cls, text, source, context=context)

    def measure_settings(self, backend: BackendEntry | None = None) -> MeasureSettings:
        """The campaign's measurement settings, with ``backend``'s overrides applied."""
        values = self.measurement.model_dump(exclude={FIDELITY_CONTEXT_FIELD})
        if backend is not None and backend.measurement is not None:
            override = backend.measurement
            fields = override.model_fields_set - {FIDELITY_CONTEXT_FIELD}
            values.update({k: getattr(override, k) for k in fields})
        return MeasureSettings(**values)

    @property
    def fidelity_context_tokens(self) -> int:
        """The chunk length language models are scored for fidelity in."""
        return self.measurement.fidelity_context_tokens

    def variants(self) -> list[Variant]:
        """Every variant, in spec order: models, then backends, then schemes (a model
        that names its backends gets only those)."""
        return [
            Variant(
                model=model,
                backend=backend.name,
                scheme=scheme,
                options={**backend.options, **_serving_options(backend)},
                settings=self.measure_settings(backend),
                convert=_variant_convert(backend, scheme),
            )
            for model in self.models
            for backend in self.backends
            if (model.backends is None or backend.name in model.backends)
            and (backend.models is None or model.name in backend.models)
            for scheme in backend.schemes
        ]

    def selectors(self) -> list[dict[str, str]]:
        """The device selectors, in spec order."""
        return [dict(device.selector) for device in self.devices]

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _CAMPAIGN_NAME.match(value):
            raise ValueError(
                f"invalid campaign name {excerpt(value)} "
                "(use lowercase letters, digits, '.', '_', '-')"
            )
        return value

    @field_validator("devices", "measurement", mode="before")
    @classmethod
    def _none_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return [{}] if info.field_name == "devices" else {}
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> CampaignSpec:
        """Checks across entries; they run once every field is valid on its own."""
        _unique_models(self.models)
        _known_schemes(self.backends)
        for index, backend in enumerate(self.backends):
            _serving_entry(backend, index, self.measure_settings(backend))
        _convert_values(self.backends)
        _model_backends(self.models, self.backends)
        _variant_count(self.models, self.backends)
        _bounds(self.measurement)
        for index, backend in enumerate(self.backends):
            if backend.measurement is not None:
                if FIDELITY_CONTEXT_FIELD in backend.measurement.model_fields_set:
                    raise FieldError(
                        ("backends", index, "measurement", FIDELITY_CONTEXT_FIELD),
                        f"{FIDELITY_CONTEXT_FIELD} is campaign-wide (one fidelity reference "
                        "per model serves every backend): set it under measurement",
                    )
                values = self.measure_settings(backend).to_dict()
                merged = Measurement(
                    **{k: v for k, v in values.items() if k in Measurement.model_fields}
                )
                _bounds(merged, ("backends", index, "measurement"))
        return self


def _serving_options(backend: BackendEntry) -> dict[str, str]:
    """A serving backend's plan as task options (none for other backends)."""
    if backend.name not in SERVING_BACKENDS:
        return {}
    return (backend.serving or Serving()).plan().to_options()


def _variant_convert(backend: BackendEntry, scheme: str) -> dict[str, Any]:
    """A variant's conversion parameters; an external endpoint's are its descriptor."""
    if backend.name == ENDPOINT_BACKEND and backend.serving is not None:
        return dict(backend.serving.descriptor())
    return dict(backend.convert.get(scheme, {}))


def _serving_entry(backend: BackendEntry, index: int, settings: MeasureSettings) -> None:
    """A ``serving:`` block only on serving backends; an endpoint only (and always) on
    ``openai-endpoint``; levels that fit in the trial's time limit."""
    at: tuple[str | int, ...] = ("backends", index, "serving")
    serving = backend.serving
    if backend.name not in SERVING_BACKENDS:
        if serving is not None:
            raise FieldError(
                at,
                f"serving: is for serving backends ({', '.join(SERVING_BACKENDS)}), "
                f"not {backend.name}",
            )
        return
    serving = serving or Serving()
    external = backend.name == ENDPOINT_BACKEND
    if external and (serving.endpoint is None or serving.model is None):
        raise FieldError(
            at
            if backend.serving is None
            else (*at, "endpoint" if serving.endpoint is None else "model"),
            "openai-endpoint needs serving.endpoint (http(s)://HOST:PORT/v1) and serving.model",
        )
    if not external:
        for name in ("endpoint", "model", "api_key_env", "api"):
            if getattr(serving, name) is not None:
                raise FieldError(
                    (*at, name),
                    f"{name} is for openai-endpoint; {backend.name} starts its own server",
                )
    if backend.convert:
        raise FieldError(
            ("backends", index, "convert"), f"{backend.name} takes no conversion parameters"
        )
    try:
        plan = serving.plan()
    except ValueError as err:
        raise FieldError(at, str(err)) from None
    needed = len(plan.levels()) * plan.level_s + SERVER_STARTUP_ALLOWANCE_S
    if needed > settings.timeout_s:
        raise FieldError(
            at,
            f"{len(plan.levels())} level(s) of up to {plan.level_s:g} s plus start-up need "
            f"{needed:g} s, over the trial time limit timeout_s={settings.timeout_s:g}: "
            "raise measurement.timeout_s or lower serving.level_s",
        )


def _unique_models(models: list[ModelEntry]) -> None:
    first: dict[str, int] = {}
    for index, model in enumerate(models):
        if model.name in first:
            raise FieldError(
                ("models", index, "name"),
                f"duplicate model name {excerpt(model.name)} (also models[{first[model.name]}])",
            )
        first[model.name] = index


def _known_schemes(backends: list[BackendEntry]) -> None:
    seen: dict[tuple[Any, ...], int] = {}
    for index, backend in enumerate(backends):
        allowed = BACKEND_SCHEMES[backend.name]
        for position, scheme in enumerate(backend.schemes):
            loc = ("backends", index, "schemes", position)
            if backend.name in OLIVE_BACKENDS and scheme.startswith(OLIVE_PREFIX):
                _olive_scheme(backend, index, position, scheme)
            elif allowed is not None and scheme not in allowed:
                raise FieldError(
                    loc,
                    f"unknown scheme {excerpt(scheme)} for {backend.name} "
                    f"(expected one of {', '.join(allowed)})",
                )
            if allowed is None and not _SCHEME.match(scheme):
                raise FieldError(loc, f"invalid scheme name {excerpt(scheme)}")
            if scheme in backend.schemes[:position]:
                raise FieldError(loc, f"scheme {excerpt(scheme)} is listed twice")
        for scheme in backend.convert:
            if scheme not in backend.schemes:
                raise FieldError(
                    ("backends", index, "convert", scheme),
                    f"conversion parameters for {excerpt(scheme)}, which is not in this "
                    f"entry's schemes ({', '.join(backend.schemes)})",
                )
        key = (
            backend.name,
            tuple(sorted(backend.options.items())),
            tuple(sorted(backend.models or [])),
            str(sorted(backend.convert.items())),
        )
        if key in seen:
            raise FieldError(
                ("backends", index),
                f"backend {backend.name!r} is listed twice with the same options and models "
                f"(also backends[{seen[key]}])",
            )
        seen[key] = index


def _olive_scheme(backend: BackendEntry, index: int, position: int, scheme: str) -> None:
    """An ``olive-*`` scheme: a valid name with an Olive command or workflow to make it."""
    if not _SCHEME.match(scheme):
        raise FieldError(
            ("backends", index, "schemes", position), f"invalid scheme name {excerpt(scheme)}"
        )
    if scheme not in backend.convert:
        raise FieldError(
            ("backends", index, "schemes", position),
            f"scheme {excerpt(scheme)} needs convert: {{{scheme}: {{olive: COMMAND}}}} or "
            "{olive_workflow: file:PATH}: what Olive runs to make it",
        )
    try:
        olive_request(dict(backend.convert[scheme]))
    except ValueError as err:
        raise FieldError(("backends", index, "convert", scheme), str(err)) from None


def _model_backends(models: list[ModelEntry], backends: list[BackendEntry]) -> None:
    names = {m.name for m in models}
    for index, backend in enumerate(backends):
        for position, name in enumerate(backend.models or []):
            if name not in names:
                raise FieldError(
                    ("backends", index, "models", position),
                    f"model {excerpt(name)} is not in the campaign's models "
                    f"({excerpt(', '.join(sorted(names)), 200)})",
                )
    listed = {b.name for b in backends}
    for index, model in enumerate(models):
        for position, name in enumerate(model.backends or []):
            if name not in listed:
                raise FieldError(
                    ("models", index, "backends", position),
                    f"backend {excerpt(name)} is not in the campaign's backends "
                    f"({', '.join(sorted(listed))})",
                )


def _bounds(measurement: Measurement, at: tuple[str | int, ...] = ("measurement",)) -> None:
    for low, high in (("min_iterations", "max_iterations"), ("min_duration_s", "max_duration_s")):
        low_value, high_value = getattr(measurement, low), getattr(measurement, high)
        if low_value > high_value:
            # point at the bound the user wrote (the other may be a default)
            where = low if low in measurement.model_fields_set else high
            raise FieldError((*at, where), f"{low} ({low_value}) is above {high} ({high_value})")
    samples = measurement.trials * measurement.max_iterations
    if samples > MAX_SAMPLES_PER_RESULT:
        where = "trials" if "trials" in measurement.model_fields_set else "max_iterations"
        raise FieldError(
            (*at, where),
            f"trials x max_iterations ({measurement.trials} x {measurement.max_iterations} = "
            f"{samples}) is above the {MAX_SAMPLES_PER_RESULT} samples one result may carry",
        )
    if measurement.max_start_temp_c > 0 and measurement.cooldown_timeout_s >= measurement.timeout_s:
        where = (
            "cooldown_timeout_s"
            if "cooldown_timeout_s" in measurement.model_fields_set
            else "timeout_s"
        )
        raise FieldError(
            (*at, where),
            f"cooldown_timeout_s ({measurement.cooldown_timeout_s:g}) must be below the trial "
            f"time limit timeout_s ({measurement.timeout_s:g}): the wait is part of the trial",
        )


def _convert_values(backends: list[BackendEntry]) -> None:
    """Conversion parameters: integers within int64, finite numbers, bounded text."""
    for index, backend in enumerate(backends):
        for scheme, params in backend.convert.items():
            for key, value in params.items():
                loc = ("backends", index, "convert", scheme, key)
                if isinstance(value, bool):
                    continue
                if isinstance(value, int) and not -MAX_INT64 - 1 <= value <= MAX_INT64:
                    raise FieldError(loc, f"{excerpt(value)} is outside the 64-bit integer range")
                if isinstance(value, float) and not math.isfinite(value):
                    raise FieldError(loc, f"{value} is not a finite number")
                if isinstance(value, str):
                    try:
                        _check_text(value, MAX_STRING_BYTES)
                    except ValueError as err:
                        raise FieldError(loc, str(err)) from None


def _variant_count(models: list[ModelEntry], backends: list[BackendEntry]) -> None:
    count = sum(
        len(backend.schemes)
        for model in models
        for backend in backends
        if (model.backends is None or backend.name in model.backends)
        and (backend.models is None or model.name in backend.models)
    )
    if count > MAX_VARIANTS:
        raise FieldError(
            ("models",),
            f"the sweep has {count} variants (models x backends x schemes; limit {MAX_VARIANTS})",
        )
