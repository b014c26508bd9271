"""Fidelity of a language model variant to its reference: pure numpy, arrays in, dict out.

The reference keeps, for every scored position, not the full distribution but:

- the log-probabilities of its ``k`` most likely tokens (exact head of the KL sum);
- ``m`` token ids drawn from its *tail* (the tokens outside the top-k, with
  probabilities ``p_j / r_p``) by systematic sampling over the tail sorted by
  probability, with their log-probabilities, and the tail mass ``r_p`` itself.

Each entry (an int32 id and a float32 log-probability) is 8 bytes, so k = 64 and
m = 128 cost 1,544 bytes per position (with ``r_p`` as float64) instead of
``4 * n_vocab`` (196 KiB for a 49k-token vocabulary). :func:`sampled_kl` turns them
into an unbiased estimate of the full-vocabulary KL divergence; an old reference
without tail samples is scored with :func:`topk_kl`, a lower bound.

Determinism: a variant whose log-probabilities are bit-identical to the reference's
gives exactly 0.0 divergence, 1.0 agreement and a perplexity ratio of exactly 1.0,
because both sides go through the same operations in the same order.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

# Smallest residual mass used in a logarithm (a residual at or below it is clamped).
RESIDUAL_EPSILON = 1e-10
KLD_PERCENTILE = 99.0
TAIL_MASS_BLOCK = 64  # rows per block when summing tail masses (bounds the float64 copy)


class TailInputs(NamedTuple):
    """Both sides of the tail term of :func:`sampled_kl`, per position."""

    ref_tail_mass: np.ndarray
    var_tail_mass: np.ndarray
    ref_tail_logprob: np.ndarray
    var_logprob_at_tail_ids: np.ndarray


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


def tail_mass(logprobs: np.ndarray, topk_ids: np.ndarray) -> np.ndarray:
    """Per row, the probability outside ``topk_ids`` (float64), summed over the row.

    Computed from the full row (not as ``1 - sum(top-k)``, which loses the small
    tails to rounding) in the same order every time, so identical rows give
    bit-identical masses on the reference and the variant side.
    """
    lp = np.asarray(logprobs, dtype=np.float32)
    ids = np.asarray(topk_ids, dtype=np.int64)
    if lp.ndim != 2 or ids.ndim != 2 or len(ids) != len(lp):
        raise ValueError(
            f"tail_mass needs (positions, vocab) and (positions, k): {lp.shape}, {ids.shape}"
        )
    out = np.empty(len(lp), dtype=np.float64)
    for start in range(0, len(lp), TAIL_MASS_BLOCK):
        block = np.exp(lp[start : start + TAIL_MASS_BLOCK].astype(np.float64))
        np.put_along_axis(block, ids[start : start + TAIL_MASS_BLOCK], 0.0, axis=1)
        out[start : start + TAIL_MASS_BLOCK] = np.sum(block, axis=1)
    return out


def tail_samples(
    logprobs: np.ndarray, topk_ids: np.ndarray, m: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``m`` token ids per row drawn from the tail (the tokens not in ``topk_ids``) with
    probability ``p_j / r_p``, and their log-probabilities (int32, float32; [rows, m]).

    Systematic sampling: the tail is sorted by descending probability (ties by
    ascending id), and the ``m`` points ``(u + i) / m`` (``u`` uniform in [0, 1), one
    draw per row from ``rng``) pick the tokens whose cumulative tail probability
    crosses them. Every point is uniform on its own, so any mean over the samples is
    unbiased; together they cover the tail evenly (a token holding a share ``s`` of the
    tail is drawn ``floor(s * m)`` or ``ceil(s * m)`` times), which keeps the variance low.
    A row without tail mass gets its most likely tail tokens (their weight is zero).
    """
    lp = np.asarray(logprobs, dtype=np.float32)
    ids = np.asarray(topk_ids, dtype=np.int64)
    rows, vocab = lp.shape
    k = ids.shape[1]
    if m < 1:
        raise ValueError(f"the number of tail samples must be at least 1, got {m}")
    if k >= vocab:
        raise ValueError(f"no tail to sample: k={k} covers the vocabulary of {vocab}")
    starts = np.asarray(rng.random(size=rows), dtype=np.float64)
    offsets = (starts[:, None] + np.arange(m)[None, :]) / m
    out_ids = np.empty((rows, m), dtype=np.int32)
    for row in range(rows):
        values = lp[row].copy()
        values[ids[row]] = -np.inf
        order = np.argsort(-values, kind="stable")[: vocab - k]  # ties: ascending id
        probs = np.exp(values[order].astype(np.float64))
        cdf = np.cumsum(probs)
        if cdf[-1] > 0:
            picks = np.searchsorted(cdf / cdf[-1], offsets[row], side="right")
        else:
            picks = np.arange(m) % len(order)
        out_ids[row] = order[np.minimum(picks, len(order) - 1)]
    return out_ids, np.take_along_axis(lp, out_ids.astype(np.int64), axis=1)


