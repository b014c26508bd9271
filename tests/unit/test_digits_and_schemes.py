"""The digits model builder and the five ONNX quantization schemes, on the real model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from agent.accuracy import classification_accuracy
from agent.evaldata import EvalData, load_eval_data
from coordinator.conversion.onnx_schemes import (
    ONNX_SCHEMES,
    op_type_counts,
    quantize_matmul_4bits_native,
    quantize_onnx,
)
from coordinator.models import load_calibration_inputs
from coordinator.models.digits import (
    DigitsBundle,
    TrainedDigits,
    build_digits_model,
    onnx_outputs,
    train_digits_mlp,
)
from edgefarm.errors import UnsupportedScheme, UsageError


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> DigitsBundle:
    return build_digits_model(tmp_path_factory.mktemp("digits"), seed=0)


@pytest.fixture(scope="module")
def trained() -> TrainedDigits:
    return train_digits_mlp(seed=0)


@pytest.fixture(scope="module")
def eval_data(bundle: DigitsBundle) -> EvalData:
    return load_eval_data(bundle.eval_path)


@pytest.fixture(scope="module")
def variants(
    bundle: DigitsBundle, eval_data: EvalData, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, dict[str, Any], dict[str, float]]]:
    """Each scheme's model, provenance and measured accuracy on the eval set."""
    out = tmp_path_factory.mktemp("variants")
    calibration = load_calibration_inputs(bundle.calibration_path)
    found = {}
    for scheme in ONNX_SCHEMES:
        dst = out / f"{scheme}.onnx"
        provenance = quantize_onnx(bundle.model_path, dst, scheme, calibration)
        outputs = onnx_outputs(dst, eval_data.inputs)
        accuracy = classification_accuracy(outputs, eval_data.labels, eval_data.reference)
        print(scheme, {k: round(v, 5) for k, v in accuracy.items()}, provenance["size_bytes"])
        found[scheme] = (dst, provenance, accuracy)
    return found


def test_onnx_model_matches_sklearn(
    bundle: DigitsBundle, trained: TrainedDigits, eval_data: EvalData
) -> None:
    np.testing.assert_array_equal(eval_data.inputs, trained.x_test)  # same seed, same split
    np.testing.assert_array_equal(eval_data.labels, trained.y_test)
    logits = onnx_outputs(bundle.model_path, eval_data.inputs)
    np.testing.assert_array_equal(logits, eval_data.reference)
    clf = trained.classifier
    np.testing.assert_array_equal(np.argmax(logits, axis=1), clf.predict(trained.x_test))
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(
        exp / exp.sum(axis=1, keepdims=True), clf.predict_proba(trained.x_test), atol=1e-5
    )

    top1 = float(np.mean(np.argmax(logits, axis=1) == eval_data.labels))
    print("digits test accuracy (ONNX FP32):", top1, "sklearn:", bundle.sklearn_test_accuracy)
    assert top1 > 0.9
    assert top1 == pytest.approx(bundle.onnx_test_accuracy)
    assert bundle.sklearn_test_accuracy == pytest.approx(top1)


def test_split_and_calibration(bundle: DigitsBundle, trained: TrainedDigits) -> None:
    assert bundle.test_examples == 540 and bundle.train_examples == 1257  # 30 % of 1797
    counts = np.bincount(trained.y_test)
    assert counts.min() >= 50  # stratified: every class well represented
    calibration = load_calibration_inputs(bundle.calibration_path)
    assert len(calibration) == bundle.calibration_examples > 0
    train_rows = {row.tobytes() for row in trained.x_train}
    test_rows = {row.tobytes() for row in trained.x_test} - train_rows
    assert all(row.tobytes() in train_rows for row in calibration)
    assert not any(row.tobytes() in test_rows for row in calibration)


