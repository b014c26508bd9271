"""The LLM fidelity math (pure numpy) and the reference file, without llama.cpp."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from agent.llm_eval import load_llm_reference, save_llm_reference
from agent.llm_fidelity import (
    fidelity_metrics,
    log_softmax,
    perplexity,
    top_k,
    topk_kl,
)
from edgefarm.errors import ArtifactError

VOCAB = 500
K = 32


def random_logits(rng: np.random.Generator, positions: int, scale: float = 3.0) -> np.ndarray:
    return (rng.standard_normal((positions, VOCAB)) * scale).astype(np.float32)


def full_kl(p_logprob: np.ndarray, q_logprob: np.ndarray) -> np.ndarray:
    """KL(P || Q) over the whole vocabulary, in float64."""
    lp = p_logprob.astype(np.float64)
    lq = q_logprob.astype(np.float64)
    return np.sum(np.exp(lp) * (lp - lq), axis=1)


def metrics_of(ref_lp: np.ndarray, var_lp: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    ids, vals = top_k(ref_lp, K)
    rows = np.arange(len(targets))
    return fidelity_metrics(
        ref_lp[rows, targets],
        ids,
        vals,
        var_lp[rows, targets],
        np.take_along_axis(var_lp, ids.astype(np.int64), axis=1),
        np.argmax(var_lp, axis=1),
    )


def test_log_softmax_is_a_float32_log_distribution() -> None:
    logits = random_logits(np.random.default_rng(0), 7)
    lp = log_softmax(logits)
    assert lp.dtype == np.float32
    np.testing.assert_allclose(np.exp(lp.astype(np.float64)).sum(axis=1), 1.0, atol=1e-5)
    exact = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(1))[:, None]
    np.testing.assert_allclose(lp, exact, atol=1e-5)
    assert np.array_equal(log_softmax(logits.copy()), lp)  # the same way every time


def test_top_k_is_sorted_and_starts_with_argmax() -> None:
    lp = log_softmax(random_logits(np.random.default_rng(1), 5))
    ids, vals = top_k(lp, K)
    assert ids.shape == vals.shape == (5, K) and ids.dtype == np.int32
    assert np.array_equal(ids[:, 0], np.argmax(lp, axis=1))
    assert np.all(np.diff(vals, axis=1) <= 0)
    assert np.array_equal(vals, np.take_along_axis(lp, ids.astype(np.int64), axis=1))
    assert np.array_equal(np.sort(vals, axis=1)[:, ::-1], -np.sort(-lp, axis=1)[:, :K])
    ties = np.zeros((1, 10), dtype=np.float32)  # all equal: ascending ids, like argmax
    assert top_k(ties, 4)[0].tolist() == [[0, 1, 2, 3]]


def test_identical_logprobs_give_exactly_zero_divergence() -> None:
    rng = np.random.default_rng(2)
    lp = log_softmax(random_logits(rng, 40))
    targets = rng.integers(0, VOCAB, 40)
    got = metrics_of(lp, lp.copy(), targets)
    assert got["kld_mean"] == 0.0
    assert got["kld_p99"] == 0.0
    assert got["kld_max"] == 0.0
    assert got["top1_agreement"] == 1.0
    assert got["ppl_ratio"] == 1.0
    assert got["perplexity"] == got["reference_perplexity"]
    assert got["examples"] == 40.0


def test_a_perturbed_variant_is_within_the_documented_bound_of_the_full_kl() -> None:
    rng = np.random.default_rng(3)
    logits = random_logits(rng, 64)
    ref = log_softmax(logits)
    var = log_softmax(logits + rng.standard_normal(logits.shape).astype(np.float32) * 0.3)
    ids, vals = top_k(ref, K)
    est = topk_kl(vals, np.take_along_axis(var, ids.astype(np.int64), axis=1))
    full = full_kl(ref, var)
    assert np.all(est > 0)
    # 0 <= KL_full - KL_k <= r_p * max over the tail of log((p_j / r_p) / (q_j / r_q))
    p, q = np.exp(ref.astype(np.float64)), np.exp(var.astype(np.float64))
    in_top = np.zeros_like(p, dtype=bool)
    np.put_along_axis(in_top, ids.astype(np.int64), True, axis=1)
    r_p = np.where(in_top, 0.0, p).sum(1)
    r_q = np.where(in_top, 0.0, q).sum(1)
    ratio = np.log((p / r_p[:, None]) / (q / r_q[:, None]))
    bound = r_p * np.where(in_top, -np.inf, ratio).max(1)
    gap = full - est
    assert np.all(gap >= -1e-6)
    assert np.all(gap <= bound + 1e-6)
    metrics = metrics_of(ref, var, rng.integers(0, VOCAB, 64))
    assert metrics["kld_mean"] == pytest.approx(float(np.mean(est)))
    assert 0 < metrics["kld_mean"] <= metrics["kld_p99"] <= metrics["kld_max"]
    assert metrics["top1_agreement"] < 1.0


def test_the_estimate_is_exact_when_the_tails_are_proportional() -> None:
    rng = np.random.default_rng(4)
    logits = random_logits(rng, 8).astype(np.float64)
    ref = logits - np.log(np.exp(logits).sum(1, keepdims=True))  # float64: sums to 1
    ids, _ = top_k(ref.astype(np.float32), K)
    var = ref.copy()  # change only the top-k, then renormalise: the tail keeps its shape
    head = np.take_along_axis(var, ids.astype(np.int64), axis=1)
    np.put_along_axis(var, ids.astype(np.int64), head + rng.normal(0, 0.5, head.shape), axis=1)
    var -= np.log(np.exp(var).sum(1, keepdims=True))
    est = topk_kl(
        np.take_along_axis(ref, ids.astype(np.int64), axis=1),
        np.take_along_axis(var, ids.astype(np.int64), axis=1),
    )
    np.testing.assert_allclose(est, full_kl(ref, var), rtol=1e-9, atol=1e-12)


def test_perplexity_and_agreement_on_a_hand_built_example() -> None:
    # 4 positions, vocabulary of 3; the true next token gets 1/2, 1/4, 1/2, 1/4
    probs = np.array([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]])
    targets = np.array([0, 1, 1, 0])
    assert perplexity(np.log(probs[np.arange(4), targets])) == pytest.approx(
        math.sqrt(8)  # exp(-(2 ln 1/2 + 2 ln 1/4) / 4) = 2^1.5
    )
    ref = np.log(probs).astype(np.float32)
    var = ref.copy()
    var[3] = np.log([0.5, 0.25, 0.25])  # the last position's argmax moves from 2 to 0
    ids, vals = top_k(ref, 3)
    got = fidelity_metrics(
        ref[np.arange(4), targets],
        ids,
        vals,
        var[np.arange(4), targets],
        np.take_along_axis(var, ids.astype(np.int64), axis=1),
        np.argmax(var, axis=1),
    )
    assert got["top1_agreement"] == 0.75
    # position 3: KL([.25,.25,.5] || [.5,.25,.25]) = .25 ln .5 + .5 ln 2 = .25 ln 2
    assert got["kld_max"] == pytest.approx(0.25 * math.log(2), rel=1e-6)
    assert got["kld_mean"] == pytest.approx(0.25 * math.log(2) / 4, rel=1e-6)
    assert got["ppl_ratio"] == pytest.approx(
        perplexity(var[np.arange(4), targets]) / perplexity(ref[np.arange(4), targets])
    )


def test_mismatched_inputs_are_rejected() -> None:
    with pytest.raises(ValueError):
        topk_kl(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError):
        perplexity(np.zeros(0))
    with pytest.raises(ValueError):
        fidelity_metrics(
            np.zeros(2),
            np.zeros((3, 1)),
            np.zeros((3, 1)),
            np.zeros(3),
            np.zeros((3, 1)),
            np.zeros(1),
        )


def reference_arrays(n_tokens: int = 23, n_ctx: int = 8) -> dict[str, np.ndarray]:
    """Reference arrays as build_reference lays them out, from random logits."""
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, VOCAB, n_tokens).astype(np.int32)
    targets = np.concatenate([tokens[s + 1 : s + n_ctx] for s in range(0, n_tokens, n_ctx)])
    lp = log_softmax(random_logits(rng, len(targets)))
    ids, vals = top_k(lp, 4)
    return {
        "tokens": tokens,
        "targets": targets.astype(np.int32),
        "ref_target_logprob": lp[np.arange(len(targets)), targets],
        "ref_topk_ids": ids,
        "ref_topk_logprob": vals,
        "n_ctx": np.array(n_ctx, dtype=np.int32),
        "top_k": np.array(4, dtype=np.int32),
    }


def test_the_reference_file_round_trips(tmp_path: Path) -> None:
    arrays = reference_arrays()
    path = tmp_path / "ref.npz"
    save_llm_reference(path, arrays)
    loaded = load_llm_reference(path)
    assert str(loaded["kind"]) == "llm"
    for name, value in arrays.items():
        assert np.array_equal(loaded[name], value), name


def test_unusable_reference_files_are_artifact_errors(tmp_path: Path) -> None:
    arrays = reference_arrays()
    bad = dict(arrays, ref_topk_ids=arrays["ref_topk_ids"][:-1])
    with pytest.raises(ArtifactError, match="ref_topk_ids has shape"):
        save_llm_reference(tmp_path / "bad.npz", bad)
    classification = tmp_path / "digits.npz"
    np.savez(classification, inputs=np.zeros((2, 3)), labels=np.zeros(2), reference=np.zeros(2))
    with pytest.raises(ArtifactError, match="lacks array"):
        load_llm_reference(classification)
    shifted = dict(arrays, targets=np.roll(arrays["targets"], 1))
    with pytest.raises(ArtifactError, match="targets do not follow tokens"):
        save_llm_reference(tmp_path / "shifted.npz", shifted)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match="cannot read"):
        load_llm_reference(tmp_path / "junk.npz")
