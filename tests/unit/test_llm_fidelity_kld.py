"""The sampled-tail KL divergence, the fidelity settings a result records, and how old
(lower-bound) references are still scored and labelled. Pure numpy, no llama.cpp."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import llm_eval
from agent.llm_eval import (
    KLD_LOWER_BOUND,
    KLD_SAMPLED,
    fidelity_environment,
    fidelity_from_chunks,
    load_llm_reference,
    reference_from_chunks,
    save_llm_reference,
)
from agent.llm_fidelity import log_softmax, sampled_kl, tail_mass, tail_samples, top_k, topk_kl
from coordinator.spec import CampaignSpec
from edgefarm.errors import ArtifactError, SpecError
from results import compare as compare_mod
from results.compare import compare, kld_is_lower_bound, to_markdown
from results.recommend import recommend

VOCAB = 2000


def zipf_logits(rng: np.random.Generator, positions: int) -> np.ndarray:
    """Language-model-like rows: a heavy tail (the top 16 hold well under all the mass)."""
    base = -1.1 * np.log(np.arange(1, VOCAB + 1, dtype=np.float64))
    rows = np.stack([rng.permutation(base) for _ in range(positions)])
    return (rows + rng.standard_normal(rows.shape) * 0.5).astype(np.float32)


def full_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    lp, lq = p.astype(np.float64), q.astype(np.float64)
    return np.sum(np.exp(lp) * (lp - lq), axis=1)


def chunked(rows: np.ndarray, n_ctx: int) -> list[np.ndarray]:
    return [rows[s : s + n_ctx - 1] for s in range(0, len(rows), n_ctx - 1)]


def setup_reference(
    positions: int = 300, n_ctx: int = 61, k: int = 16, m: int = 64, seed: int = 7
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], dict[str, np.ndarray]]:
    """Reference rows, the token stream they score, and the reference arrays."""
    rng = np.random.default_rng(0)
    ref = log_softmax(zipf_logits(rng, positions))
    n_chunks = positions // (n_ctx - 1)
    tokens = rng.integers(0, VOCAB, n_chunks * n_ctx).astype(np.int32)
    chunks = chunked(ref, n_ctx)
    return ref, tokens, chunks, reference_from_chunks(chunks, tokens, n_ctx, k, m, seed)


def perturbed(ref: np.ndarray, scale: float, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(ref.shape) * scale
    return log_softmax(ref + noise.astype(np.float32))


def test_tail_samples_are_systematic_draws_from_the_tail() -> None:
    rng = np.random.default_rng(3)
    lp = log_softmax(zipf_logits(rng, 4))
    ids, _ = top_k(lp, 8)
    m = 50
    drawn, drawn_lp = tail_samples(lp, ids, m, np.random.default_rng(11))
    assert drawn.shape == (4, m) and drawn.dtype == np.int32
    np.testing.assert_array_equal(drawn_lp, np.take_along_axis(lp, drawn.astype(np.int64), 1))
    r = tail_mass(lp, ids)
    for row in range(4):
        assert not set(drawn[row]) & set(ids[row])  # only tail tokens
        share = np.exp(lp[row].astype(np.float64)) / r[row]
        share[ids[row]] = 0.0
        counts = np.bincount(drawn[row], minlength=VOCAB)
        # systematic sampling: each token drawn floor or ceil of its expected count
        assert np.all(counts >= np.floor(share * m) - 1e-9)
        assert np.all(counts <= np.ceil(share * m) + 1e-9)
    again, _ = tail_samples(lp, ids, m, np.random.default_rng(11))
    assert np.array_equal(drawn, again)  # a fixed seed reproduces the reference


def test_tail_mass_is_the_probability_outside_the_top_k() -> None:
    lp = log_softmax(zipf_logits(np.random.default_rng(4), 130))
    ids, vals = top_k(lp, 10)
    expected = np.exp(lp.astype(np.float64)).sum(1) - np.exp(vals.astype(np.float64)).sum(1)
    np.testing.assert_allclose(tail_mass(lp, ids), expected, rtol=1e-6)


def test_sampled_kl_is_close_to_the_full_kl_and_above_the_lower_bound() -> None:
    ref, _, _, reference = setup_reference()
    var = perturbed(ref, 0.3)
    exact = full_kl(ref, var)
    got = fidelity_from_chunks(chunked(var, 61), reference, VOCAB)
    assert got["kld_mean"] == pytest.approx(float(exact.mean()), rel=0.02)
    assert got["kld_p99"] == pytest.approx(float(np.percentile(exact, 99)), rel=0.05)
    ids, vals = reference["ref_topk_ids"], reference["ref_topk_logprob"]
    at = np.take_along_axis(var, ids.astype(np.int64), axis=1)
    lower = topk_kl(vals, at)
    assert lower.mean() < 0.9 * exact.mean()  # the old method reads low on a heavy tail
    per_position = sampled_kl(
        vals,
        at,
        reference["ref_tail_mass"],
        tail_mass(var, ids),
        reference["ref_tail_logprob"],
        np.take_along_axis(var, reference["ref_tail_ids"].astype(np.int64), axis=1),
    )
    assert np.all(per_position >= lower - 1e-12)  # never below the lower bound


def test_the_estimate_is_unbiased_over_seeds() -> None:
    rng = np.random.default_rng(5)
    ref = log_softmax(zipf_logits(rng, 40))
    var = perturbed(ref, 0.8)
    ids, vals = top_k(ref, 4)
    at = np.take_along_axis(var, ids.astype(np.int64), axis=1)
    means = []
    for seed in range(40):
        tids, tlp = tail_samples(ref, ids, 4, np.random.default_rng(seed))
        at_tail = np.take_along_axis(var, tids.astype(np.int64), axis=1)
        kl = sampled_kl(vals, at, tail_mass(ref, ids), tail_mass(var, ids), tlp, at_tail)
        means.append(kl.mean())
    assert np.mean(means) == pytest.approx(full_kl(ref, var).mean(), rel=0.02)


def test_identical_model_scores_exactly_zero() -> None:
    _, _, chunks, reference = setup_reference()
    got = fidelity_from_chunks(chunks, reference, VOCAB)
    assert got["kld_mean"] == 0.0 and got["kld_max"] == 0.0 and got["top1_agreement"] == 1.0
    assert got["ppl_ratio"] == 1.0


def test_results_record_the_fidelity_settings() -> None:
    _, _, chunks, reference = setup_reference(positions=300, n_ctx=61)
    got = fidelity_from_chunks(chunks, reference, VOCAB)
    assert got[llm_eval.FIDELITY_CONTEXT] == 61.0
    assert got[llm_eval.FIDELITY_POSITIONS] == 300.0
    assert got[llm_eval.FIDELITY_CHUNKS] == 5.0
    assert fidelity_environment(reference) == {
        "fidelity.kld_method": KLD_SAMPLED,
        "fidelity.kld_params": "k=16,m=64,sampling=systematic,seed=7",
    }


def test_an_old_reference_still_loads_and_is_scored_as_the_lower_bound(tmp_path: Path) -> None:
    ref, tokens, chunks, _ = setup_reference()
    old = reference_from_chunks(chunks, tokens, 61, 16, 0)
    assert "ref_tail_ids" not in old
    save_llm_reference(tmp_path / "old.npz", old)
    loaded = load_llm_reference(tmp_path / "old.npz")
    var = perturbed(ref, 0.3)
    got = fidelity_from_chunks(chunked(var, 61), loaded, VOCAB)
    ids = old["ref_topk_ids"].astype(np.int64)
    lower = topk_kl(old["ref_topk_logprob"], np.take_along_axis(var, ids, axis=1))
    assert got["kld_mean"] == pytest.approx(float(lower.mean()), rel=1e-12)
    env = fidelity_environment(loaded)
    assert env == {"fidelity.kld_method": KLD_LOWER_BOUND, "fidelity.kld_params": "k=16"}


def test_tail_arrays_round_trip_and_are_checked(tmp_path: Path) -> None:
    _, _, _, reference = setup_reference()
    path = tmp_path / "ref.npz"
    save_llm_reference(path, reference)
    loaded = load_llm_reference(path)
    for name in llm_eval.TAIL_ARRAYS:
        assert np.array_equal(loaded[name], reference[name]), name
    partial = {k: v for k, v in reference.items() if k != "ref_tail_mass"}
    with pytest.raises(ArtifactError, match="incomplete tail samples"):
        save_llm_reference(tmp_path / "partial.npz", partial)
    short = dict(reference, ref_tail_ids=reference["ref_tail_ids"][:, :-1])
    with pytest.raises(ArtifactError, match="ref_tail_ids has shape"):
        save_llm_reference(tmp_path / "short.npz", short)


SPEC = """\
name: llm
models:
  - name: slm
    source: builtin:smollm2-135m
