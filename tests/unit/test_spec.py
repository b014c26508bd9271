"""The campaign spec: good specs load, bad ones give one line with file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.spec import CampaignSpec
from edgefarm.domain import MeasureSettings
from edgefarm.errors import SpecError

REPO = Path(__file__).resolve().parents[2]

GOOD = """\
name: sweep-1
models:
  - name: mlp
    source: builtin:digits-mlp
  - name: mine
    source: file:model.onnx
    eval: file:eval.npz
backends:
  - name: onnxruntime
    schemes: [fp32, int8-dynamic]
    options: {intra_op: 2, fast: true}
  - name: noop
    schemes: [none]
devices:
  - selector: {arch: x86_64, cores: 4}
  - selector: ["arch=arm64", "label.rack!=b"]
measurement:
  trials: 2
  min_duration_s: 1
"""


def _write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_quickstart_loads() -> None:
    spec = CampaignSpec.load(REPO / "campaigns" / "quickstart.yaml")
    assert spec.name == "quickstart"
    variants = spec.variants()
    assert [(v.model.name, v.backend, v.scheme) for v in variants] == [
        ("digits-mlp", "onnxruntime", scheme)
        for scheme in ("fp32", "fp16", "int8-dynamic", "int8-static", "int4-weight")
    ] + [("smollm2-135m", "llama-cpp", scheme) for scheme in ("F16", "Q8_0", "Q4_K_M")]
    settings = spec.measure_settings()
    assert (settings.warmup_iterations, settings.min_iterations, settings.trials) == (20, 200, 5)
    assert (settings.min_duration_s, settings.threads, settings.timeout_s) == (0.5, 1, 120.0)
    llm = variants[-1].settings  # the llama-cpp backend's overrides on top of the campaign's
    assert (llm.min_iterations, llm.trials, llm.threads, llm.context_tokens) == (48, 5, 2, 256)
    assert llm.timeout_s == 120.0  # not overridden: the campaign's value
    assert spec.selectors() == [{}]  # every device


def test_good_spec(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"x")
    (tmp_path / "eval.npz").write_bytes(b"x")
    spec = CampaignSpec.load(_write(tmp_path, GOOD))
    assert [m.kind for m in spec.models] == ["builtin", "file"]
    assert spec.models[1].ref == "model.onnx"
    assert [(v.model.name, v.backend, v.scheme) for v in spec.variants()] == [
        ("mlp", "onnxruntime", "fp32"),
        ("mlp", "onnxruntime", "int8-dynamic"),
        ("mlp", "noop", "none"),
        ("mine", "onnxruntime", "fp32"),
        ("mine", "onnxruntime", "int8-dynamic"),
        ("mine", "noop", "none"),
    ]
    assert spec.variants()[0].options == {"intra_op": "2", "fast": "true"}
    assert spec.selectors() == [
        {"arch": "x86_64", "cores": "4"},
        {"arch": "arm64", "!label.rack": "b"},
    ]
    defaults = MeasureSettings()
    assert spec.measure_settings() == MeasureSettings(trials=2, min_duration_s=1.0)
    assert spec.measure_settings().timeout_s == defaults.timeout_s


def test_from_text_does_not_need_the_files() -> None:
    spec = CampaignSpec.from_text(GOOD, "<spec>")
    assert spec.models[1].eval == "file:eval.npz"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "[fp32, int8-dynamic]",
            "[fp32,\n      int3]",
            "11: backends[0].schemes[1]: unknown scheme 'int3' for onnxruntime (expected one "
            "of fp32, fp16, int8-dynamic, int8-static, int4-weight)",
        ),
        (
            "  trials: 2",
            "  trails: 2",
            "18: measurement.trails: unknown field 'trails' (did you mean 'trials'?)",
        ),
        (
            "  min_duration_s: 1",
            "  min_duration_s: fast",
            "19: measurement.min_duration_s: input should be a valid number (got 'fast')",
        ),
        ("name: sweep-1\n", "", "1: name: missing required field"),
        (
            "  - name: mine\n",
            "  - nmae: mine\n",
            "5: models[1].nmae: unknown field 'nmae' (did you mean 'name'?)",
        ),
        ("    source: file:model.onnx\n", "", "5: models[1].source: missing required field"),
        (
            "  - name: noop",
            "  - name: tflite",
            "12: backends[1].name: unknown backend 'tflite' (expected one of onnxruntime, "
            "noop, openvino, llama-cpp, mlx, onnxruntime-genai, foundry-local, llama-server, "
            "openai-endpoint, vllm, qai-hub)",
        ),
        ("[none]", "[none, none]", "13: backends[1].schemes[1]: scheme 'none' is listed twice"),
        (
            "  - name: mine\n",
            "  - name: mlp\n",
            "5: models[1].name: duplicate model name 'mlp' (also models[0])",
        ),
        (
            "source: builtin:digits-mlp",
            "source: digits-mlp",
            "4: models[0].source: invalid model source 'digits-mlp' "
            "(expected 'builtin:NAME', 'file:PATH' or 'hf:ORG/REPO')",
        ),
        (
            '"label.rack!=b"]',
            '"label.rack"]',
            "16: devices[1].selector: bad selector item 'label.rack' "
            "(expected 'key=value' or 'key!=value')",
        ),
        (
            "  trials: 2\n",
            "  trials: 2\n  max_iterations: 50\n",
            "19: measurement.max_iterations: min_iterations (100) is above max_iterations (50)",
        ),
        (
            "  trials: 2",
            "  trials: 0",
            "18: measurement.trials: input should be greater than 0 (got 0)",
        ),
        (
            "name: sweep-1",
            "name: Sweep One",
            "1: name: invalid campaign name 'Sweep One' "
            "(use lowercase letters, digits, '.', '_', '-')",
        ),
        (
            "  trials: 2\n",
            "  trials: 2\n   threads: 1\n",
            "19: invalid YAML: mapping values are not allowed here",
        ),
    ],
)
def test_bad_spec_is_one_line(tmp_path: Path, old: str, new: str, expected: str) -> None:
    (tmp_path / "model.onnx").write_bytes(b"x")
    (tmp_path / "eval.npz").write_bytes(b"x")
    assert old in GOOD
    path = _write(tmp_path, GOOD.replace(old, new, 1), "bad-spec.yaml")
    with pytest.raises(SpecError) as info:
        CampaignSpec.load(path)
    assert str(info.value) == f"{path}:{expected}"


def test_missing_referenced_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"x")
    path = _write(tmp_path, GOOD)
    with pytest.raises(SpecError) as info:
        CampaignSpec.load(path)
    assert str(info.value) == f"{path}:7: models[1].eval: file not found: {tmp_path}/eval.npz"


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"nope\.yaml: file not found$"):
        CampaignSpec.load(tmp_path / "nope.yaml")


def test_from_text_names_its_source() -> None:
    with pytest.raises(SpecError, match=r"^campaigns/x\.yaml:1: expected a mapping \(got 'hi'\)$"):
        CampaignSpec.from_text("hi\n", "campaigns/x.yaml")


def test_conversion_parameters_per_scheme(tmp_path: Path) -> None:
    text = (
        "name: p\nmodels:\n  - name: m\n    source: builtin:smollm2-135m\n"
        "backends:\n  - name: openvino\n    schemes: [fp32, int4-asym]\n"
        "    convert:\n      int4-asym: {group_size: 128}\n"
    )
    spec = CampaignSpec.from_text(text, "p.yaml")
    assert {v.scheme: v.convert for v in spec.variants()} == {
        "fp32": {},
        "int4-asym": {"group_size": 128},
    }
    bad = text.replace("int4-asym: {group", "int4-sym: {group")
    with pytest.raises(SpecError, match=r"p.yaml:9: backends\[0\].convert.int4-sym: conversion"):
        CampaignSpec.from_text(bad, "p.yaml")


BOUNDED = """\
name: bounded
models:
  - name: m
    source: builtin:digits-mlp
