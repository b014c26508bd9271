"""Bring your own checkpoint, through the real farm: random-weight checkpoints of the
Llama, Qwen3, Phi-3 and Gemma 3 architectures (one of them as a hub id resolved through
a pre-filled hub cache) converted on Ray to every backend's format, each full-precision
conversion checked against the checkpoint's logits, measured on an agent."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.localfarm import LocalFarm
from coordinator.runner import run_campaign
from tests.integration.conftest import open_store

pytestmark = pytest.mark.integration
for _module in ("llama_cpp", "ray", "transformers", "openvino", "mlx_lm"):
    pytest.importorskip(_module, reason=f"{_module} (an extra of the full suite) is not installed")

MakeFarm = Callable[[int], LocalFarm]
ARCHS = ("llama", "qwen3", "phi3", "gemma3")
HUB_REPO = "edgefarm-test/tiny-llama"
COMMIT = "1234567890abcdef1234567890abcdef12345678"
FULL_PRECISION = {"llama-cpp": "F16", "onnxruntime": "fp32", "openvino": "fp32", "mlx": "fp16"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from coordinator.models.checkpoints import build_random_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for arch in ARCHS:
        build_random_checkpoint(arch, root / arch, seed=1)
        out[arch] = root / arch
    return out


def _prefill_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay ``folder`` out as huggingface_hub's cache holds a downloaded snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for path in folder.iterdir():
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / COMMIT / path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../..") / "blobs" / blob.name)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)


@pytest.mark.timeout(1500)  # 16 conversions and 16 measurements on 2 cores: ~5 minutes
def test_checkpoints_of_four_architectures_on_four_backends(
    make_farm: MakeFarm, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    farm = make_farm(1)
    _prefill_hub_cache(farm.home / "hub-cache", HUB_REPO, checkpoints["llama"])
    text = (Path(__file__).parents[2] / "coordinator/models/texts/eval_en.txt").read_text()
    (tmp_path / "eval.txt").write_text(text[:600])
    sources = {arch: f"file:{checkpoints[arch]}" for arch in ARCHS}
    sources["llama"] = f"hf:{HUB_REPO}"
    models = "".join(
        f"  - name: tiny-{arch}\n    source: {source}\n    eval: file:eval.txt\n"
        for arch, source in sources.items()
    )
    spec = tmp_path / "byoc.yaml"
    spec.write_text(
        f"""name: byoc
models:
{models}backends:
  - name: llama-cpp
    schemes: [F16]
  - name: onnxruntime
    schemes: [fp32]
  - name: openvino
    schemes: [fp32]
  - name: mlx
    schemes: [fp16]
measurement:
  warmup_iterations: 1
  min_iterations: 3
  min_duration_s: 0.01
  trials: 1
  threads: 1
  prompt_tokens: 8
  context_tokens: 64
  timeout_s: 240
"""
    )
    campaign_id = run_campaign(farm.address, farm.token, spec)  # raises if a task failed
    with open_store(farm) as store:
        rows = store.results_for_campaign(campaign_id)
        assert {(r["model"], r["backend"]) for r in rows} == {
            (f"tiny-{arch}", backend) for arch in ARCHS for backend in FULL_PRECISION
        }
        for row in rows:
            assert row["ok"] and row["valid"], row
            assert row["scheme"] == FULL_PRECISION[row["backend"]], row
            assert row["accuracy"]["perplexity"] > 1 and row["accuracy"]["kld_mean"] < 0.05, row
        checks: dict[str, list[dict[str, float]]] = {}
        for record in store.list_artifacts():
            check = record.provenance.get("logit_check")
            if check:
                checks.setdefault(check["format"], []).append(check)
                assert check["relative"] <= check["tolerance"], check
        # every full-precision conversion of every architecture carries its check
        assert {fmt: len(found) for fmt, found in checks.items()} == {
            "gguf-f16": 4,
            "onnx-fp32": 4,
            "openvino-fp32": 4,
            "mlx-fp16": 4,
        }


@pytest.mark.timeout(900)  # 4 conversions and 4 measurements on 2 cores: ~2 minutes
def test_onnx_genai_variants_of_a_checkpoint_beside_llama_cpp(
    make_farm: MakeFarm, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """A local Qwen3 checkpoint built by the ONNX GenAI builder (int4 RTN with a block
    size, fp32 checked against the checkpoint's logits), measured by the
    onnxruntime-genai backend with the same metric set as llama.cpp's rows."""
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    farm = make_farm(1)
    text = (Path(__file__).parents[2] / "coordinator/models/texts/eval_en.txt").read_text()
    (tmp_path / "eval.txt").write_text(text[:600])
    spec = tmp_path / "genai.yaml"
    spec.write_text(
        f"""name: genai
models:
  - name: tiny-qwen3
    source: file:{checkpoints["qwen3"]}
    eval: file:eval.txt
backends:
  - name: llama-cpp
    schemes: [F16, Q8_0]
  - name: onnxruntime-genai
    schemes: [fp32, int4]
    convert:
      int4: {{block_size: 64, algo: rtn}}
measurement:
  warmup_iterations: 1
  min_iterations: 3
  min_duration_s: 0.01
  trials: 2
  threads: 1
  prompt_tokens: 8
  context_tokens: 64
  timeout_s: 240
  max_other_cpu_cores: 0
"""
    )
    campaign_id = run_campaign(farm.address, farm.token, spec)  # raises if a task failed
    with open_store(farm) as store:
        rows = {(r["backend"], r["scheme"]): r for r in store.results_for_campaign(campaign_id)}
        assert set(rows) == {
            ("llama-cpp", "F16"),
            ("llama-cpp", "Q8_0"),
            ("onnxruntime-genai", "fp32"),
            ("onnxruntime-genai", "int4"),
        }
        for row in rows.values():
            assert row["ok"] and row["valid"], row
        llama, genai = rows["llama-cpp", "F16"], rows["onnxruntime-genai", "fp32"]
        for key in (
            "lat_p50_ms",
            "throughput_per_s",
            "load_time_s",
            "peak_rss_bytes",
            "model_size_bytes",
        ):
            assert genai[key] > 0, key
        for key in ("prompt_tok_per_s", "ttft_ms", "prompt_tokens", "context_tokens"):
            assert genai["metrics"][key] > 0 and llama["metrics"][key] > 0, key
        for key in ("perplexity", "kld_mean", "top1_agreement"):
            assert key in genai["accuracy"] and key in llama["accuracy"], key
        # fp32 keeps the model; int4 of a random checkpoint moves it measurably
        assert genai["accuracy"]["kld_mean"] < 0.05, genai["accuracy"]
        assert rows["onnxruntime-genai", "int4"]["accuracy"]["kld_mean"] > 0, rows
        assert genai["environment"]["fidelity.kld_method"] == "topk-tail-sampled"
        provenance = {
            record.name: record.provenance
            for record in store.list_artifacts()
            if record.name.startswith("tiny-qwen3.genai-")
        }
        int4 = provenance["tiny-qwen3.genai-int4.tar"]
        assert int4["block_size"] == 64 and int4["algo"] == "rtn", int4
        assert int4["execution_provider"] == "cpu" and "MatMulNBits" in str(int4["weight_types"])
        check = provenance["tiny-qwen3.genai-fp32.tar"]["logit_check"]
        assert check["format"] == "genai-fp32" and check["relative"] <= check["tolerance"]
