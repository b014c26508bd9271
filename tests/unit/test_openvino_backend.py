"""The OpenVINO backend on the real digits classifier: every scheme measured through the
runner (a child process per trial), accuracy against the FP32 ONNX model, the precision
OpenVINO actually ran with, and broken IRs."""

from __future__ import annotations

import asyncio
import importlib.metadata
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from agent.backends.openvino import OpenVinoBackend, pack_ir
from agent.probe import openvino_devices
from agent.runner import TrialsReport, run_measurement
from coordinator.conversion.openvino_schemes import OPENVINO_SCHEMES, convert_openvino
from coordinator.models import load_calibration_inputs
from coordinator.models.digits import DigitsBundle, build_digits_model
from edgefarm.domain import MeasureSettings
from edgefarm.errors import BackendUnavailable, ModelLoadError, TaskError

pytest.importorskip("openvino", reason="openvino is not installed (the openvino extra)")
pytest.importorskip("nncf", reason="nncf is not installed (the openvino extra)")

SETTINGS = MeasureSettings(
    max_other_cpu_cores=0.0,  # record only: these tests are not about the busy-host guard
    warmup_iterations=5,
    min_iterations=50,
    min_duration_s=0.05,
    max_duration_s=10.0,
    trials=1,
    threads=1,
    timeout_s=60.0,
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> DigitsBundle:
    return build_digits_model(tmp_path_factory.mktemp("digits"), seed=0)


@pytest.fixture(scope="module")
def tars(bundle: DigitsBundle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each scheme's IR, packed as the artifact store holds it."""
    out = tmp_path_factory.mktemp("ir")
    calibration = load_calibration_inputs(bundle.calibration_path)
    found = {}
    for scheme in OPENVINO_SCHEMES:
        xml = out / scheme / "model.xml"
        convert_openvino(bundle.model_path, xml, scheme, calibration, None)
        tar = out / f"{scheme}.tar"
        tar.write_bytes(pack_ir(xml))
        found[scheme] = tar
    return found


def measure(
    tar: Path, eval_path: Path | None, options: dict[str, str] | None = None
) -> TrialsReport:
    return asyncio.run(run_measurement("openvino", "any", tar, eval_path, SETTINGS, options or {}))


@pytest.fixture(scope="module")
def reports(tars: dict[str, Path], bundle: DigitsBundle) -> dict[str, TrialsReport]:
    return {scheme: measure(tar, bundle.eval_path) for scheme, tar in tars.items()}


@pytest.mark.parametrize("scheme", OPENVINO_SCHEMES)
def test_every_scheme_measures_valid_and_accurate(
    scheme: str, reports: dict[str, TrialsReport], bundle: DigitsBundle
) -> None:
    report = reports[scheme]
    (trial,) = report.trials
    assert trial.valid, trial.invalid_reason
    assert len(trial.samples_ms) >= SETTINGS.min_iterations
    assert all(s > 0 for s in trial.samples_ms)
    assert trial.load_time_s > 0
    accuracy = report.accuracy
    assert accuracy["examples"] == bundle.test_examples
    assert accuracy["reference_top1"] == pytest.approx(bundle.onnx_test_accuracy)
    if scheme in ("fp32", "fp16"):
        # f32 inference of the same (or f16-stored) weights: the same predictions.
        assert accuracy["top1"] == pytest.approx(bundle.onnx_test_accuracy)
        assert accuracy["agreement"] == 1.0
        assert accuracy["max_abs_diff"] < (1e-4 if scheme == "fp32" else 0.05)
    else:
        assert abs(accuracy["top1"] - bundle.onnx_test_accuracy) <= 0.02
        assert accuracy["agreement"] >= 0.98
        assert accuracy["max_abs_diff"] > 0  # really quantized


def test_environment_records_what_openvino_ran_with(reports: dict[str, TrialsReport]) -> None:
    env = reports["fp32"].environment
    assert reports["fp32"].backend_version.startswith(importlib.metadata.version("openvino"))
    assert env["openvino.version"] == reports["fp32"].backend_version
    assert env["openvino.device"] == "CPU"
    assert env["openvino.full_device_name"]
    assert env["openvino.inference_precision_requested"] == "f32"
    assert env["openvino.inference_precision"] == "f32"  # read back from the compiled model
    assert env["openvino.performance_hint"] == "LATENCY"
    assert env["openvino.inference_num_threads"] == str(SETTINGS.threads)
    assert int(env["openvino.num_streams"]) >= 1


def test_quantized_irs_are_smaller(reports: dict[str, TrialsReport]) -> None:
    size = {scheme: report.model_size_bytes for scheme, report in reports.items()}
    assert size["fp16"] < 0.6 * size["fp32"]
    for scheme in ("int8-weights", "int8-ptq"):
        assert size[scheme] < 0.4 * size["fp32"]
    for scheme in ("int4-sym", "int4-asym"):
        assert size[scheme] < size["int8-weights"]


def test_bf16_when_asked_and_auto_is_recorded(tars: dict[str, Path]) -> None:
    import openvino as ov

    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16 support (OPTIMIZATION_CAPABILITIES lacks BF16)")
    bf16 = measure(tars["fp32"], None, {"inference_precision": "bf16"}).environment
    assert bf16["openvino.inference_precision"] == "bf16"
    auto = measure(tars["fp32"], None, {"inference_precision": "auto"}).environment
    assert auto["openvino.inference_precision_requested"] == "auto"
    assert auto["openvino.inference_precision"] in ("bf16", "f16", "f32")


def test_corrupt_ir_fails_with_model_load_error_across_the_process(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(ModelLoadError, match="not a valid OpenVINO IR tar"):
        measure(bad, None)


def _tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _load(path: Path, options: dict[str, str] | None = None) -> OpenVinoBackend:
    backend = OpenVinoBackend()
    backend.load(path, SETTINGS, options or {})
    return backend


@pytest.mark.parametrize(
    "members",
    [
        {"model.xml": b"<net/>"},
        {"model.xml": b"<net/>", "model.bin": b"", "extra.bin": b""},
        {"../model.xml": b"<net/>", "model.bin": b""},
    ],
    ids=["no-bin", "three-files", "path-outside"],
)
def test_tar_without_exactly_one_xml_and_bin_is_refused(
    members: dict[str, bytes], tmp_path: Path
) -> None:
    path = tmp_path / "ir.tar"
    path.write_bytes(_tar(members))
    with pytest.raises(ModelLoadError, match=r"expected exactly one \.xml and one \.bin"):
        _load(path)


def test_broken_ir_content_and_truncated_tar(tars: dict[str, Path], tmp_path: Path) -> None:
    data = tars["fp32"].read_bytes()
    with tarfile.open(tars["fp32"]) as tar:
        weights = tar.extractfile("model.bin").read()  # type: ignore[union-attr]
    garbled = tmp_path / "garbled.tar"
    garbled.write_bytes(_tar({"model.xml": b"<net><layers><oops", "model.bin": weights}))
    with pytest.raises(ModelLoadError, match=r"openvino could not load garbled\.tar") as err:
        _load(garbled)
    assert "\n" not in str(err.value)
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError):
        _load(truncated)


def test_bad_options(tars: dict[str, Path]) -> None:
    with pytest.raises(TaskError, match="unknown openvino option"):
        _load(tars["fp32"], {"precision": "f32"})
    with pytest.raises(TaskError, match="inference_precision"):
        _load(tars["fp32"], {"inference_precision": "int3"})
    with pytest.raises(TaskError, match="performance_hint"):
        _load(tars["fp32"], {"performance_hint": "FASTEST"})
    if "NPU" not in openvino_devices():
        with pytest.raises(BackendUnavailable, match="device 'NPU' is not available"):
            _load(tars["fp32"], {"device": "NPU"})


def test_throughput_hint_is_read_back(tars: dict[str, Path]) -> None:
    backend = _load(tars["int8-ptq"], {"performance_hint": "throughput"})
    env = backend.environment()
    assert env["openvino.performance_hint"] == "THROUGHPUT"
    assert env["openvino.inference_num_threads"] == str(SETTINGS.threads)


def test_devices_are_listed_and_listing_backends_imports_no_openvino() -> None:
    assert "CPU" in openvino_devices()
    code = (
        "import sys; from agent.backends import installed_backends; "
        "found = installed_backends(); "
        "assert 'openvino' in found, found; assert 'openvino' not in sys.modules; "
        "print(found['openvino'])"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == importlib.metadata.version("openvino")
