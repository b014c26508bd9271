"""TEST DOUBLE of ``qai_hub.client`` (qai-hub 0.56): the names, signatures and shapes the
farm uses, backed by :mod:`._state` instead of the network. Never used in production."""

from __future__ import annotations

import configparser
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from . import _state

_EXTENSIONS = {
    "qnn_context_binary": ".bin",
    "qnn_dlc": ".dlc",
    "tflite": ".tflite",
    "onnx": ".onnx",
    "precompiled_qnn_onnx": ".onnx",
}
_RUNTIMES = tuple(_EXTENSIONS)


# --- errors (as the real client: RateLimitedError is not exported at the top level) ---


class Error(Exception):
    """Base class for all exceptions explicitly thrown by the API."""


class InternalError(Error):
    """Internal API failure."""


class UserError(Error):
    """Something in the user input caused a failure."""


class RateLimitedError(Error):
    """The operation was rate-limited by the server."""


# --- configuration and devices ------------------------------------------------------


@dataclass
class ClientConfig:
    """As ``qai_hub.ClientConfig``."""

    api_token: str
    api_url: str = "https://workbench.aihub.qualcomm.com"
    web_url: str = "https://workbench.aihub.qualcomm.com"
    verbose: bool = False
    client_mode: str = "library"
    default_project: str | None = None


@dataclass
class Device:
    """As ``qai_hub.Device``."""

    name: str = ""
    os: str = ""
    attributes: str | list[str] = field(default_factory=list)


class QuantizeDtype(Enum):
    """As ``qai_hub.QuantizeDtype``."""

    INT8 = 1
    INT16 = 2
    INT4 = 3


class SourceModelType(Enum):
    """The subset of ``qai_hub.SourceModelType`` the double produces."""

    ONNX = 5
    TFLITE = 3
    QNN_CONTEXT_BINARY = 10
    QNN_DLC = 12


class JobType(Enum):
    """As ``qai_hub.JobType``."""

    COMPILE = 1
    INFERENCE = 4
    PROFILE = 4
    QUANTIZE = 5
    LINK = 6
    UNSPECIFIED = 0

    @property
    def display_name(self) -> str:
        return self.name.lower()


@dataclass(unsafe_hash=True)
class JobStatus:
    """As ``qai_hub.JobStatus``: ``state``, ``message`` and the derived flags."""

    class State(Enum):
        SUCCESS = 4
        FAILED = 5
        CREATED = 1
        UNSPECIFIED = 0
        OPTIMIZING_MODEL = 2
        PROVISIONING_DEVICE = 7
        MEASURING_PERFORMANCE = 3
        RUNNING_INFERENCE = 6
        QUANTIZING_MODEL = 8
        LINKING_MODELS = 9

    state: JobStatus.State
    message: str | None = None

    @property
    def code(self) -> str:
        return self.state.name

    @property
    def success(self) -> bool:
        return self.state == JobStatus.State.SUCCESS

    @property
    def failure(self) -> bool:
        return self.state == JobStatus.State.FAILED

    @property
    def finished(self) -> bool:
        return self.state in (JobStatus.State.SUCCESS, JobStatus.State.FAILED)

    @property
    def pending(self) -> bool:
        return self.state == JobStatus.State.CREATED

    @property
    def running(self) -> bool:
        return not self.finished and not self.pending


# --- models, datasets, jobs ---------------------------------------------------------


class Model:
    """As ``qai_hub.Model`` (``model_id``, ``name``, ``model_type``, ``download``)."""

    def __init__(self, owner: Client, record: dict[str, Any]) -> None:
        self._owner = owner
        self.model_id: str = record["id"]
        self.name: str = record["name"]
        self.date = datetime.fromtimestamp(record["created_at"])
        self.model_type = SourceModelType[record["model_type"]]

    def download(self, filename: str, timeout: int | None = None) -> str:
        """Write the model to ``filename`` (the right extension added)."""
        record = _state.load("models", self.model_id)
        assert record is not None
        ext = _EXTENSIONS.get(_state.lineage(record).get("runtime", "onnx"), ".onnx")
        path = filename if filename.endswith(ext) else filename + ext
        Path(path).write_bytes(_state.target_bytes(record))
        return path


