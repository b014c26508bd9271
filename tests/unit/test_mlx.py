"""The MLX backend and converter on the real packaged SmolLM2 (135M, Q4_1 -> HF -> MLX).

Once per module: the Hugging Face folder from the packaged GGUF (~25 s), an F16 GGUF and
its llama.cpp reference on the first 256 tokens of the project's eval text (n_ctx 128),
and MLX conversions to fp16 and q4. MLX's Linux CPU build is slow (single-threaded
reference BLAS), so the measurements use tiny settings. The model-free tests at the
top (archive, parameters) run without any of it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import os
import statistics
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.backends.mlx import MlxBackend, pack_folder, unpack_folder
from agent.runner import TrialsReport, run_measurement
from coordinator.conversion.mlx_convert import (
    convert_mlx,
    convert_mlx_archive,
    mlx_config,
    source_rope_theta,
)
from edgefarm.domain import MeasureSettings
from edgefarm.errors import (
    ModelLoadError,
    TaskError,
    UnsupportedArchitecture,
    UnsupportedScheme,
    UsageError,
)
from tests.unit.conftest import REF_TOKENS

SMOLLM2_ROPE_THETA = 100000.0
MLX_LLAMA_DEFAULT_ROPE_THETA = 10000.0  # what mlx-lm uses when config.json has none
TINY = MeasureSettings(
    max_other_cpu_cores=0.0,  # record only: these tests are not about the busy-host guard
    warmup_iterations=1,
    min_iterations=4,
    min_duration_s=0.1,
    trials=1,
    threads=1,
    prompt_tokens=16,
    context_tokens=32,
    timeout_s=240.0,
)


def _needs(*modules: str) -> None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (needed for the real-model MLX tests)")


# ----- the artifact archive and the parameters (no model needed) ----------------------


def _folder(root: Path) -> Path:
    root.mkdir()
    (root / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    (root / "model.safetensors").write_bytes(b"weights" * 100)
    (root / "sub").mkdir()
    (root / "sub" / "extra.txt").write_text("x", encoding="utf-8")
    return root


def _tar(members: dict[str, bytes], symlink: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return buffer.getvalue()


def test_pack_is_reproducible_and_unpacks_to_the_same_files(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "a")
    data = pack_folder(folder)
    os.utime(folder / "config.json", (1e9, 1e9))  # times and owners do not matter
    assert pack_folder(folder) == data
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # plain, uncompressed tar
        assert tar.getnames() == ["config.json", "model.safetensors", "sub/extra.txt"]
        assert {m.mtime for m in tar.getmembers()} == {0}
    assert data[257:262] == b"ustar"
    out = unpack_folder(data, tmp_path / "b")
    for name in ("config.json", "model.safetensors", "sub/extra.txt"):
        assert (out / name).read_bytes() == (folder / name).read_bytes()
    with pytest.raises(ModelLoadError, match="not empty"):
        unpack_folder(data, out)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not a tar at all" * 64, "not a readable"),
        (_tar({"model.safetensors": b"w"}), "no config.json"),
        (_tar({"config.json": b"{}"}), "no \\*.safetensors"),
        (_tar({"config.json": b"[1]", "model.safetensors": b"w"}), "not a JSON object"),
        (_tar({"../config.json": b"{}", "model.safetensors": b"w"}), "unsafe name"),
        (_tar({"config.json": b"{}", "model.safetensors": b"w"}, symlink="x"), "not a plain"),
    ],
)
def test_a_bad_archive_is_a_model_load_error(tmp_path: Path, data: bytes, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        unpack_folder(data, tmp_path / "out")
    archive = tmp_path / "model.tar"
    archive.write_bytes(data)
    with pytest.raises(ModelLoadError, match=message):  # the backend checks before mlx-lm
        MlxBackend().load(archive, TINY, {})


def test_corrupt_weights_are_a_model_load_error(tmp_path: Path) -> None:
    _needs("mlx", "mlx_lm")
    folder = _folder(tmp_path / "m")  # valid layout, but the weights are not safetensors
    with pytest.raises(ModelLoadError, match="mlx-lm could not load"):
        MlxBackend().load(folder, TINY, {})


def test_conversion_arguments_are_checked(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "hf")
    with pytest.raises(UnsupportedScheme, match="q3"):
        convert_mlx(folder, tmp_path / "o1", "q3", None)
    with pytest.raises(UsageError, match="group_size"):
        convert_mlx(folder, tmp_path / "o2", "q4", {"group_size": 48})
    with pytest.raises(UsageError, match="dtype"):
        convert_mlx(folder, tmp_path / "o3", "q8", {"dtype": "float64"})
    with pytest.raises(UsageError, match="unknown MLX conversion parameter"):
        convert_mlx(folder, tmp_path / "o4", "q4", {"bits": 3})
    with pytest.raises(UsageError, match="takes no parameters"):
        convert_mlx(folder, tmp_path / "o5", "fp16", {"dtype": "float32"})
    with pytest.raises(UsageError, match="not a model folder"):
        convert_mlx(tmp_path, tmp_path / "o6", "fp16", None)


def test_the_rope_base_is_read_where_transformers_5_keeps_it() -> None:
    nested = {"rope_parameters": {"rope_theta": 100000.0}, "rope_theta": 10000.0}
    assert source_rope_theta(nested) == (100000.0, "rope_parameters.rope_theta")
    assert source_rope_theta({"rope_theta": 5e5}) == (5e5, "rope_theta")
    assert source_rope_theta({"model_type": "gpt2"}) == (None, None)
    per_type = {"rope_parameters": {"full_attention": {"rope_theta": 1e6}}}
    assert source_rope_theta(per_type) == (1e6, "rope_parameters.full_attention.rope_theta")


def test_the_config_gets_the_keys_mlx_lm_reads() -> None:
    _needs("mlx_lm")
    # Gemma 3 (transformers 5): both bases nested per layer type, the pattern as a list
    types = ["sliding_attention"] * 5 + ["full_attention"]
    gemma3 = {
        "model_type": "gemma3_text",
        "layer_types": types * 2,
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    }
    config, changes = mlx_config(gemma3)
    assert (config["rope_theta"], config["rope_local_base_freq"]) == (1e6, 1e4)
    assert config["sliding_window_pattern"] == 6
    assert config["rope_scaling"] == {"type": "linear", "factor": 8.0}
    assert set(changes) == {
        "rope_theta",
        "rope_local_base_freq",
        "sliding_window_pattern",
        "rope_scaling",
    }
    with pytest.raises(UnsupportedArchitecture, match=r"gemma3_text: .*every n-th.*\(mlx\)"):
        mlx_config({**gemma3, "layer_types": [*types, *types[3:]]})  # 6th, then 9th
    # Phi-3 LongRoPE: "type" and the short factors where mlx-lm takes the long ones
    longrope = {
        "rope_type": "longrope",
        "rope_theta": 1e4,
        "partial_rotary_factor": 0.75,
        "original_max_position_embeddings": 512,
        "short_factor": [1.0, 1.1],
        "long_factor": [2.0, 4.0],
    }
    phi3 = {"model_type": "phi3", "max_position_embeddings": 16384, "rope_parameters": longrope}
    config, changes = mlx_config(phi3)
    assert config["rope_scaling"] == {
        "type": "longrope",
        "short_factor": [1.0, 1.1],
        "long_factor": [1.0, 1.1],
    }
    assert (config["partial_rotary_factor"], config["original_max_position_embeddings"]) == (
        0.75,
        512,
    )
    assert changes["longrope"]["valid_up_to_tokens"] == 512
    assert config["edgefarm_max_context_tokens"] == 512
    with pytest.raises(UnsupportedArchitecture, match=r"phi3: .*attention_factor"):
        mlx_config({**phi3, "rope_parameters": {**longrope, "attention_factor": 1.0}})
    # an architecture mlx-lm has no module for
    with pytest.raises(UnsupportedArchitecture, match=r"^no_such_arch: mlx-lm has no model"):
        mlx_config({"model_type": "no_such_arch"})
    assert mlx_config({"model_type": "llama", "rope_theta": 1e5})[1] == {}


# ----- the real model -----------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_folder(request: pytest.FixtureRequest) -> Path:
    _needs("mlx", "mlx_lm", "torch", "transformers", "gguf", "llama_cpp")
    folder: Path = request.getfixturevalue("smollm2_hf")
    return folder


@pytest.fixture(scope="module")
def reference(hf_folder: Path, smollm2_reference: Path) -> Path:
    """The llama.cpp F16 reference on the first REF_TOKENS tokens of the eval text."""
    return smollm2_reference


def _linked_copy(src: Path, dst: Path, drop_rope_theta: bool) -> Path:
    """``src`` with hard-linked weights and, optionally, no top-level rope_theta."""
    dst.mkdir()
    for path in src.iterdir():
        if path.name != "config.json":
            os.link(path, dst / path.name)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if drop_rope_theta:
        del config["rope_theta"]
    (dst / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def converted(
    hf_folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, Path, dict[str, Any]]]:
    """scheme -> (MLX folder, its tar, provenance).

    fp16 goes tar to tar (:func:`convert_mlx_archive`, as a Ray step would); q4 is made
    from a source whose config.json lacks the top-level rope_theta: the converter's
    guard must add it.
    """
    tmp = tmp_path_factory.mktemp("mlx-conv")
    data, fp16_provenance = convert_mlx_archive(pack_folder(hf_folder), "fp16", None)
    (tmp / "fp16.tar").write_bytes(data)
    out = {"fp16": (unpack_folder(data, tmp / "fp16"), tmp / "fp16.tar", fp16_provenance)}
    stripped = _linked_copy(hf_folder, tmp / "hf-no-top-level-rope", drop_rope_theta=True)
    q4_provenance = convert_mlx(stripped, tmp / "q4", "q4", None)
    (tmp / "q4.tar").write_bytes(pack_folder(tmp / "q4"))
    out["q4"] = (tmp / "q4", tmp / "q4.tar", q4_provenance)
    return out


@pytest.fixture(scope="module")
def reports(
    converted: dict[str, tuple[Path, Path, dict[str, Any]]], reference: Path
) -> dict[str, TrialsReport]:
    """Each converted tar measured through the runner (a child per trial)."""
    return {
        scheme: asyncio.run(run_measurement("mlx", scheme, archive, reference, TINY, {}))
        for scheme, (_, archive, _) in converted.items()
    }


def test_conversion_provenance_and_the_rope_guard(
    converted: dict[str, tuple[Path, Path, dict[str, Any]]],
) -> None:
    fp16, q4 = converted["fp16"][2], converted["q4"][2]
    assert fp16["bits"] is None and fp16["dtype"] == "float16"
    assert (q4["bits"], q4["group_size"], q4["mode"]) == (4, 64, "affine")
    assert set(fp16["tool_versions"]) == {"mlx", "mlx-lm"}
    assert fp16["rope_theta_action"] == "kept"
    assert q4["rope_theta_action"] == "added"  # the source lacked it at the top level
    assert q4["config_normalisation"] == {"rope_theta": SMOLLM2_ROPE_THETA}
    assert fp16["config_normalisation"] == {}
    for folder, archive, provenance in converted.values():
        assert pack_folder(folder) == archive.read_bytes()  # the same files, the same bytes
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        assert config["rope_theta"] == provenance["rope_theta"] == SMOLLM2_ROPE_THETA
        assert provenance["size_bytes"] == sum(f["size_bytes"] for f in provenance["files"])
    # 135M weights: 2 bytes each in fp16; 4 bits plus a float32 scale and bias per 64
    assert 250 * 2**20 < fp16["size_bytes"] < 280 * 2**20
    assert q4["size_bytes"] < fp16["size_bytes"] / 2.5


def test_real_measurements_of_fp16_and_q4(
    reports: dict[str, TrialsReport], converted: dict[str, tuple[Path, Path, dict[str, Any]]]
) -> None:
    for scheme, report in reports.items():
        (trial,) = report.trials
        assert trial.valid, trial.invalid_reason
        assert len(trial.samples_ms) >= TINY.min_iterations
        gen_tok_per_s = 1000.0 / statistics.fmean(trial.samples_ms)
        metrics = trial.metrics
        print(
            f"\n{scheme}: gen {gen_tok_per_s:.2f} tok/s, prompt {metrics['prompt_tok_per_s']:.1f}"
            f" tok/s, TTFT {metrics['ttft_ms']:.0f} ms, load {trial.load_time_s:.2f} s, "
            f"accuracy {report.accuracy}"
        )
        assert gen_tok_per_s > 0 and metrics["prompt_tok_per_s"] > 0
        assert metrics["prompt_tokens"] == TINY.prompt_tokens
        assert metrics["context_tokens"] == TINY.context_tokens
        assert 0 < metrics["unpack_ms"] < trial.load_time_s * 1e3  # the tar is part of load
        # TTFT evaluates a 16-token prompt: longer than one decode step
        assert metrics["ttft_ms"] > statistics.median(trial.samples_ms)
        assert report.model_size_bytes == converted[scheme][1].stat().st_size
        env = report.environment
        assert env["mlx.rope_theta"] == repr(SMOLLM2_ROPE_THETA)
        assert env["mlx.model_type"] == "llama"
        assert env["mlx_lm.version"] == report.backend_version
    assert reports["fp16"].environment["mlx.quantization"] == "none"
    assert reports["fp16"].environment["mlx.parameter_dtypes"].startswith("float16:")
    assert reports["q4"].environment["mlx.quantization"] == "bits=4,group_size=64,mode=affine"

    fp16, q4 = reports["fp16"].accuracy, reports["q4"].accuracy
    assert fp16["examples"] == q4["examples"] == REF_TOKENS - 2  # two chunks of 128
    # float16 MLX against the float16 llama.cpp reference: nearly the same distribution
    assert abs(fp16["ppl_ratio"] - 1.0) < 0.01
    assert fp16["kld_mean"] < 1e-3
    assert fp16["top1_agreement"] >= 0.97
    # 4 bits (embedding and output layer included) lose clearly more, yet still a model
    assert q4["ppl_ratio"] > fp16["ppl_ratio"] + 0.05
    assert q4["kld_mean"] > 10 * fp16["kld_mean"]
    assert q4["top1_agreement"] < fp16["top1_agreement"]
    assert q4["ppl_ratio"] < 2.0 and q4["top1_agreement"] > 0.4


def test_a_folder_without_top_level_rope_theta_is_caught_by_the_fidelity_check(
    converted: dict[str, tuple[Path, Path, dict[str, Any]]],
    reports: dict[str, TrialsReport],
    reference: Path,
    tmp_path: Path,
) -> None:
    """The fp16 folder minus the key, loaded straight (no converter guard): mlx-lm
    silently runs RoPE with base 10000, and only the accuracy check shows it."""
    broken = _linked_copy(converted["fp16"][0], tmp_path / "broken", drop_rope_theta=True)
    backend = MlxBackend()
    backend.load(broken, TINY, {})
    env = backend.environment()
    assert env["mlx.rope_theta"] == repr(MLX_LLAMA_DEFAULT_ROPE_THETA)
    assert env["mlx.config_rope_parameters_theta"] == repr(SMOLLM2_ROPE_THETA)
    got = backend.evaluate(reference, TINY)
    good = reports["fp16"].accuracy
    print(f"\nbroken RoPE: {got}\nsame weights, right RoPE: {good}")
    # On 128-token chunks the wrong base changes only the slow rotary dimensions, so
    # the damage is moderate, but far outside what float16 rounding does.
    assert got["ppl_ratio"] > good["ppl_ratio"] + 0.05
    assert got["kld_mean"] > 100 * good["kld_mean"]
    assert got["kld_mean"] > 0.02
    assert got["top1_agreement"] < good["top1_agreement"] - 0.1


def test_decode_steps_rewind_to_the_prompt_when_the_context_is_full(
    converted: dict[str, tuple[Path, Path, dict[str, Any]]],
) -> None:
    import mlx.core as mx

    settings = MeasureSettings(
        warmup_iterations=0, min_iterations=4, prompt_tokens=4, context_tokens=8
    )
    backend = MlxBackend()
    backend.load(converted["q4"][1], settings, {})
    tokens = backend.make_inputs(None, 1)  # the fallback paragraph's tokens
    assert len(tokens) == settings.context_tokens
    step = backend.timed_call(tokens)
    assert step.cache[0].offset == settings.prompt_tokens

    def next_logits() -> np.ndarray:
        step()
        return np.asarray(step.logits.astype(mx.float32))

    first = [next_logits() for _ in range(4)]  # positions 4..7: the context is full
    assert step.cache[0].offset == settings.context_tokens
    again = [next_logits() for _ in range(4)]  # rewound: positions 4..7 again
    assert step.cache[0].offset == settings.context_tokens
    for a, b in zip(first, again, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert not np.allclose(first[0], first[1])  # different positions, different logits
    with pytest.raises(TaskError, match="batch_size must be 1"):
        backend.make_inputs(None, 2)
