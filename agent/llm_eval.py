"""Evaluating a GGUF language model with llama.cpp: the reference and a variant's fidelity.

Shared by the agent's llama.cpp backend (which measures a variant against a reference)
and the coordinator's reference task (which builds the reference from the
full-precision model). Both open the model with :func:`open_llama`, so both batch
identically: one chunk of ``n_ctx`` tokens is one llama.cpp batch and one micro-batch.
Identical weights then give bit-identical logits on the same build and CPU.

The token sequence is scored in consecutive, non-overlapping chunks of ``n_ctx``
tokens with a cleared KV cache per chunk (as llama.cpp's ``perplexity`` tool does);
within a chunk, every position after the first predicts the next token.

The reference file is an ``.npz`` with arrays ``kind`` (``"llm"``), ``tokens``,
``targets``, ``ref_target_logprob``, ``ref_topk_ids``, ``ref_topk_logprob``, ``n_ctx``
and ``top_k``, and (since the sampled-tail KL) ``ref_tail_ids``, ``ref_tail_logprob``,
``ref_tail_mass``, ``tail_samples`` and ``tail_seed`` (see :func:`build_reference`).
A reference without the tail arrays still loads; its KL divergence is the top-k +
residual lower bound, and every result says which method scored it
(:func:`fidelity_environment`).
"""

from __future__ import annotations

import statistics
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from agent import llm_fidelity
from agent.backends.base import one_line
from agent.backends.gguf_check import check_gguf
from edgefarm.domain import MeasureSettings
from edgefarm.errors import ArtifactError, ModelLoadError, TaskError

if TYPE_CHECKING:
    from llama_cpp import Llama

PROMPT_REPEATS = 3  # prompt runs behind prompt_tok_per_s and ttft_ms (median)

# The token stream when a task has no eval text: any fixed text will do.
FALLBACK_TEXT = (
    "The river rose slowly through the night, and by morning the low fields along the "
    "valley were under water. Farmers moved their animals to the higher pastures, while "
    "the ferryman tied his boat to the old oak and waited for the current to ease. "
    "In the town, the baker opened early, as he always did, and the smell of bread "
    "drifted across the square where children watched the brown water pass the bridge. "
)

S = TypeVar("S")
R = TypeVar("R")

LLM_KIND = "llm"
# Reference size and KL estimator, chosen by measurement (benchmarks/kld_accuracy.py):
# mean within 2% and p99 within 5% of the full-vocabulary KL on SmolLM2's variants.
DEFAULT_TOP_K = 64
DEFAULT_TAIL_SAMPLES = 128
TAIL_SEED = 20261214  # systematic sampling offsets; fixed so references are reproducible
KLD_SAMPLED = "topk-tail-sampled"  # exact top-k + unbiased sampled tail
KLD_LOWER_BOUND = "topk-residual-lower-bound"  # old references: top-k + residual
# The settings perplexity, KLD and top-1 were scored with (accuracy keys, not timings).
FIDELITY_CONTEXT = "fidelity_context_tokens"
FIDELITY_POSITIONS = "fidelity_positions"
FIDELITY_CHUNKS = "fidelity_chunks"
LLAMA_SEED = 1234  # sampler seed (sampling is greedy here; fixed for reproducibility)
REFERENCE_ARRAYS = (
    "kind",
    "tokens",
    "targets",
    "ref_target_logprob",
    "ref_topk_ids",
    "ref_topk_logprob",
    "n_ctx",
    "top_k",
)
TAIL_ARRAYS = ("ref_tail_ids", "ref_tail_logprob", "ref_tail_mass", "tail_samples", "tail_seed")
# The reference model's vocabulary as text pieces (``vocab_bytes`` uint8, every token's
# bytes one after another, special tokens empty; ``vocab_offsets`` int64, n_vocab + 1):
# lets an agent without a tokenizer (a serving endpoint's) turn reference tokens into
# prompts and name the reference's top tokens. Optional: older references lack it.
VOCAB_ARRAYS = ("vocab_bytes", "vocab_offsets")