class Dataset:
    """As ``qai_hub.Dataset`` (``dataset_id``, ``download``)."""

    def __init__(self, dataset_id: str, entries: dict[str, list[np.ndarray]]) -> None:
        self.dataset_id = dataset_id
        self._entries = entries

    def download(self, filename: str | None = None) -> dict[str, list[np.ndarray]] | str:
        """The entries (files are not supported by the double)."""
        if filename is not None:
            raise UserError("the test double keeps datasets in memory only")
        return self._entries


class Job:
    """As ``qai_hub.Job``: id, name, status, wait."""

    _job_type = JobType.UNSPECIFIED

    def __init__(self, owner: Client, record: dict[str, Any]) -> None:
        self._owner = owner
        self._record = record
        self.job_id: str = record["id"]
        self.name: str = record["name"]
        self.date = datetime.fromtimestamp(record["created_at"])
        self.hub_version: str = record["hub_version"]
        self.options: str = record["options"]
        self.verbose = False

    @property
    def url(self) -> str:
        return f"https://workbench.aihub.qualcomm.com/jobs/{self.job_id}/"

    @property
    def job_type(self) -> str:
        return self._job_type.display_name

    def get_status(self) -> JobStatus:
        state, message = _state.job_state(self._record)
        return JobStatus(JobStatus.State[state], message)

    def wait(self, timeout: int | None = None) -> JobStatus:
        started = time.monotonic()
        while not (status := self.get_status()).finished:
            if timeout and time.monotonic() - started > timeout:
                raise TimeoutError(f"Waiting for job ({self.job_id}) timed out")
            time.sleep(0.05)
        return status

    def _target(self) -> Model | None:
        if not self.wait().success:
            return None
        return self._owner.get_model(self._record["target_model_id"])


class JobSummary:
    """As ``qai_hub.JobSummary``: id, name, date and status of a job."""

    def __init__(self, owner: Client, record: dict[str, Any]) -> None:
        self.job_id: str = record["id"]
        self.name: str = record["name"]
        self.date = datetime.fromtimestamp(record["created_at"])
        state, message = _state.job_state(record)
        self.status = JobStatus(JobStatus.State[state], message)


class CompileJob(Job):
    """As ``qai_hub.CompileJob``."""

    _job_type = JobType.COMPILE

    def __init__(self, owner: Client, record: dict[str, Any]) -> None:
        super().__init__(owner, record)
        self.device = Device(**record["device"])
        self.model = owner.get_model(record["model_id"])

    def get_target_model(self) -> Model | None:
        return self._target()

    def download_target_model(self, filename: str) -> str | None:
        target = self.get_target_model()
        return None if target is None else target.download(filename)


class QuantizeJob(Job):
    """As ``qai_hub.QuantizeJob``."""

    _job_type = JobType.QUANTIZE

    def __init__(self, owner: Client, record: dict[str, Any]) -> None:
        super().__init__(owner, record)
        self.model = owner.get_model(record["model_id"])
        self.weights_dtype = QuantizeDtype[record["weights"]]
        self.activations_dtype = QuantizeDtype[record["activations"]]

    def get_target_model(self) -> Model | None:
        return self._target()


class InferenceJob(Job):
    """As ``qai_hub.InferenceJob`` (profile and inference jobs alike)."""

    _job_type = JobType.INFERENCE

    def __init__(self, owner: Client, record: dict[str, Any]) -> None:
        super().__init__(owner, record)
        self.device = Device(**record["device"])
        self.model = owner.get_model(record["model_id"])
        self.profiling = bool(record["profile"])

    def download_profile(self, filename: str | None = None) -> dict[str, Any] | str:
        """The profile dict (``{}`` for a failed or non-profiling job)."""
        if not self.wait().success or not self.profiling:
            return {}
        profile = _state.profile(self._record)
        if filename is not None:
            raise UserError("the test double returns profiles in memory only")
        return profile

    def download_output_data(
        self, filename: str | None = None
    ) -> dict[str, list[np.ndarray]] | str | None:
        """The outputs for the job's inputs (None without inputs or on failure)."""
        dataset = self.get_output_dataset()
        return None if dataset is None else dataset.download(filename)

    def get_output_dataset(self) -> Dataset | None:
        if not self.wait().success or not self._record.get("dataset_id"):
            return None
        entries = self._owner._dataset_entries(self._record["dataset_id"])
        model = _state.load("models", self._record["model_id"])
        assert model is not None
        return Dataset(_state.new_id("d"), _state.run_model(model, entries))


