"""Fidelity through a server: does the endpoint serve the model the reference was made of?

One non-streaming legacy completion (``POST {base}/completions``) over a chunk of the
reference's evaluation text with ``echo: true`` and ``logprobs: k`` returns, for every
prompt token, the server's tokenization and its top-k next-token log-probabilities
(llama.cpp's server needs ``logits_all`` for it; vLLM answers it as it is). Positions
are matched to the reference's by token text (the reference carries its vocabulary):
scoring stops where the server tokenizes the text differently. Per scored position:

- top-1 agreement: the server's most likely next token is the reference's;
- KL divergence over the server's top-k: the reference and the served distributions
  renormalized over the k tokens the server returned (a reference token outside its
  own top list gets the list's smallest log-probability, an upper bound).

A server that silently serves another model (or a broken quantization) shows as low
agreement and high divergence. The chat template is not exercised here (raw text); the
load levels exercise it.
"""

from __future__ import annotations

import http.client
import json
import math

import numpy as np

from agent.backends.serving import Endpoint
from agent.llm_eval import VOCAB_ARRAYS
from edgefarm.errors import ServingFailed

TOP_K = 5  # the most log-probabilities OpenAI's legacy completions return per token
MAX_RESPONSE_BYTES = 32 << 20
SERVED_KLD_METHOD = "served-topk-renormalized"


def request_logprobs(
    endpoint: Endpoint, text: str, k: int = TOP_K, timeout_s: float = 120.0
) -> tuple[list[str], list[dict[str, float] | None]]:
    """The server's prompt tokens and each one's top-``k`` alternatives (None for the
    first); ServingFailed naming what the server did instead."""
    _, netloc, _, prefix, _ = endpoint.parts()
    body = json.dumps(
        {
            "model": endpoint.model,
            "prompt": text,
            "max_tokens": 1,
            "echo": True,
            "logprobs": k,
            "temperature": 0,
        }
    )
    headers = {"Content-Type": "application/json", "Host": netloc}
    if endpoint.api_key:
        headers["Authorization"] = f"Bearer {endpoint.api_key}"
    conn = endpoint.connection(timeout_s)
    try:
        conn.request("POST", f"{prefix}/completions", body=body, headers=headers)
        response = conn.getresponse()
        raw = response.read(MAX_RESPONSE_BYTES + 1)
    except (OSError, http.client.HTTPException) as err:
        raise ServingFailed(f"prompt log-probabilities: {type(err).__name__}: {err}") from None
    finally:
        conn.close()
    if len(raw) > MAX_RESPONSE_BYTES:
        raise ServingFailed(f"prompt log-probabilities: answer over {MAX_RESPONSE_BYTES} bytes")
    if response.status != 200:
        detail = " ".join(raw[:200].decode("utf-8", "replace").split())
        raise ServingFailed(f"prompt log-probabilities: HTTP {response.status}: {detail}")
    try:
        logprobs = json.loads(raw)["choices"][0]["logprobs"]
        tokens = [str(t) for t in logprobs["tokens"]]
        top = [
            None if entry is None else {str(t): float(v) for t, v in entry.items()}
            for entry in logprobs["top_logprobs"]
        ]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise ServingFailed(
            "prompt log-probabilities: the answer has no choices[0].logprobs tokens and "
            "top_logprobs (the server does not return prompt log-probabilities)"
        ) from None
    return tokens, top


def _pieces(reference: dict[str, np.ndarray], ids: np.ndarray) -> list[str]:
    data, offsets = reference["vocab_bytes"], reference["vocab_offsets"]
    return [data[offsets[i] : offsets[i + 1]].tobytes().decode("utf-8", "replace") for i in ids]