def test_graph_shape(bundle: DigitsBundle) -> None:
    model = onnx.load(str(bundle.model_path))
    ops = op_type_counts(model)
    assert ops == {"Add": 3, "MatMul": 3, "Relu": 2}  # no Gemm
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert (inp.name, out.name) == ("input", "logits")
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # dynamic batch
    assert dims[1].dim_value == 64
    assert bundle.metadata["converged"] is True


@pytest.mark.parametrize("scheme", ONNX_SCHEMES)
def test_scheme_keeps_accuracy(
    scheme: str, variants: dict[str, tuple[Path, dict[str, Any], dict[str, float]]]
) -> None:
    _, provenance, accuracy = variants[scheme]
    fp32_top1 = variants["fp32"][2]["top1"]
    assert accuracy["examples"] == 540
    assert accuracy["agreement"] >= 0.97
    assert accuracy["top1"] >= fp32_top1 - 0.03
    assert accuracy["reference_top1"] == fp32_top1
    assert provenance["scheme"] == scheme
    assert provenance["tool"] == "onnxruntime" and provenance["tool_version"]
    assert sum(provenance["op_types"].values()) > 0


def test_scheme_specifics(
    variants: dict[str, tuple[Path, dict[str, Any], dict[str, float]]],
) -> None:
    fp32_size = variants["fp32"][1]["size_bytes"]
    assert variants["fp32"][2]["max_abs_diff"] == 0.0
    assert variants["fp16"][2]["max_abs_diff"] < 0.05
    assert variants["fp16"][1]["size_bytes"] < 0.55 * fp32_size

    dynamic = variants["int8-dynamic"][1]
    assert dynamic["op_types"].get("MatMulInteger") == 3
    assert dynamic["parameters"] == {"per_channel": False, "reduce_range": False}

    static = variants["int8-static"][1]
    assert static["op_types"].get("QuantizeLinear", 0) > 0
    assert static["op_types"].get("DequantizeLinear", 0) > 0
    assert static["calibration_examples"] > 0

    int4 = variants["int4-weight"][1]
    assert int4["op_types"].get("MatMulNBits") == 3
    assert "MatMul" not in int4["op_types"]
    assert int4["parameters"]["block_size"] == 32 and int4["parameters"]["symmetric"] is True
    for scheme, bound in (("int8-dynamic", 0.3), ("int8-static", 0.3), ("int4-weight", 0.2)):
        assert variants[scheme][1]["size_bytes"] < bound * fp32_size


def test_native_int4_matches_quantize_onnx(
    bundle: DigitsBundle, variants: dict[str, tuple[Path, dict[str, Any], dict[str, float]]]
) -> None:
    """The kernel-level fallback packs exactly what quantize_onnx wrote."""
    native = quantize_matmul_4bits_native(onnx.load(str(bundle.model_path)), 32, True, None)
    written = onnx.load(str(variants["int4-weight"][0]))
    a = {t.name: numpy_helper.to_array(t) for t in native.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_scheme_errors(bundle: DigitsBundle, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedScheme, match="int3"):
        quantize_onnx(bundle.model_path, tmp_path / "x.onnx", "int3", None)
    with pytest.raises(UsageError, match="calibration"):
        quantize_onnx(bundle.model_path, tmp_path / "x.onnx", "int8-static", None)
    with pytest.raises(UsageError, match="unknown parameter"):
        quantize_onnx(bundle.model_path, tmp_path / "x.onnx", "fp16", None, {"per_channel": True})
    with pytest.raises(UsageError, match="block_size"):
        quantize_onnx(
            bundle.model_path, tmp_path / "x.onnx", "int4-weight", None, {"block_size": 24}
        )


def test_quantizing_leaves_root_logging_alone(bundle: DigitsBundle, tmp_path: Path) -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    calibration = load_calibration_inputs(bundle.calibration_path)
    for scheme in ("int8-static", "int4-weight"):
        quantize_onnx(bundle.model_path, tmp_path / f"{scheme}.onnx", scheme, calibration)
    assert root.handlers == handlers and root.level == level