ProfileJob = InferenceJob


# --- the client ---------------------------------------------------------------------


class Client:
    """As ``qai_hub.Client``; configured with a ``ClientConfig`` or a profile name."""

    def __init__(
        self,
        config: ClientConfig | None = None,
        profile: str | None = None,
        default_project_id: str | None = None,
        client_mode: str = "library",
    ) -> None:
        if config and profile:
            raise ValueError("Specify either config or profile, not both")
        self._config = config
        if profile:
            self._config = _config_from_file(Path(f"~/.qai_hub/{profile}.ini").expanduser())

    @property
    def config(self) -> ClientConfig:
        if self._config is None:
            default = os.environ.get("QAIHUB_CLIENT_INI", "~/.qai_hub/client.ini")
            self._config = _config_from_file(Path(default).expanduser())
        return self._config

    def set_verbose(self, verbose: bool = True) -> None:
        self.config.verbose = verbose

    def get_devices(
        self, name: str = "", os: str = "", attributes: str | list[str] | None = None
    ) -> list[Device]:
        _ = self.config
        wanted = [attributes] if isinstance(attributes, str) else list(attributes or [])
        found = []
        for device in _state.config().get("devices", _state.DEFAULT_DEVICES):
            if name and device["name"] != name:
                continue
            if os and not _os_matches(device["os"], os):
                continue
            if any(a not in device["attributes"] for a in wanted):
                continue
            found.append(Device(device["name"], device["os"], list(device["attributes"])))
        return found

    def upload_model(self, model: Any, name: str | None = None, project: Any = None) -> Model:
        _ = self.config
        path = Path(str(model))
        if path.suffix != ".onnx" or not path.is_file():
            raise UserError(f"the test double uploads ONNX files only, not {model!r}")
        record = {
            "id": _state.new_id("m"),
            "name": name or path.name,
            "created_at": time.time(),
            "model_type": "ONNX",
            "source": None,
        }
        (_state.state_dir() / "models" / f"{record['id']}.onnx").write_bytes(path.read_bytes())
        _state.save("models", record)
        return Model(self, record)

    def get_model(self, model_id: str) -> Model:
        record = _state.load("models", model_id)
        if record is None:
            raise UserError(f"Model ID '{model_id}' could not be found.")
        return Model(self, record)

    def get_job_summaries(
        self,
        offset: int = 0,
        limit: int = 50,
        creator: str | None = None,
        state: Any = None,
        type: JobType | None = None,
        project: Any = None,
    ) -> list[JobSummary]:
        """As ``Client.get_job_summaries``: the newest jobs first."""
        records = sorted(
            _state.jobs(_state.state_dir()), key=lambda r: r["created_at"], reverse=True
        )
        return [JobSummary(self, r) for r in records[offset : offset + limit]]

    def get_job(self, job_id: str, job_type: JobType | None = None) -> Job:
        record = _state.load("jobs", job_id)
        if record is None:
            raise UserError(f"Job ID '{job_id}' could not be found.")
        cls = {"compile": CompileJob, "quantize": QuantizeJob, "inference": InferenceJob}
        job: Job = cls[record["type"]](self, record)
        return job

    def upload_dataset(self, data: Any, name: str | None = None, project: Any = None) -> Dataset:
        dataset_id = _state.new_id("d")
        entries = {str(k): [np.asarray(x) for x in v] for k, v in data.items()}
        if len({len(v) for v in entries.values()}) > 1:
            raise UserError("All features must have the same number of samples.")
        arrays = {f"{i}": np.stack(v) for i, v in enumerate(entries.values())}
        path = _state.state_dir() / "datasets" / f"{dataset_id}.npz"
        np.savez(path, names=np.array(list(entries)), **arrays)
        return Dataset(dataset_id, entries)

    def _dataset_entries(self, dataset_id: str) -> dict[str, list[np.ndarray]]:
        path = _state.state_dir() / "datasets" / f"{dataset_id}.npz"
        with np.load(path, allow_pickle=False) as npz:
            names = [str(n) for n in npz["names"]]
            return {n: list(npz[f"{i}"]) for i, n in enumerate(names)}

    def submit_compile_job(
        self,
        model: Any,
        device: Device | list[Device],
        name: str | None = None,
        input_specs: dict[str, Any] | None = None,
        options: str = "",
        single_compile: bool = True,
        calibration_data: Any = None,
        retry: bool = True,
        project: Any = None,
    ) -> CompileJob:
        source = self._model(model)
        dev = self._device(device)
        runtime = _state.option(options, "target_runtime") or "tflite"
        failure = self._compile_problem(source, input_specs, runtime)
        self._admit(retry)
        target = {
            "id": _state.new_id("m"),
            "name": f"{source.name}_{runtime}",
            "created_at": time.time(),
            "model_type": _model_type(runtime),
            "source": source.model_id,
            "runtime": runtime,
            "float16": _state.option(options, "quantize_full_type") == "float16",
        }
        _state.save("models", target)
        record = self._job("compile", name or source.name, dev, source, options, failure)
        record["target_model_id"] = target["id"]
        _state.save("jobs", record)
        return CompileJob(self, record)

    def submit_quantize_job(
        self,
        model: Any,
        calibration_data: Any,
        weights_dtype: QuantizeDtype = QuantizeDtype.INT8,
        activations_dtype: QuantizeDtype = QuantizeDtype.INT8,
        name: str | None = None,
        options: str = "",
        project: Any = None,
    ) -> QuantizeJob:
        if weights_dtype != QuantizeDtype.INT8 and activations_dtype not in (
            QuantizeDtype.INT8,
            QuantizeDtype.INT16,
        ):
            raise ValueError("Weights must be INT8 and activations must be INT8 or INT16.")
        source = self._model(model)
        dataset = self.upload_dataset(calibration_data)
        expected = [n for n, _ in _state.onnx_inputs(_state.onnx_path(self._record(source)))]
        failure = None
        if list(calibration_data) != expected:
            failure = (
                f"Calibration data names {list(calibration_data)} do not match the model "
                f"inputs {expected}."
            )
        self._admit(retry=False)  # the real client does not retry quantize submissions
        target = {
            "id": _state.new_id("m"),
            "name": f"{source.name}_quantized",
            "created_at": time.time(),
            "model_type": "ONNX",
            "source": source.model_id,
            "weights": weights_dtype.name,
            "activations": activations_dtype.name,
        }
        _state.save("models", target)
        record = self._job("quantize", name or source.name, None, source, options, failure)
        record.update(
            target_model_id=target["id"],
            weights=weights_dtype.name,
            activations=activations_dtype.name,
            dataset_id=dataset.dataset_id,
        )
        _state.save("jobs", record)
        return QuantizeJob(self, record)

    def submit_inference_job(
        self,
        model: Any,
        device: Device | list[Device],
        inputs: Any = None,
        name: str | None = None,
        options: str = "",
        retry: bool = True,
        profile: bool = True,
        project: Any = None,
    ) -> InferenceJob:
        if inputs is None and not profile:
            raise UserError(
                "Inference requires inputs. Either supply `inputs`, or set `profile=True`"
                " to run with random data."
            )
        source = self._model(model)
        if self._record(source).get("runtime") is None:
            raise UserError(
                "Inference cannot be run on the supplied model type until is has been compiled."
            )
        dev = self._device(device)
        dataset = self.upload_dataset(inputs) if inputs is not None else None
        self._admit(retry)
        record = self._job("inference", name or source.name, dev, source, options, None)
        record.update(profile=bool(profile), dataset_id=dataset.dataset_id if dataset else None)
        _state.save("jobs", record)
        return InferenceJob(self, record)

    def submit_profile_job(
        self,
        model: Any,
        device: Device | list[Device],
        name: str | None = None,
        options: str = "",
        retry: bool = True,
        project: Any = None,
    ) -> InferenceJob:
        """Deprecated in 0.56, as in the real client: an inference job with profiling."""
        print("submit_profile_job is deprecated; use submit_inference_job(..., profile=True).")
        return self.submit_inference_job(
            model, device, inputs=None, name=name, options=options, retry=retry, profile=True
        )

    # ----- helpers ------------------------------------------------------------------

    def _model(self, model: Any) -> Model:
        _ = self.config
        if isinstance(model, Model):
            return model
        return self.upload_model(model)

    @staticmethod
    def _record(model: Model) -> dict[str, Any]:
        record = _state.load("models", model.model_id)
        assert record is not None
        return record

    def _device(self, device: Device | list[Device]) -> dict[str, Any]:
        if isinstance(device, list):
            if len(device) != 1:
                raise UserError("the test double submits to one device at a time")
            device = device[0]
        listed = self.get_devices(device.name, device.os)
        if not listed:
            raise UserError(f"Device {device.name!r} (os {device.os!r}) not found.")
        return {"name": listed[0].name, "os": listed[0].os, "attributes": listed[0].attributes}

    def _compile_problem(
        self, model: Model, input_specs: dict[str, Any] | None, runtime: str
    ) -> str | None:
        if runtime not in _RUNTIMES:
            return f"Unsupported target runtime '{runtime}'."
        declared = _state.onnx_inputs(_state.onnx_path(self._record(model)))
        for name, dims in declared:
            spec = (input_specs or {}).get(name)
            shape = spec[0] if spec and isinstance(spec[0], tuple | list) else spec
            if shape is None and any(d is None for d in dims):
                return f"Input '{name}' has a dynamic shape; specify input_specs."
            if shape is not None and len(shape) != len(dims):
                return f"Input '{name}' expects rank {len(dims)}, got shape {tuple(shape)}."
        return None

    def _admit(self, retry: bool) -> None:
        """Rate limiting as configured: raise, or (retry=True) wait it out like the client."""
        while _state.count_submission():
            if not retry:
                raise RateLimitedError("Too many requests. Please try again later.")
            time.sleep(0.01)

    def _job(
        self,
        kind: str,
        name: str,
        device: dict[str, Any] | None,
        model: Model,
        options: str,
        failure: str | None,
    ) -> dict[str, Any]:
        settings = _state.config()
        configured = (settings.get("fail") or {}).get(kind)
        return {
            "id": _state.new_id("j"),
            "type": kind,
            "name": name,
            "device": device,
            "model_id": model.model_id,
            "options": options.strip(),
            "created_at": time.time(),
            "duration_s": float(settings.get("job_seconds", 0.0)),
            "fail_message": failure or configured,
            "hub_version": settings.get("hub_version", "aihub-2026.11.0"),
            "profile": False,
        }