backends:
  - name: onnxruntime
    schemes: [fp32]
    convert:
      fp32: {low: -9223372036854775808, high: 9223372036854775807, ratio: 0.5, flag: true}
    measurement:
      trials: %s
measurement:
  trials: 2
  max_iterations: 1000000
  timeout_s: 86400
  context_tokens: 1048576
"""


def test_numbers_at_their_limits_are_accepted() -> None:
    spec = CampaignSpec.from_text(BOUNDED % 2, "b.yaml")
    assert spec.measure_settings().max_iterations == 1_000_000
    assert spec.variants()[0].convert["low"] == -(2**63)


def test_a_backend_override_is_checked_against_the_samples_one_result_may_carry() -> None:
    with pytest.raises(SpecError) as info:
        CampaignSpec.from_text(BOUNDED % 3, "b.yaml")
    assert str(info.value) == (
        "b.yaml:11: backends[0].measurement.trials: trials x max_iterations "
        "(3 x 1000000 = 3000000) is above the 2000000 samples one result may carry"
    )


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("trials: 2\n  max", "trials: 101\n  max", "13: measurement.trials: input should be less"),
        ("timeout_s: 86400", "timeout_s: 86401", "15: measurement.timeout_s: input should be less"),
        ("high: 9223372036854775807", "high: 9223372036854775808", "9: backends[0].convert"),
        ("ratio: 0.5", "ratio: .nan", "9: backends[0].convert.fp32.ratio: nan is not a finite"),
        ("name: bounded", "name: " + "b" * 129, "1: name: text of 129 bytes is too long"),
    ],
)
def test_numbers_and_texts_beyond_their_limits(old: str, new: str, expected: str) -> None:
    text = (BOUNDED % 2).replace(old, new)
    with pytest.raises(SpecError) as info:
        CampaignSpec.from_text(text, "b.yaml")
    assert str(info.value).startswith(f"b.yaml:{expected}")