def open_llama(model_path: Path, n_ctx: int, threads: int, logits_all: bool) -> Llama:
    """Validate the GGUF (:func:`check_gguf`), then load it with llama-cpp-python.

    ``n_batch`` and ``n_ubatch`` both equal ``n_ctx``: any sequence up to the context
    length is evaluated as a single micro-batch, the same way wherever it is opened.
    Raises :class:`ModelLoadError` when the file is invalid or llama.cpp refuses it.
    """
    if n_ctx < 2:
        raise ModelLoadError(f"n_ctx must be at least 2, got {n_ctx}")
    if threads < 1:
        raise ModelLoadError(f"threads must be at least 1, got {threads}")
    check_gguf(model_path)
    import llama_cpp

    try:
        return llama_cpp.Llama(
            model_path=str(model_path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=logits_all,
            seed=LLAMA_SEED,
            verbose=False,
        )
    except (ValueError, RuntimeError, OSError) as err:
        raise ModelLoadError(
            one_line(f"llama.cpp could not load {model_path.name}: {err}")
        ) from err


def chunk_logprobs(llm: Llama, tokens: np.ndarray, n_ctx: int) -> Iterator[np.ndarray]:
    """Float32 log-softmax rows for each chunk of ``n_ctx`` tokens, in order.

    Each chunk is evaluated from an empty KV cache; its rows predict the chunk's
    tokens ``[1:]`` (shape ``[chunk_len - 1, n_vocab]``). A final chunk of a single
    token predicts nothing and is skipped. ``llm`` must be opened with
    ``logits_all=True`` and a context of at least ``n_ctx``.
    """
    if not getattr(llm, "_logits_all", True):
        raise ValueError("chunk_logprobs needs a model opened with logits_all=True")
    if llm.n_ctx() < n_ctx:
        raise ValueError(f"the model's context {llm.n_ctx()} is shorter than n_ctx={n_ctx}")
    seq = np.asarray(tokens, dtype=np.int64).ravel()
    check_token_ids(seq, llm.n_vocab(), "token")
    for start in range(0, len(seq), n_ctx):
        chunk = seq[start : start + n_ctx]
        if len(chunk) < 2:
            break
        llm.reset()
        llm._ctx.kv_cache_clear()
        llm.eval(chunk.tolist())
        yield llm_fidelity.log_softmax(llm.scores[: len(chunk) - 1])


def check_token_ids(ids: np.ndarray, n_vocab: int, what: str) -> None:
    """Raise ValueError unless every id is a token of an ``n_vocab``-token vocabulary."""
    ids = np.asarray(ids)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= n_vocab):
        raise ValueError(
            f"{what} ids span {int(ids.min())}..{int(ids.max())}, "
            f"outside the vocabulary of {n_vocab} tokens"
        )


def _targets(tokens: np.ndarray, n_ctx: int) -> np.ndarray:
    """The next-token id of every scored position, chunk by chunk."""
    seq = np.asarray(tokens).ravel()
    parts = [seq[s + 1 : s + n_ctx] for s in range(0, len(seq), n_ctx)]
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)


def build_reference(
    llm: Llama,
    tokens: np.ndarray,
    n_ctx: int,
    top_k: int = DEFAULT_TOP_K,
    tail_samples: int = DEFAULT_TAIL_SAMPLES,
    seed: int = TAIL_SEED,
) -> dict[str, np.ndarray]:
    """The reference arrays of ``tokens`` under ``llm`` (see the module docstring).

    ``targets`` (int32, [P]): the next token of each scored position;
    ``ref_target_logprob`` (float32, [P]); ``ref_topk_ids`` (int32, [P, k], column 0
    the argmax); ``ref_topk_logprob`` (float32, [P, k]); ``n_ctx`` and ``top_k``
    (int32 scalars); ``tokens`` (int32) and ``kind``. With ``tail_samples`` m > 0:
    ``ref_tail_ids`` (int32, [P, m]) and ``ref_tail_logprob`` (float32, [P, m]) drawn
    by :func:`agent.llm_fidelity.tail_samples` with ``seed``, ``ref_tail_mass``
    (float64, [P]), ``tail_samples`` and ``tail_seed`` (int64 scalars); m = 0 builds an
    old-style reference (top-k + residual lower bound).
    """
    return reference_from_chunks(
        chunk_logprobs(llm, tokens, n_ctx), tokens, n_ctx, top_k, tail_samples, seed
    )