def sampled_kl(
    ref_topk_logprob: np.ndarray,
    var_logprob_at_ref_ids: np.ndarray,
    ref_tail_mass: np.ndarray,
    var_tail_mass: np.ndarray,
    ref_tail_logprob: np.ndarray,
    var_logprob_at_tail_ids: np.ndarray,
) -> np.ndarray:
    """Per-position KL(P_ref || Q_variant): exact over the top-k, sampled over the tail.

    The full KL splits exactly into the top-k terms, the coarsened residual term and
    the tails' own divergence (``r_p``, ``r_q``: both models' mass outside the
    reference's top-k; ``P_t``, ``Q_t``: their renormalised tails)::

        KL = sum_i p_i (log p_i - log q_i) + r_p log(r_p / r_q) + r_p KL(P_t || Q_t)

    The first two terms are :func:`topk_kl` (computed here with the exact masses).
    With ``v_j = (q_j / r_q) / (p_j / r_p)``, ``E_{P_t}[v] = 1``, so
    ``KL(P_t || Q_t) = E_{P_t}[-log v] = E_{P_t}[v - 1 - log v]``; the last form (a
    control variate with known mean) is estimated by the mean over the tail samples
    drawn from ``P_t`` (:func:`tail_samples`). Each term ``v - 1 - log v`` is >= 0 and
    second order in the log-ratio, so the estimate is unbiased, never below the
    :func:`topk_kl` lower bound, and of far lower variance than the plain
    ``r_p * mean(log p_j - log q_j)``. Sums in float64; exactly 0 when Q == P.
    """
    lp = np.asarray(ref_topk_logprob, dtype=np.float64)
    lq = np.asarray(var_logprob_at_ref_ids, dtype=np.float64)
    tp = np.asarray(ref_tail_logprob, dtype=np.float64)
    tq = np.asarray(var_logprob_at_tail_ids, dtype=np.float64)
    if lp.shape != lq.shape or tp.shape != tq.shape or lp.ndim != 2 or tp.ndim != 2:
        raise ValueError(
            f"top-k or tail shapes differ or are not 2-D: {lp.shape} vs {lq.shape}, "
            f"{tp.shape} vs {tq.shape}"
        )
    r_p = np.maximum(np.asarray(ref_tail_mass, dtype=np.float64), RESIDUAL_EPSILON)
    r_q = np.maximum(np.asarray(var_tail_mass, dtype=np.float64), RESIDUAL_EPSILON)
    if r_p.shape != (len(lp),) or r_q.shape != (len(lp),) or len(tp) != len(lp):
        raise ValueError(f"tail masses and samples must have one row per position ({len(lp)})")
    head = np.sum(np.exp(lp) * (lp - lq), axis=1)
    log_ratio = np.log(r_p) - np.log(r_q)
    log_v = tq - tp + log_ratio[:, None]
    gap = np.mean(np.expm1(log_v) - log_v, axis=1)
    kl: np.ndarray = np.maximum(head + r_p * log_ratio + r_p * np.maximum(gap, 0.0), 0.0)
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
    tail: TailInputs | None = None,
) -> dict[str, float]:
    """A variant's fidelity to the reference over P scored positions.

    Inputs are per position: the log-probability each model gives the true next token,
    the reference's top-k ids and log-probabilities (column 0 its argmax), the
    variant's log-probabilities at those ids, and the variant's argmax token; ``tail``
    the tail masses and samples of both (then the KL is :func:`sampled_kl`, else the
    :func:`topk_kl` lower bound).

    Returns ``perplexity`` (the variant's), ``reference_perplexity``, ``ppl_ratio``
    (variant / reference), ``kld_mean``, ``kld_p99`` and ``kld_max`` (per-position KL),
    ``top1_agreement`` (share of positions where the two argmaxes agree) and
    ``examples`` (P).
    """
    n = len(ref_target_logprob)
    arrays = (ref_topk_ids, ref_topk_logprob, var_target_logprob, var_logprob_at_ref_ids)
    if n == 0 or any(len(a) != n for a in (*arrays, var_top1_ids)):
        raise ValueError(f"fidelity needs equally long, non-empty inputs ({n} positions)")
    if tail is None:
        kl = topk_kl(ref_topk_logprob, var_logprob_at_ref_ids)
    else:
        if any(len(a) != n for a in tail):
            raise ValueError(f"tail inputs must have one row per position ({n})")
        kl = sampled_kl(ref_topk_logprob, var_logprob_at_ref_ids, *tail)
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
