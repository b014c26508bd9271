"""OpenVINO / NNCF conversion schemes and IR packing, on a small random-weight MLP whose
first layer (96 wide) no group size of 64 divides."""

from __future__ import annotations

import io
import itertools
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.backends.openvino import IR_BIN_NAME, IR_XML_NAME, pack_ir, unpack_ir
from coordinator.conversion.openvino_schemes import OPENVINO_SCHEMES, convert_openvino
from coordinator.models.digits import export_mlp_onnx
from edgefarm.errors import ModelLoadError, UnsupportedScheme, UsageError

pytest.importorskip("openvino", reason="openvino is not installed (the openvino extra)")
pytest.importorskip("nncf", reason="nncf is not installed (the openvino extra)")

WIDTHS = (96, 64, 64, 10)  # 96 is not a multiple of the default group size 64


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray], np.ndarray]:
    """The ONNX model (named as the coordinator names its source), its weights and inputs."""
    rng = np.random.default_rng(7)
    weights = [
        rng.standard_normal((a, b)).astype(np.float32) / np.sqrt(a)
        for a, b in itertools.pairwise(WIDTHS)
    ]
    biases = [np.zeros(b, np.float32) for b in WIDTHS[1:]]
    path = tmp_path_factory.mktemp("mlp") / "src.onnx"
    export_mlp_onnx(weights, biases, path)
    inputs = rng.random((64, WIDTHS[0])).astype(np.float32)
    return path, weights, inputs


def forward(weights: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    for i, w in enumerate(weights):
        x = x @ w
        if i < len(weights) - 1:
            x = np.maximum(x, 0)
    return x


def run_ir(xml: Path, x: np.ndarray) -> np.ndarray:
    import openvino as ov

    compiled = ov.Core().compile_model(
        str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1}
    )
    return np.asarray(compiled(x)[0])


def convert(
    mlp: tuple[Path, list[np.ndarray], np.ndarray],
    out: Path,
    scheme: str,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    src, _, inputs = mlp
    return convert_openvino(src, out / "model.xml", scheme, inputs, params)


@pytest.fixture(scope="module")
def converted(
    mlp: tuple[Path, list[np.ndarray], np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, dict[str, Any]]]:
    out = tmp_path_factory.mktemp("schemes")
    return {s: (out / s / "model.xml", convert(mlp, out / s, s)) for s in OPENVINO_SCHEMES}


EXPECTED_STORAGE = {
    "fp32": {"f32": 3},
    "fp16": {"f16": 3},
    "int8-weights": {"u8": 3},
    # fc0 is 96 wide: the group size is adjusted to 32; the head stays INT8 (NNCF default).
    "int4-sym": {"i4/g32": 1, "i4/g64": 1, "u8": 1},
    "int4-asym": {"u4/g32": 1, "u4/g64": 1, "u8": 1},
    "int8-ptq": {"i8": 3},
}


@pytest.mark.parametrize("scheme", OPENVINO_SCHEMES)
def test_scheme_provenance_and_outputs(
    scheme: str,
    converted: dict[str, tuple[Path, dict[str, Any]]],
    mlp: tuple[Path, list[np.ndarray], np.ndarray],
) -> None:
    xml, provenance = converted[scheme]
    assert provenance["scheme"] == scheme
    assert provenance["tool"] == "openvino"
    assert provenance["tool_version"].startswith("20")
    assert provenance["nncf_version"][0].isdigit()
    assert provenance["weight_storage"] == EXPECTED_STORAGE[scheme]
    assert provenance["op_types"]["MatMul"] == 3
    sizes = xml.stat().st_size, xml.with_suffix(".bin").stat().st_size
    assert (provenance["xml_bytes"], provenance["bin_bytes"]) == sizes
    assert provenance["size_bytes"] == sum(sizes)

    _, weights, inputs = mlp
    expected = forward(weights, inputs)
    got = run_ir(xml, inputs)
    error = float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))
    print(f"{scheme}: max error {error:.4f} of the largest output")
    bound = {"fp32": 1e-5, "fp16": 5e-3, "int8-weights": 0.05, "int8-ptq": 0.25}.get(scheme, 0.4)
    assert error < bound
    if scheme != "fp32":
        assert error > 0  # the weights really changed
    agreement = np.mean(np.argmax(got, 1) == np.argmax(expected, 1))
    assert agreement >= (1.0 if scheme in ("fp32", "fp16") else 0.6)


def test_ptq_records_its_calibration(converted: dict[str, tuple[Path, dict[str, Any]]]) -> None:
    provenance = converted["int8-ptq"][1]
    assert provenance["op_types"]["FakeQuantize"] == 3
    assert provenance["calibration_examples"] == 64
    assert provenance["calibration_examples_used"] == 64
    assert provenance["parameters"]["preset"] == "performance"