def reference_from_chunks(
    chunks: Iterable[np.ndarray],
    tokens: np.ndarray,
    n_ctx: int,
    top_k: int = DEFAULT_TOP_K,
    tail_samples: int = DEFAULT_TAIL_SAMPLES,
    seed: int = TAIL_SEED,
) -> dict[str, np.ndarray]:
    """The reference arrays (as :func:`build_reference`) from the reference model's
    log-softmax rows in the reference's chunking."""
    if tail_samples < 0:
        raise ValueError(f"tail_samples must be 0 or more, got {tail_samples}")
    seq = np.asarray(tokens, dtype=np.int32).ravel()
    targets = _targets(seq, n_ctx)
    if len(targets) == 0:
        raise ValueError("the reference needs at least 2 tokens")
    rng = np.random.default_rng(seed)
    target_lp, ids, vals, tail_ids, tail_lp, tail_mass = [], [], [], [], [], []
    offset = 0
    for rows in chunks:
        t = targets[offset : offset + len(rows)]
        offset += len(rows)
        target_lp.append(rows[np.arange(len(rows)), t])
        chunk_ids, chunk_vals = llm_fidelity.top_k(rows, top_k)
        ids.append(chunk_ids)
        vals.append(chunk_vals)
        if tail_samples:
            sample_ids, sample_lp = llm_fidelity.tail_samples(rows, chunk_ids, tail_samples, rng)
            tail_ids.append(sample_ids)
            tail_lp.append(sample_lp)
            tail_mass.append(llm_fidelity.tail_mass(rows, chunk_ids))
    arrays = {
        "kind": np.array(LLM_KIND),
        "tokens": seq,
        "targets": targets,
        "ref_target_logprob": np.concatenate(target_lp).astype(np.float32),
        "ref_topk_ids": np.concatenate(ids).astype(np.int32),
        "ref_topk_logprob": np.concatenate(vals).astype(np.float32),
        "n_ctx": np.array(n_ctx, dtype=np.int32),
        "top_k": np.array(ids[0].shape[1], dtype=np.int32),
    }
    if tail_samples:
        arrays.update(
            {
                "ref_tail_ids": np.concatenate(tail_ids).astype(np.int32),
                "ref_tail_logprob": np.concatenate(tail_lp).astype(np.float32),
                "ref_tail_mass": np.concatenate(tail_mass).astype(np.float64),
                "tail_samples": np.array(tail_samples, dtype=np.int64),
                "tail_seed": np.array(seed, dtype=np.int64),
            }
        )
    return arrays


def has_tail(reference: dict[str, np.ndarray]) -> bool:
    """True when ``reference`` carries tail samples (scored with the sampled-tail KL)."""
    return all(name in reference for name in TAIL_ARRAYS)


def fidelity_environment(reference: dict[str, np.ndarray]) -> dict[str, str]:
    """The KLD method and its parameters, for a result's environment:
    ``fidelity.kld_method`` (:data:`KLD_SAMPLED` or :data:`KLD_LOWER_BOUND`) and
    ``fidelity.kld_params`` (e.g. ``k=64,m=128,sampling=systematic,seed=20261214``)."""
    k = int(reference["top_k"])
    if has_tail(reference):
        params = (
            f"k={k},m={int(reference['tail_samples'])},sampling=systematic,"
            f"seed={int(reference['tail_seed'])}"
        )
        return {"fidelity.kld_method": KLD_SAMPLED, "fidelity.kld_params": params}
    return {"fidelity.kld_method": KLD_LOWER_BOUND, "fidelity.kld_params": f"k={k}"}


def measure_fidelity(llm: Llama, reference: dict[str, np.ndarray]) -> dict[str, float]:
    """``llm``'s fidelity to ``reference`` (see :func:`agent.llm_fidelity.fidelity_metrics`).

    ``llm`` must be opened with :func:`open_llama` at the reference's ``n_ctx`` and
    ``logits_all=True``.
    """
    chunks = chunk_logprobs(llm, reference["tokens"], int(reference["n_ctx"]))
    return fidelity_from_chunks(chunks, reference, llm.n_vocab())


