"""The logit check of full-precision conversions against the checkpoint's own logits.

Once per module: a tiny random Qwen3 checkpoint whose attention is made sharp (q/k norms
x3, output projections x4: random attention is near-uniform, so a wrong RoPE base would
barely move the logits, unlike in a trained model), its transformers float32 logits on 32
tokens, an MLX fp16 folder and a KV-cache ONNX export. The file-format and arithmetic
tests at the top need no model.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.llm_eval import FALLBACK_TEXT
from coordinator.conversion.logit_check import (
    DEFAULT_TOKENS,
    REFERENCE,
    TOLERANCES,
    check_conversion,
    checkpoint_logits,
    gguf_logits,
    load_checkpoint_logits,
    mlx_logits,
    onnx_logits,
    openvino_logits,
    save_checkpoint_logits,
)
from edgefarm.errors import ArtifactError, ConversionError, UsageError

ARCH = "qwen3"
WRONG_ROPE_THETA = 10000.0  # the checkpoint's base is 1e6


def _needs(*modules: str) -> None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")


def _synthetic(n: int = 4, vocab: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "tokens": rng.integers(0, vocab, n).astype(np.int64),
        "logits": (rng.standard_normal((n, vocab)) * 5).astype(np.float32),
    }


# ----- the reference file and the arithmetic (no model) --------------------------------


def test_reference_file_round_trip(tmp_path: Path) -> None:
    arrays = _synthetic()
    path = tmp_path / "ref.npz"
    save_checkpoint_logits(path, arrays)
    loaded = load_checkpoint_logits(path)
    assert loaded["tokens"].dtype == np.int64 and loaded["logits"].dtype == np.float32
    np.testing.assert_array_equal(loaded["tokens"], arrays["tokens"])
    np.testing.assert_array_equal(loaded["logits"], arrays["logits"])


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"kind": "checkpoint_logits", "tokens": np.arange(3)}, "lack array(s): logits"),
        ({"kind": "llm", "tokens": np.arange(3), "logits": np.zeros((3, 5))}, "not checkpoint"),
        (
            {"kind": "checkpoint_logits", "tokens": np.arange(3), "logits": np.zeros((2, 5))},
            "expected (3, vocab)",
        ),
        (
            {"kind": "checkpoint_logits", "tokens": np.arange(3.0), "logits": np.zeros((3, 5))},
            "1-D integers",
        ),
        (
            {"kind": "checkpoint_logits", "tokens": np.array([0, 9]), "logits": np.zeros((2, 5))},
            "outside its vocabulary of 5",
        ),
        (
            {
                "kind": "checkpoint_logits",
                "tokens": np.arange(2),
                "logits": np.array([[0.0, np.nan], [0.0, 1.0]]),
            },
            "finite",
        ),
    ],
)
def test_malformed_reference_files(
    tmp_path: Path, payload: dict[str, Any], message: str
) -> None:
    path = tmp_path / "bad.npz"
    arrays: dict[str, Any] = {k: np.asarray(v) for k, v in payload.items()}
    np.savez(path, **arrays)
    with pytest.raises(ArtifactError) as info:
        load_checkpoint_logits(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unreadable_reference_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(ArtifactError, match="cannot read checkpoint logits"):
        load_checkpoint_logits(garbage)
    pickled = tmp_path / "pickled.npz"
    np.savez(
        pickled,
        kind=np.array("checkpoint_logits"),
        tokens=np.array([{"a": 1}]),
        logits=np.zeros((1, 3)),
    )
    with pytest.raises(ArtifactError, match="cannot read checkpoint logits"):
        load_checkpoint_logits(pickled)  # allow_pickle=False refuses object arrays
    with pytest.raises(ArtifactError, match="need arrays tokens and logits"):
        save_checkpoint_logits(tmp_path / "x.npz", {"tokens": np.arange(2)})


def test_check_conversion_measures_and_refuses() -> None:
    reference = _synthetic(n=6, vocab=50)
    std = float(reference["logits"].std())
    scale = float(np.abs(reference["logits"]).max())
    close = reference["logits"] + np.float32(1e-4 * std)
    record = check_conversion("onnx-fp32", reference, close, model="m")["logit_check"]
    assert record["format"] == "onnx-fp32" and record["tokens"] == 6
    assert record["reference"] == REFERENCE and record["tolerance"] == TOLERANCES["onnx-fp32"]
    assert record["max_abs_diff"] == pytest.approx(1e-4 * std, rel=1e-2)
    assert record["rms_diff"] == pytest.approx(1e-4 * std, rel=1e-2)
    assert record["relative"] == pytest.approx(1e-4, rel=1e-2)
    assert record["reference_std"] == pytest.approx(std, rel=1e-6)
    assert record["reference_max_abs"] == pytest.approx(scale)
    assert record["top1_agreement"] == 1.0

    # the RMS over all logits: one logit off by d among n*vocab moves it by d/sqrt(n*vocab)
    far = reference["logits"].copy()
    far[3, 7] += 20 * std
    expected = 20 / np.sqrt(far.size)
    assert expected > TOLERANCES["gguf-f16"]
    with pytest.raises(ConversionError) as info:
        check_conversion("gguf-f16", reference, far, model="tiny-qwen3")
    message = str(info.value)
    assert "GGUF F16" in message and "tiny-qwen3" in message and "\n" not in message
    assert f"{expected:.3g}" in message and f"{TOLERANCES['gguf-f16']:.3g}" in message
    assert f"max |diff| {20 * std:.4g}" in message
    # an explicit tolerance wins
    check_conversion("gguf-f16", reference, far, tolerance=1.5 * expected)

    nan = reference["logits"].copy()
    nan[0, 0] = np.nan
    with pytest.raises(ConversionError):
        check_conversion("mlx-fp16", reference, nan)
    with pytest.raises(ConversionError, match="shape"):
        check_conversion("mlx-fp16", reference, reference["logits"][:, :-1])
    with pytest.raises(UsageError, match="no logit tolerance"):
        check_conversion("tflite", reference, reference["logits"])


def test_checkpoint_logits_needs_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"no config\.json"):
        checkpoint_logits(tmp_path, "text")


# ----- a real tiny checkpoint ---------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _needs("torch", "transformers", "safetensors")
    from coordinator.models.checkpoints import build_random_checkpoint

    folder = tmp_path_factory.mktemp("logit-check") / ARCH
    build_random_checkpoint(ARCH, folder)  # attention made sharp by the builder
    return folder


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> dict[str, np.ndarray]:
    return checkpoint_logits(checkpoint, FALLBACK_TEXT)


@pytest.fixture(scope="module")
def mlx_folder(checkpoint: Path) -> Path:
    _needs("mlx", "mlx_lm")
    from coordinator.conversion.mlx_convert import convert_mlx

    out = checkpoint.parent / "mlx-fp16"
    convert_mlx(checkpoint, out, "fp16")
    return out


@pytest.fixture(scope="module")
def onnx_file(checkpoint: Path) -> Path:
    _needs("onnx", "onnxruntime")
    from coordinator.conversion.hf_to_onnx import export_causal_lm

    out = checkpoint.parent / "onnx" / "model.onnx"
    export_causal_lm(checkpoint, out)
    return out


def test_reference_is_the_checkpoints_own(checkpoint: Path, reference: dict[str, Any]) -> None:
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    tokens, logits = reference["tokens"], reference["logits"]
    assert tokens.dtype == np.int64 and tokens.shape == (DEFAULT_TOKENS,)
    assert int(tokens[0]) == config["bos_token_id"]  # BOS first, as every runtime gets it
    assert logits.dtype == np.float32 and logits.shape == (DEFAULT_TOKENS, config["vocab_size"])
    assert float(logits.std()) > 1.0  # a realistic spread, not near-zero random logits


def test_honest_mlx_fp16_passes(mlx_folder: Path, reference: dict[str, Any]) -> None:
    logits = mlx_logits(mlx_folder, reference["tokens"])
    record = check_conversion("mlx-fp16", reference, logits, model=ARCH)["logit_check"]
    assert 0.0 < record["relative"] < TOLERANCES["mlx-fp16"] / 3  # measured 2.4e-3
    assert record["max_abs_diff"] > 0.0 and record["tokens"] == DEFAULT_TOKENS


def test_wrong_rope_base_is_caught(
    mlx_folder: Path, reference: dict[str, Any], tmp_path: Path
) -> None:
    """mlx-lm reading a wrong RoPE base (its default when config.json lacks one)."""
    wrong = tmp_path / "mlx-wrong-rope"
    shutil.copytree(mlx_folder, wrong)
    config = json.loads((wrong / "config.json").read_text(encoding="utf-8"))
    config["rope_theta"] = WRONG_ROPE_THETA
    (wrong / "config.json").write_text(json.dumps(config), encoding="utf-8")
    logits = mlx_logits(wrong, reference["tokens"])
    with pytest.raises(ConversionError) as info:
        check_conversion("mlx-fp16", reference, logits, model=ARCH)  # measured 8.1e-1
    assert "MLX fp16 conversion of qwen3 does not keep the model" in str(info.value)


def test_honest_onnx_and_openvino_pass(
    onnx_file: Path, reference: dict[str, Any], tmp_path: Path
) -> None:
    record = check_conversion("onnx-fp32", reference, onnx_logits(onnx_file, reference["tokens"]))
    assert record["logit_check"]["relative"] < TOLERANCES["onnx-fp32"] / 10

    _needs("openvino")
    from coordinator.conversion.openvino_schemes import convert_openvino

    xml = tmp_path / "fp16" / "model.xml"
    convert_openvino(onnx_file, xml, "fp16", None)
    logits = openvino_logits(xml, reference["tokens"])
    record = check_conversion("openvino-fp16", reference, logits)
    assert 0.0 < record["logit_check"]["relative"] < TOLERANCES["openvino-fp16"] / 3


def test_honest_gguf_f16_passes(
    checkpoint: Path, reference: dict[str, Any], tmp_path: Path
) -> None:
    _needs("llama_cpp")
    from coordinator.conversion.hf_to_gguf import convert_checkpoint
    from coordinator.conversion.llama_converter import find_converter
    from edgefarm.errors import EdgefarmError

    try:
        find_converter()
    except EdgefarmError as err:
        pytest.skip(f"llama.cpp's converter is not fetched: {err}")
    gguf = tmp_path / "model-f16.gguf"
    convert_checkpoint(checkpoint, gguf, "f16")
    record = check_conversion("gguf-f16", reference, gguf_logits(gguf, reference["tokens"]))
    assert 0.0 < record["logit_check"]["relative"] < TOLERANCES["gguf-f16"] / 3
