"""The llama.cpp quantization ladder from a quantized source vs a continuous one: one table.

The only offline SmolLM2 is a Q4_1 GGUF; the farm's full-precision source is that file
dequantized to F16, so every weight sits on one of 16 levels of its 32-weight block.
This script quantizes two F16 sources of SmolLM2 to every llama.cpp type with the farm's
own steps (``quantize_gguf``) and scores each against that source's own F16 reference
with the farm's fidelity code (``build_reference`` / ``measure_fidelity``):

- ``q4_1-grid``: the farm's source (the Q4_1 weights dequantized exactly);
- ``dithered`` (a control, not SmolLM2's published weights): the same weights moved by
  a seeded uniform draw within their own Q4_1 step (±d/2), so the values are continuous
  again, as a trained model's are. Only the Q4_1 matrices are dithered.

Per type: file size, effective bits per weight (tensor bytes over elements), the weight
error over all matrices (relative RMS of ``dequantized(type) - source``), the weights'
*gain* ``<E, W> / <W, W>`` (positive: the quantizer systematically pushes weights
outward), mean KL divergence and top-1 agreement on the project's evaluation text. A
last line per source says whether KL divergence rises monotonically down the list.

Run: ``python benchmarks/requant_ladder.py [--types F16,Q5_1,...] [--threads 2]``
(about 10 minutes on 2 cores; needs the llama-cpp extra).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.backends.gguf_check import check_gguf  # noqa: E402
from agent.llm_eval import build_reference, measure_fidelity, open_llama  # noqa: E402
from coordinator.conversion.gguf_convert import (  # noqa: E402
    LLAMA_QUANT_TYPES,
    dequantize_to_f16,
    quantize_gguf,
    tokenize_text,
)
from coordinator.models.smollm2 import packaged_smollm2_gguf  # noqa: E402
from coordinator.models.texts import DEFAULT_EVAL_TEXT  # noqa: E402

N_CTX = 512
DITHER_SEED = 20261122
Q4_1_BLOCK_BYTES = 20  # f16 scale d, f16 minimum m, 16 bytes of 4-bit levels
MIB = 1024 * 1024


def q4_1_steps(raw: np.ndarray) -> np.ndarray:
    """The step ``d`` of every 32-weight Q4_1 block of a raw tensor, one per block."""
    blocks = np.ascontiguousarray(raw).reshape(-1, Q4_1_BLOCK_BYTES)
    return blocks[:, :2].copy().view(np.float16).astype(np.float32).ravel()


def write_dithered(source_q4_1: Path, f16_path: Path, out: Path) -> int:
    """Copy ``f16_path`` to ``out`` with each Q4_1-sourced matrix dithered in place.

    Returns the number of tensors changed.
    """
    import gguf

    shutil.copyfile(f16_path, out)
    source = {t.name: t for t in gguf.GGUFReader(source_q4_1).tensors}
    rng = np.random.default_rng(DITHER_SEED)
    changed = 0
    for tensor in gguf.GGUFReader(out, "r+").tensors:
        original = source[tensor.name]
        if original.tensor_type != gguf.GGMLQuantizationType.Q4_1:
            continue
        values = tensor.data.reshape(-1, 32).astype(np.float32)
        steps = q4_1_steps(original.data)[:, None]
        values += steps * (rng.random(values.shape, dtype=np.float32) - 0.5)
        tensor.data[...] = values.reshape(tensor.data.shape).astype(np.float16)
        changed += 1
    return changed


def weight_error(reference: Path, variant: Path) -> tuple[float, float]:
    """(relative RMS error, gain) of ``variant``'s matrices against ``reference``'s."""
    import gguf

    ref = {t.name: t for t in gguf.GGUFReader(reference).tensors}
    err2 = ref2 = cross = 0.0
    for tensor in gguf.GGUFReader(variant).tensors:
        if len(tensor.shape) < 2:
            continue
        w = gguf.quants.dequantize(ref[tensor.name].data, ref[tensor.name].tensor_type)
        q = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        w = w.astype(np.float64).ravel()
        e = q.astype(np.float64).ravel() - w
        err2 += float(e @ e)
        ref2 += float(w @ w)
        cross += float(e @ w)
    return (err2 / ref2) ** 0.5, cross / ref2


def ladder(name: str, f16: Path, work: Path, types: list[str], threads: int) -> list[str]:
    """Quantize ``f16`` to each type, score it, and return the table rows."""
    tokens = tokenize_text(f16, DEFAULT_EVAL_TEXT.read_text(encoding="utf-8"))
    llm = open_llama(f16, N_CTX, threads, logits_all=True)
    try:
        reference = build_reference(llm, tokens, N_CTX)
    finally:
        llm.close()
    rows, klds = [], []
    for qtype in types:
        path = f16 if qtype == "F16" else work / f"{name}-{qtype}.gguf"
        if qtype != "F16":
            quantize_gguf(f16, path, qtype, threads=threads)
        rel_rms, gain = weight_error(f16, path)
        llm = open_llama(path, N_CTX, threads, logits_all=True)
        try:
            fidelity = measure_fidelity(llm, reference)
        finally:
            llm.close()
        klds.append(fidelity["kld_mean"])
        rows.append(
            f"| {name} | {qtype} | {path.stat().st_size / MIB:.1f} | "
            f"{check_gguf(path).bits_per_weight:.2f} | {rel_rms:.4f} | "
            f"{gain:+.4f} | {fidelity['kld_mean']:.5f} | {fidelity['top1_agreement']:.4f} |"
        )
        if qtype != "F16":
            path.unlink()
        print(rows[-1], file=sys.stderr, flush=True)
    breaks = [f"{types[i + 1]} < {types[i]}" for i in range(len(klds) - 1) if klds[i + 1] < klds[i]]
    rows.append(
        f"| {name} | KLD rises monotonically down the list: "
        f"{'no (' + ', '.join(breaks) + ')' if breaks else 'yes'} | | | | | | |"
    )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=",".join(LLAMA_QUANT_TYPES))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    if types[0] != "F16":
        types.insert(0, "F16")
    source = packaged_smollm2_gguf()
    with tempfile.TemporaryDirectory(prefix="requant-ladder-") as tmp:
        work = Path(tmp)
        grid = work / "q4_1-grid-F16.gguf"
        dequantize_to_f16(source, grid)
        dithered = work / "dithered-F16.gguf"
        changed = write_dithered(source, grid, dithered)
        print(f"dithered {changed} Q4_1 matrices (seed {DITHER_SEED})", file=sys.stderr)
        rows = ladder("q4_1-grid", grid, work, types, args.threads)
        rows += ladder("dithered", dithered, work, types, args.threads)
    print(
        f"SmolLM2-135M, {args.threads} threads, eval text {DEFAULT_EVAL_TEXT.name}, n_ctx {N_CTX}"
    )
    print(
        "| source | type | size MiB | bits/weight | weight rel. RMS error | gain | KLD mean "
        "| top-1 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
