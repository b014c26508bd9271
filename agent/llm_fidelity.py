"""Fidelity of a language model variant to its reference: pure numpy, arrays in, dict out.

The reference keeps, for every scored position, only the log-probabilities of its
``k`` most likely tokens (and of the true next token), not the full distribution:
``k`` ids (int32) and ``k`` log-probabilities (float32) are 8 bytes per entry, so
k = 32 costs 256 bytes per position instead of ``4 * n_vocab`` (196 KiB for a
49k-token vocabulary). The KL divergence is then computed over k + 1 outcomes (see
:func:`topk_kl`).

Determinism: a variant whose log-probabilities are bit-identical to the reference's
gives exactly 0.0 divergence, 1.0 agreement and a perplexity ratio of exactly 1.0,
because both sides go through the same operations in the same order.
"""

from __future__ import annotations

import math

import numpy as np

# Smallest residual mass used in a logarithm (a residual at or below it is clamped).
RESIDUAL_EPSILON = 1e-10
KLD_PERCENTILE = 99.0


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32, computed the same way every time."""
    x = np.asarray(logits, dtype=np.float32)
    shifted = x - np.max(x, axis=-1, keepdims=True)
    total = np.sum(np.exp(shifted), axis=-1, keepdims=True, dtype=np.float32)
    out: np.ndarray = shifted - np.log(total)
    return out


def top_k(logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most likely token ids per row (int32) and their log-probabilities (float32).

    Ordered by descending log-probability, ties by ascending id, so column 0 is
    ``argmax`` of the row.
    """
    lp = np.asarray(logprobs, dtype=np.float32)
    if lp.ndim != 2:
        raise ValueError(f"logprobs must be (positions, vocab), got shape {lp.shape}")
    vocab = lp.shape[1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be between 1 and the vocabulary size {vocab}, got {k}")
    if k < vocab:
        cand = np.argpartition(-lp, k - 1, axis=1)[:, :k]
    else:
        cand = np.broadcast_to(np.arange(vocab), lp.shape)
    vals = np.take_along_axis(lp, cand, axis=1)
    order = np.lexsort((cand, -vals), axis=1)
    ids = np.take_along_axis(cand, order, axis=1).astype(np.int32)
    # When the row's maximum is tied k times or more, the partition may have left out
    # the first maximal id; column 0 is argmax by definition (a tied id makes way).
    ids[:, 0] = np.argmax(lp, axis=1)
    return ids, np.take_along_axis(lp, ids, axis=1).astype(np.float32)


def topk_kl(ref_topk_logprob: np.ndarray, var_logprob_at_ref_ids: np.ndarray) -> np.ndarray:
    """Per-position KL(P_ref || Q_variant) over the reference's top-k plus the residual.

    With ``p_i``, ``q_i`` the two models' probabilities of the reference's top-k tokens
    and the residual masses ``r_p = 1 - sum p_i``, ``r_q = 1 - sum q_i`` (clamped to
    :data:`RESIDUAL_EPSILON`)::

        KL_k = sum_i p_i (log p_i - log q_i) + r_p (log r_p - log r_q)

    This is the exact KL divergence between the two distributions coarsened to k + 1
    outcomes (each top-k token, and "any other token"). So, per position:

    - ``0 <= KL_k <= KL_full`` (data-processing inequality): it never overstates;
    - ``KL_full - KL_k = r_p * KL(P_tail || Q_tail)`` where the tails are the two
      distributions over the other tokens, renormalised; this gap is at most
      ``r_p * max_j log((p_j / r_p) / (q_j / r_q))`` over the other tokens ``j``, so it
      is small when the reference puts little mass outside its top-k;
    - it is exact when Q's tail is proportional to P's (in particular when Q == P).

    The sums run in float64 over the float32 inputs; negative rounding residue is
    clipped to 0.
    """
    lp = np.asarray(ref_topk_logprob, dtype=np.float64)
    lq = np.asarray(var_logprob_at_ref_ids, dtype=np.float64)
    if lp.shape != lq.shape or lp.ndim != 2:
        raise ValueError(f"top-k shapes differ or are not 2-D: {lp.shape} vs {lq.shape}")
    p = np.exp(lp)
    head = np.sum(p * (lp - lq), axis=1)
    r_p = np.maximum(1.0 - np.sum(p, axis=1), RESIDUAL_EPSILON)
    r_q = np.maximum(1.0 - np.sum(np.exp(lq), axis=1), RESIDUAL_EPSILON)
    tail = r_p * (np.log(r_p) - np.log(r_q))
    kl: np.ndarray = np.maximum(head + tail, 0.0)
    return kl


def perplexity(target_logprob: np.ndarray) -> float:
    """exp of the mean negative log-likelihood of the true next tokens."""
    lp = np.asarray(target_logprob, dtype=np.float64)
    if lp.size == 0:
        raise ValueError("perplexity needs at least one scored position")
    return math.exp(-float(np.mean(lp)))


def fidelity_metrics(
    ref_target_logprob: np.ndarray,
    ref_topk_ids: np.ndarray,
    ref_topk_logprob: np.ndarray,
    var_target_logprob: np.ndarray,
    var_logprob_at_ref_ids: np.ndarray,
    var_top1_ids: np.ndarray,
) -> dict[str, float]:
    """A variant's fidelity to the reference over P scored positions.

    Inputs are per position: the log-probability each model gives the true next token,
    the reference's top-k ids and log-probabilities (column 0 its argmax), the
    variant's log-probabilities at those ids, and the variant's argmax token.

    Returns ``perplexity`` (the variant's), ``reference_perplexity``, ``ppl_ratio``
    (variant / reference), ``kld_mean`` and ``kld_p99`` (of :func:`topk_kl`),
    ``kld_max``, ``top1_agreement`` (share of positions where the two argmaxes agree)
    and ``examples`` (P).
    """
    n = len(ref_target_logprob)
    arrays = (ref_topk_ids, ref_topk_logprob, var_target_logprob, var_logprob_at_ref_ids)
    if n == 0 or any(len(a) != n for a in (*arrays, var_top1_ids)):
        raise ValueError(f"fidelity needs equally long, non-empty inputs ({n} positions)")
    kl = topk_kl(ref_topk_logprob, var_logprob_at_ref_ids)
    ppl = perplexity(var_target_logprob)
    ref_ppl = perplexity(ref_target_logprob)
    agree = np.asarray(var_top1_ids) == np.asarray(ref_topk_ids)[:, 0]
    return {
        "perplexity": ppl,
        "reference_perplexity": ref_ppl,
        "ppl_ratio": ppl / ref_ppl,
        "kld_mean": float(np.mean(kl)),
        "kld_p99": float(np.percentile(kl, KLD_PERCENTILE)),
        "kld_max": float(np.max(kl)),
        "top1_agreement": float(np.mean(agree)),
        "examples": float(n),
    }