def _model_type(runtime: str) -> str:
    return {
        "qnn_context_binary": "QNN_CONTEXT_BINARY",
        "qnn_dlc": "QNN_DLC",
        "tflite": "TFLITE",
    }.get(runtime, "ONNX")


def _os_matches(have: str, wanted: str) -> bool:
    if not wanted.startswith("["):
        return have == wanted
    low, _, high = wanted.strip("[)").partition(",")
    major = float(have.split(".")[0])
    return (not low or major >= float(low)) and (not high or major < float(high))


def _config_from_file(path: Path) -> ClientConfig:
    if not path.is_file():
        raise UserError(f"Failed to load client configuration file. {path} not found.")
    parser = configparser.ConfigParser()
    parser.read(path)
    try:
        return ClientConfig(api_token=parser["api"]["api_token"])
    except KeyError:
        raise UserError("Failed to load configuration file. Your API token is missing.") from None


__all__ = [
    "Client",
    "ClientConfig",
    "CompileJob",
    "Dataset",
    "Device",
    "Error",
    "InferenceJob",
    "InternalError",
    "Job",
    "JobStatus",
    "JobSummary",
    "JobType",
    "Model",
    "ProfileJob",
    "QuantizeDtype",
    "QuantizeJob",
    "SourceModelType",
    "UserError",
]