def fidelity_from_chunks(
    chunks: Iterable[np.ndarray], reference: dict[str, np.ndarray], n_vocab: int
) -> dict[str, float]:
    """Fidelity of any backend to ``reference``, from its log-softmax rows.

    ``chunks`` must follow the reference's chunking: the token sequence cut into
    consecutive, non-overlapping pieces of ``reference["n_ctx"]`` tokens, each evaluated
    from an empty context, yielding float32 log-probabilities of shape
    ``[piece_len - 1, n_vocab]`` for predicting tokens ``1..`` of the piece (use
    :func:`agent.llm_fidelity.log_softmax` on the logits). This is how every framework
    is scored against the one shared reference.

    Besides the :func:`agent.llm_fidelity.fidelity_metrics`, the result holds the
    fidelity settings :data:`FIDELITY_CONTEXT` (the reference's ``n_ctx``, not the
    timing context), :data:`FIDELITY_POSITIONS` and :data:`FIDELITY_CHUNKS`.
    """
    ref_ids = reference["ref_topk_ids"]
    targets = reference["targets"]
    sampled = has_tail(reference)
    try:
        check_token_ids(reference["tokens"], n_vocab, "reference token")
        check_token_ids(ref_ids, n_vocab, "reference top-k id")
        if sampled:
            check_token_ids(reference["ref_tail_ids"], n_vocab, "reference tail id")
    except ValueError as err:
        raise ArtifactError(f"the LLM reference does not fit this model: {err}") from None
    target_lp, at_ref, top1, at_tail, var_mass = [], [], [], [], []
    offset = n_chunks = 0
    for rows in chunks:
        span = slice(offset, offset + len(rows))
        offset += len(rows)
        n_chunks += 1
        positions = np.arange(len(rows))
        target_lp.append(rows[positions, targets[span]])
        at_ref.append(np.take_along_axis(rows, ref_ids[span].astype(np.int64), axis=1))
        top1.append(np.argmax(rows, axis=1))
        if sampled:
            tail_ids = reference["ref_tail_ids"][span].astype(np.int64)
            at_tail.append(np.take_along_axis(rows, tail_ids, axis=1))
            var_mass.append(llm_fidelity.tail_mass(rows, ref_ids[span]))
    if offset != len(targets):
        raise ArtifactError(f"the reference scores {len(targets)} positions, the text {offset}")
    tail = None
    if sampled:
        tail = llm_fidelity.TailInputs(
            reference["ref_tail_mass"],
            np.concatenate(var_mass),
            reference["ref_tail_logprob"],
            np.concatenate(at_tail),
        )
    metrics = llm_fidelity.fidelity_metrics(
        reference["ref_target_logprob"],
        ref_ids,
        reference["ref_topk_logprob"],
        np.concatenate(target_lp),
        np.concatenate(at_ref),
        np.concatenate(top1),
        tail,
    )
    metrics[FIDELITY_CONTEXT] = float(int(reference["n_ctx"]))
    metrics[FIDELITY_POSITIONS] = float(len(targets))
    metrics[FIDELITY_CHUNKS] = float(n_chunks)
    return metrics


def decode_token_stream(
    eval_inputs: np.ndarray | None,
    batch_size: int,
    n_vocab: int,
    length: int,
    backend: str,
    fallback: np.ndarray,
) -> np.ndarray:
    """The token at every context position for an LLM's timed decode steps: the eval
    tokens (else ``fallback``), cycled to ``length``; one sequence only."""
    if batch_size != 1:
        raise TaskError(
            f"the {backend} LLM mode measures one sequence: batch_size must be 1, not {batch_size}"
        )
    source = fallback
    if eval_inputs is not None and len(eval_inputs) > 0:
        source = np.asarray(eval_inputs, dtype=np.int64).ravel()
        try:
            check_token_ids(source, n_vocab, "eval token")
        except ValueError as err:
            raise ArtifactError(f"the eval text does not fit this model: {err}") from None
    return np.resize(source, length).astype(np.int64)


def token_chunks(tokens: np.ndarray, n_ctx: int) -> list[np.ndarray]:
    """The reference's chunking of a token sequence (pieces of at most ``n_ctx``;
    pieces shorter than 2 tokens score nothing and are dropped)."""
    pieces = [tokens[i : i + n_ctx] for i in range(0, len(tokens), n_ctx)]
    return [p for p in pieces if len(p) >= 2]