backends:
  - name: llama-cpp
    schemes: [F16]
"""


def test_the_campaign_sets_the_fidelity_context() -> None:
    assert CampaignSpec.from_text(SPEC, "<spec>").fidelity_context_tokens == 512
    spec = CampaignSpec.from_text(
        SPEC + "measurement:\n  fidelity_context_tokens: 256\n  context_tokens: 128\n", "<spec>"
    )
    assert spec.fidelity_context_tokens == 256
    assert spec.variants()[0].settings.context_tokens == 128  # the timing context is apart
    with pytest.raises(SpecError, match="fidelity_context_tokens"):
        CampaignSpec.from_text(SPEC + "measurement:\n  fidelity_context_tokens: 1\n", "<spec>")
    per_backend = SPEC + "    measurement: {fidelity_context_tokens: 256}\n"
    with pytest.raises(SpecError, match="is campaign-wide"):
        CampaignSpec.from_text(per_backend, "<spec>")


def llm_row(scheme: str, p50: float, kld: float, method: str | None) -> dict[str, Any]:
    return {
        "device_name": "pi",
        "device_id": "pi-id",
        "model": "slm",
        "backend": "llama-cpp",
        "scheme": scheme,
        "ok": True,
        "valid": True,
        "lat_p50_ms": p50,
        "batch_size": 1,
        "peak_rss_bytes": 100 << 20,
        "model_size_bytes": 50 << 20,
        "metrics": {"prompt_tok_per_s": 100.0},
        "accuracy": {"kld_mean": kld, "top1_agreement": 0.9},
        "environment": {"fidelity.kld_method": method} if method else {},
    }


def test_compare_and_recommend_label_a_lower_bound_kld() -> None:
    assert compare_mod.KLD_SAMPLED == KLD_SAMPLED  # results mirrors the agent's name
    rows = [
        llm_row("F16", 20.0, 0.0, KLD_SAMPLED),
        llm_row("Q8_0", 15.0, 0.004, KLD_SAMPLED),
        llm_row("Q4_0", 12.0, 0.02, None),  # a row from before the method was recorded
        llm_row("Q4_K_M", 13.0, 0.03, KLD_LOWER_BOUND),
    ]
    assert [kld_is_lower_bound(r) for r in rows] == [False, False, True, True]
    table = to_markdown(compare(rows))
    assert "KLD ≥0.0200" in table and "KLD ≥0.0300" in table and "KLD 0.0040" in table
    rec = recommend(rows, "pi", max_kld=0.025)
    assert rec.best is not None and rec.best.scheme == "Q4_0"
    assert "KLD ≥0.02 (old top-k lower bound" in rec.best.describe()