def score_chunk(
    reference: dict[str, np.ndarray],
    chunk: int,
    tokens: list[str],
    top: list[dict[str, float] | None],
    shift: int = 0,
    k: int = TOP_K,
) -> tuple[list[float], list[float]]:
    """Per matched position of reference ``chunk``: (top-1 agreement 1/0, KL over the
    server's top-k). Positions are matched by token text from the chunk's first text
    token; the walk stops at the first token the server tokenized differently.

    ``shift`` 0: ``top[j]`` is the distribution of token ``j`` given the tokens before it
    (OpenAI's meaning); 1: of the token after ``j`` (llama-cpp-python 0.3's echo)."""
    n_ctx = int(reference["n_ctx"])
    seq = np.asarray(reference["tokens"])
    ids = seq[chunk * n_ctx : (chunk + 1) * n_ctx]
    pieces = _pieces(reference, ids)
    first = next((i for i, p in enumerate(pieces) if p), len(pieces))  # skip BOS & co
    position0 = sum(min(n_ctx, len(seq) - c * n_ctx) - 1 for c in range(chunk))
    agree: list[float] = []
    kld: list[float] = []
    for j, piece in enumerate(pieces[first:]):
        if j >= len(tokens) or tokens[j] != piece:
            break
        served = top[j] if j < len(top) else None
        local = first + j - 1 + shift  # the chunk position whose prediction top[j] is
        if not served or not 0 <= local < len(ids) - 1:
            continue
        ref_ids = reference["ref_topk_ids"][position0 + local]
        ref_lp = reference["ref_topk_logprob"][position0 + local]
        ref_by_text: dict[str, float] = {}
        for text, lp in zip(_pieces(reference, ref_ids), ref_lp, strict=True):
            ref_by_text.setdefault(text, float(lp))
        best = sorted(served.items(), key=lambda item: -item[1])[:k]
        agree.append(1.0 if best[0][0] == _pieces(reference, ref_ids[:1])[0] else 0.0)
        floor = float(ref_lp[-1])
        kld.append(
            _renormalized_kl([ref_by_text.get(t, floor) for t, _ in best], [v for _, v in best])
        )
    return agree, kld


def _renormalized_kl(ref: list[float], served: list[float]) -> float:
    """KL(ref || served) with both renormalized over the same tokens (log-probs in)."""
    p = np.exp(np.asarray(ref) - max(ref))
    q = np.exp(np.asarray(served) - max(served))
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * (np.log(p) - np.log(q))))


def served_fidelity(
    endpoint: Endpoint,
    reference: dict[str, np.ndarray],
    chunks: int = 1,
    shift: int | None = None,
) -> dict[str, float]:
    """Top-1 agreement and top-k KLD of ``endpoint`` against the reference over its
    first ``chunks`` chunks (accuracy keys ``served_*``); empty without a vocabulary.

    ``shift`` (see :func:`score_chunk`): the server's alignment of its echoed
    log-probabilities when known; None tries both and keeps the one that agrees better
    (a server serving another model agrees with neither), reported as
    ``served_logprob_shift``."""
    if any(name not in reference for name in VOCAB_ARRAYS):
        return {}
    n_ctx = int(reference["n_ctx"])
    seq = np.asarray(reference["tokens"])
    answers = []
    for chunk in range(min(chunks, math.ceil(len(seq) / n_ctx))):
        ids = seq[chunk * n_ctx : (chunk + 1) * n_ctx]
        answers.append((chunk, *request_logprobs(endpoint, "".join(_pieces(reference, ids)))))
    scored = {}
    for candidate in (0, 1) if shift is None else (shift,):
        agree: list[float] = []
        kld: list[float] = []
        for chunk, tokens, top in answers:
            a, d = score_chunk(reference, chunk, tokens, top, candidate)
            agree += a
            kld += d
        scored[candidate] = (agree, kld)
    shift = max(scored, key=lambda c: float(np.mean(scored[c][0])) if scored[c][0] else -1.0)
    agree, kld = scored[shift]
    if not agree:
        raise ServingFailed(
            "prompt log-probabilities: no position matched the reference's tokens "
            "(the server tokenizes the text differently: another model?)"
        )
    ordered = sorted(kld)
    return {
        "served_top1_agreement": float(np.mean(agree)),
        "served_kld_topk_mean": float(np.mean(kld)),
        "served_kld_topk_p99": float(
            ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
        ),
        "served_fidelity_positions": float(len(agree)),
        "served_top_k": float(TOP_K),
        "served_logprob_shift": float(shift),
    }