def save_llm_reference(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the reference arrays (with ``kind="llm"``) as an uncompressed ``.npz``."""
    optional = TAIL_ARRAYS + VOCAB_ARRAYS
    names = [n for n in REFERENCE_ARRAYS if n != "kind"] + [n for n in optional if n in arrays]
    payload: dict[str, Any] = {name: arrays[name] for name in names}
    _check_reference(payload, path)
    with open(path, "wb") as out:
        np.savez(out, kind=np.array(LLM_KIND), **payload)


def load_llm_reference(path: Path) -> dict[str, np.ndarray]:
    """Read and check a reference file; raise :class:`ArtifactError` if it is unusable."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [name for name in REFERENCE_ARRAYS if name not in npz.files]
            if missing:
                raise ArtifactError(
                    f"LLM reference {path.name} lacks array(s): {', '.join(missing)}"
                )
            arrays = {name: npz[name] for name in REFERENCE_ARRAYS}
            arrays.update(
                {name: npz[name] for name in TAIL_ARRAYS + VOCAB_ARRAYS if name in npz.files}
            )
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ArtifactError(f"cannot read LLM reference {path}: {err}") from err
    if str(arrays["kind"]) != LLM_KIND:
        raise ArtifactError(f"{path.name} is not an LLM reference (kind {arrays['kind']!s})")
    _check_reference(arrays, path)
    return arrays


def vocabulary_arrays(llm: Llama) -> dict[str, np.ndarray]:
    """:data:`VOCAB_ARRAYS` of ``llm``'s vocabulary (special tokens as empty pieces)."""
    pieces = [llm.detokenize([i]) for i in range(llm.n_vocab())]
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in pieces], out=offsets[1:])
    return {
        "vocab_bytes": np.frombuffer(b"".join(pieces), dtype=np.uint8).copy(),
        "vocab_offsets": offsets,
    }


def decode_with_vocabulary(reference: dict[str, np.ndarray], ids: Iterable[int]) -> str:
    """The text of token ``ids`` from a reference's :data:`VOCAB_ARRAYS` (ArtifactError
    when it has none or an id is outside it)."""
    if any(name not in reference for name in VOCAB_ARRAYS):
        raise ArtifactError("the LLM reference carries no vocabulary (built by an older farm)")
    data, offsets = reference["vocab_bytes"], reference["vocab_offsets"]
    out = bytearray()
    for i in ids:
        if not 0 <= int(i) < len(offsets) - 1:
            raise ArtifactError(f"token id {int(i)} is outside the reference's vocabulary")
        out += data[offsets[i] : offsets[i + 1]].tobytes()
    return out.decode("utf-8", "replace")