def test_sizes_shrink_with_bits(converted: dict[str, tuple[Path, dict[str, Any]]]) -> None:
    size = {s: p["bin_bytes"] for s, (_, p) in converted.items()}
    assert size["fp16"] < 0.55 * size["fp32"]
    assert size["int8-weights"] < 0.35 * size["fp32"]
    assert size["int4-sym"] < size["int8-weights"]


def test_group_size_fallback_modes(
    mlp: tuple[Path, list[np.ndarray], np.ndarray], tmp_path: Path
) -> None:
    with pytest.raises(UsageError, match="group_size 64 does not fit") as err:
        convert(mlp, tmp_path / "e", "int4-sym", {"group_size_fallback": "error"})
    assert "fc0_matmul" in str(err.value)
    ignored = convert(mlp, tmp_path / "i", "int4-sym", {"group_size_fallback": "ignore"})
    assert ignored["weight_storage"] == {"f32": 1, "i4/g64": 1, "u8": 1}
    every = convert(mlp, tmp_path / "a", "int4-sym", {"all_layers": True, "group_size": 32})
    assert every["weight_storage"] == {"i4/g32": 3}
    assert every["parameters"]["group_size"] == 32


@pytest.mark.parametrize(
    ("scheme", "params", "message"),
    [
        ("int4-sym", {"block_size": 32}, "unknown parameter"),
        ("int4-sym", {"group_size": 0}, "group_size must be"),
        ("int4-asym", {"ratio": 1.5}, "ratio must be"),
        ("int4-asym", {"group_size_fallback": "guess"}, "unknown group_size_fallback"),
        ("int8-ptq", {"preset": "fastest"}, "unknown preset"),
        ("fp32", {"group_size": 64}, "allowed: none"),
    ],
)
def test_bad_parameters(
    scheme: str, params: dict[str, Any], message: str, tmp_path: Path, mlp: Any
) -> None:
    with pytest.raises(UsageError, match=message):
        convert(mlp, tmp_path, scheme, params)


def test_unknown_scheme_missing_source_and_missing_calibration(
    mlp: tuple[Path, list[np.ndarray], np.ndarray], tmp_path: Path
) -> None:
    src = mlp[0]
    with pytest.raises(UnsupportedScheme, match="unknown OpenVINO scheme 'int3'"):
        convert_openvino(src, tmp_path / "m.xml", "int3", None, None)
    with pytest.raises(UsageError, match="source model not found"):
        convert_openvino(tmp_path / "none.onnx", tmp_path / "m.xml", "fp32", None, None)
    for calibration in (None, np.zeros((0, WIDTHS[0]), np.float32)):
        with pytest.raises(UsageError, match="int8-ptq needs calibration inputs"):
            convert_openvino(src, tmp_path / "m.xml", "int8-ptq", calibration, None)


@pytest.mark.parametrize("scheme", ["int8-ptq", "int4-asym"])
def test_converting_again_gives_the_same_bytes(
    scheme: str,
    mlp: tuple[Path, list[np.ndarray], np.ndarray],
    converted: dict[str, tuple[Path, dict[str, Any]]],
    tmp_path: Path,
) -> None:
    xml, provenance = converted[scheme]
    again = tmp_path / "again" / "model.xml"
    # Same process: OpenVINO's name counter has moved on, the names must not show it.
    convert_openvino(mlp[0], again, scheme, mlp[2], None)
    assert pack_ir(again) == pack_ir(xml)  # same model and scheme: same artifact hash
    assert provenance["renumbered_auto_names"] > 0
    text = xml.read_text()
    assert 'name="fc0_matmul"' in text and 'name="fc1_relu"' in text  # the source's names


def test_packing_is_deterministic_and_round_trips(
    converted: dict[str, tuple[Path, dict[str, Any]]], tmp_path: Path
) -> None:
    xml, _ = converted["int4-asym"]
    data = pack_ir(xml)
    assert pack_ir(xml) == data

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [IR_BIN_NAME, IR_XML_NAME]
    assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o644 for m in members)
    files = xml.stat().st_size + xml.with_suffix(".bin").stat().st_size
    assert files < len(data) <= files + 2560  # headers and end blocks, no 10 KiB padding

    out = unpack_ir(data, tmp_path / "unpacked")
    assert out.read_bytes() == xml.read_bytes()
    assert out.with_suffix(".bin").read_bytes() == xml.with_suffix(".bin").read_bytes()


def test_pack_and_unpack_refuse_broken_input(tmp_path: Path) -> None:
    lone = tmp_path / "lone.xml"
    lone.write_text("<net/>")
    with pytest.raises(UsageError, match="IR file not found"):
        pack_ir(lone)
    with pytest.raises(ModelLoadError, match="not a valid OpenVINO IR tar"):
        unpack_ir(b"\x00garbage" * 100, tmp_path / "x")