def load_reference_tokens(path: Path) -> np.ndarray:
    """Only the token sequence of a reference file (for prompts and generation)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "tokens" not in npz.files:
                raise ArtifactError(f"LLM reference {path.name} lacks array: tokens")
            return np.asarray(npz["tokens"], dtype=np.int32)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ArtifactError(f"cannot read LLM reference {path}: {err}") from err


def _check_reference(arrays: dict[str, Any], path: Path) -> None:
    tokens = np.asarray(arrays["tokens"])
    n_ctx = int(arrays["n_ctx"])
    k = int(arrays["top_k"])
    if n_ctx < 2 or tokens.ndim != 1:
        raise ArtifactError(f"LLM reference {path.name}: needs 1-D tokens and n_ctx >= 2")
    p = len(_targets(tokens, n_ctx))
    shapes = {
        "targets": (p,),
        "ref_target_logprob": (p,),
        "ref_topk_ids": (p, k),
        "ref_topk_logprob": (p, k),
    }
    for name, shape in shapes.items():
        if np.shape(arrays[name]) != shape:
            raise ArtifactError(
                f"LLM reference {path.name}: {name} has shape {np.shape(arrays[name])}, "
                f"expected {shape} for {len(tokens)} tokens, n_ctx {n_ctx}, top_k {k}"
            )
    if p < 1 or k < 1:
        raise ArtifactError(f"LLM reference {path.name}: no scored positions")
    if not np.array_equal(arrays["targets"], _targets(tokens, n_ctx)):
        raise ArtifactError(f"LLM reference {path.name}: targets do not follow tokens")
    if any(name in arrays for name in VOCAB_ARRAYS):
        offsets = np.asarray(arrays.get("vocab_offsets", []))
        size = np.shape(arrays.get("vocab_bytes", ()))
        if (
            offsets.ndim != 1
            or len(offsets) < 2
            or len(size) != 1
            or offsets[0] != 0
            or offsets[-1] != size[0]
            or np.any(np.diff(offsets) < 0)
        ):
            raise ArtifactError(f"LLM reference {path.name}: malformed vocabulary arrays")
    present = [name for name in TAIL_ARRAYS if name in arrays]
    if present and len(present) != len(TAIL_ARRAYS):
        missing = ", ".join(n for n in TAIL_ARRAYS if n not in arrays)
        raise ArtifactError(f"LLM reference {path.name}: incomplete tail samples (no {missing})")
    if present:
        m = int(arrays["tail_samples"])
        tail_shapes = {"ref_tail_ids": (p, m), "ref_tail_logprob": (p, m), "ref_tail_mass": (p,)}
        for name, shape in tail_shapes.items():
            if m < 1 or np.shape(arrays[name]) != shape:
                raise ArtifactError(
                    f"LLM reference {path.name}: {name} has shape {np.shape(arrays[name])}, "
                    f"expected {shape} for {p} positions and {m} tail samples"
                )


def check_decode_budget(settings: MeasureSettings) -> None:
    """The prompt plus warm-up and minimum decode steps must fit in the context."""
    if settings.prompt_tokens < 1:
        raise TaskError(f"prompt_tokens must be at least 1, got {settings.prompt_tokens}")
    needed = settings.prompt_tokens + settings.warmup_iterations + settings.min_iterations
    if needed > settings.context_tokens:
        raise TaskError(
            f"context_tokens={settings.context_tokens} is too small: prompt_tokens "
            f"({settings.prompt_tokens}) + warmup_iterations ({settings.warmup_iterations}) "
            f"+ min_iterations ({settings.min_iterations}) = {needed} tokens must fit"
        )


def prompt_metrics(
    prepare: Callable[[], S],
    prefill: Callable[[S], R],
    first_token: Callable[[R], int],
    prompt_tokens: int,
    settings: MeasureSettings,
) -> dict[str, float]:
    """Prompt processing speed and time to first token: medians of
    :data:`PROMPT_REPEATS` runs of the prompt from an empty cache.

    Each run: ``prepare()`` (untimed: a fresh cache, feeds), then ``prefill(state)`` is
    the prompt's time, and ``first_token(result)`` (the greedy pick from the last
    logits) completes the time to first token.
    """
    clock = time.perf_counter_ns
    prompt_ns, ttft_ns = [], []
    for _ in range(PROMPT_REPEATS):
        state = prepare()
        t0 = clock()
        result = prefill(state)
        t1 = clock()
        first_token(result)
        t2 = clock()
        prompt_ns.append(t1 - t0)
        ttft_ns.append(t2 - t0)
    return {
        "prompt_tok_per_s": prompt_tokens * 1e9 / statistics.median(prompt_ns),
        "ttft_ms": statistics.median(ttft_ns) / 1e6,
        "prompt_tokens": float(prompt_tokens),
        "context_tokens": float(settings.context_tokens),
    }


def evaluate_reference(
    eval_path: Path,
    chunk_logprobs: Callable[[np.ndarray, int], Iterable[np.ndarray]],
    vocab_size: int,
    environment: dict[str, str] | None = None,
) -> dict[str, float]:
    """Fidelity to the LLM reference in ``eval_path`` (perplexity, KLD, agreement) from
    a backend's log-softmax rows per reference chunk; ``environment``, when given, is
    updated with the KLD method (:func:`fidelity_environment`) for the result."""
    reference = load_llm_reference(eval_path)
    if environment is not None:
        environment.update(fidelity_environment(reference))
    chunks = chunk_logprobs(reference["tokens"], int(reference["n_ctx"]))
    return fidelity_from_chunks(chunks, reference, vocab_size)
