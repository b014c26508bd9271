"""Memory and time of bringing a real-size checkpoint into the farm: prints one table.

Two random-weight checkpoints of published shapes (:mod:`coordinator.models.checkpoints`,
bfloat16, as the hub ships them):

1. ``qwen3``: Qwen3-0.6B through all four backends (llama.cpp's whole type ladder from
   F16 to Q2_K, onnxruntime fp32 and int4-weight, OpenVINO fp32 and int8-weights, MLX
   fp16 and q4). A second table gives the llama.cpp ladder ordered by measured bits per
   weight with its KL divergence from the F16 reference (made from the checkpoint, so
   a full-precision source: the order should hold).
2. ``phi4``: Phi-4-mini (Phi3ForCausalLM, 3.8B parameters) through GGUF F16 -> Q4_K_M,
   measured on llama.cpp.

Each runs as a real campaign on a local farm (a coordinator process with its local Ray,
one agent process). For every conversion step the table gives its wall time and the peak
RSS of the Ray worker that ran it (each language-model step runs in a fresh worker) and
of the step's child processes (llama.cpp's converter); for every measurement the peak
RSS of the measuring child; and the peak RSS of the coordinator and agent processes over
the whole campaign. Targets: the coordinator's peak RSS under 1 GB for both models (it
must not grow with model size); no step holding more than one copy of the model beyond
what its converter needs.

Run: ``python benchmarks/checkpoint_memory.py [--models qwen3,phi4] [--work DIR]``.
Needs the ``hf``, ``openvino``, ``mlx`` and ``llama-cpp`` extras and about 60 GB of disk;
the phi4 run needs about 18 GB of free memory (the logit check loads the checkpoint once
in float32). Keep the machine quiet.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coordinator.localfarm import LocalFarm  # noqa: E402
from coordinator.models.checkpoints import build_random_checkpoint  # noqa: E402
from coordinator.models.texts import DEFAULT_EVAL_TEXT  # noqa: E402
from coordinator.runner import run_campaign  # noqa: E402
from edgefarm.errors import CampaignFailed  # noqa: E402
from results.store import ResultsStore  # noqa: E402

MIB = 1 << 20
CAMPAIGNS: dict[str, tuple[str, str]] = {
    "qwen3": (
        "qwen3",
        """  - name: llama-cpp
    schemes: [F16, Q8_0, Q6_K, Q5_K_M, Q5_1, Q4_K_M, Q4_0, Q3_K_M, Q2_K]
  - name: onnxruntime
    schemes: [fp32, int4-weight]
  - name: openvino
    schemes: [fp32, int8-weights]
  - name: mlx
    schemes: [fp16, q4]
""",
    ),
    "phi4": (
        "phi3",
        """  - name: llama-cpp
    schemes: [Q4_K_M]
""",
    ),
}
SPEC = """name: bench-{model}
models:
  - name: {model}
    source: file:{checkpoint}
    eval: file:{eval}
backends:
{backends}measurement:
  warmup_iterations: 1
  min_iterations: 4
  min_duration_s: 0.01
  trials: 1
  threads: 2
  prompt_tokens: 16
  context_tokens: 128
  timeout_s: 3000
"""


def _vm_hwm(pid: int) -> int:
    """A live process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _checkpoint(work: Path, model: str, arch: str) -> tuple[Path, float]:
    folder = work / f"checkpoint-{model}"
    if (folder / "config.json").is_file():
        return folder, 0.0
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    build_random_checkpoint(arch, folder, size="published", dtype="bfloat16")
    return folder, time.perf_counter() - started


Ladder = list[tuple[str, float, float, float]]


def run_one(work: Path, model: str) -> tuple[list[tuple[str, str, str, str, str]], Ladder]:
    """Run one model's campaign; its table rows and its llama.cpp ladder
    (type, bits per weight, KLD mean, perplexity ratio)."""
    arch, backends = CAMPAIGNS[model]
    checkpoint, build_s = _checkpoint(work, model, arch)
    size = sum(p.stat().st_size for p in checkpoint.iterdir() if p.is_file())
    eval_text = work / "eval.txt"
    eval_text.write_text(DEFAULT_EVAL_TEXT.read_text(encoding="utf-8")[:1500], encoding="utf-8")
    home = work / f"home-{model}"
    shutil.rmtree(home, ignore_errors=True)
    spec = work / f"{model}.yaml"
    spec.write_text(
        SPEC.format(model=model, checkpoint=checkpoint, eval=eval_text, backends=backends)
    )
    store_url = f"sqlite:///{home / 'results.sqlite'}"
    home.mkdir(parents=True)
    farm = LocalFarm(home=home, store_url=store_url, agents=1)
    started = time.perf_counter()
    failed = ""
    with farm:
        try:
            run_campaign(farm.address, farm.token, spec)
        except CampaignFailed as err:
            failed = str(err)
        wall = time.perf_counter() - started
        assert farm.coordinator_proc is not None
        coordinator_peak = _vm_hwm(farm.coordinator_proc.pid)
        agent_peak = max(_vm_hwm(p.pid) for p in farm.agent_procs.values())
    rows = [
        (model, "checkpoint (random, bf16)", f"{build_s:.0f}", f"{size / MIB:,.0f} MiB", ""),
    ]
    with ResultsStore.open(store_url) as store:
        for record in sorted(store.list_artifacts(), key=lambda r: r.created_at):
            prov: dict[str, Any] = record.provenance
            if "step_wall_s" not in prov:
                continue
            rows.append(
                (
                    model,
                    f"step {record.kind}: {record.name}",
                    f"{prov['step_wall_s']:.0f}",
                    f"{prov['step_peak_rss_bytes'] / MIB:,.0f}",
                    f"{prov['step_children_peak_rss_bytes'] / MIB:,.0f}",
                )
            )
        results = store.query_results(model=model)
        ladder = sorted(
            (
                (
                    row["scheme"],
                    row["metrics"]["bits_per_weight"],
                    row["accuracy"]["kld_mean"],
                    row["accuracy"]["ppl_ratio"],
                )
                for row in results
                if row["ok"] and row["backend"] == "llama-cpp"
            ),
            key=lambda entry: -entry[1],
        )
        for row in results:
            status = "ok" if row["ok"] else f"failed: {row['error_message'][:60]}"
            rows.append(
                (
                    model,
                    f"measure {row['backend']} {row['scheme']} ({status})",
                    "",
                    f"{row['peak_rss_bytes'] / MIB:,.0f}",
                    "",
                )
            )
    rows.append((model, "campaign end to end", f"{wall:.0f}", "", ""))
    rows.append((model, "coordinator process (peak)", "", f"{coordinator_peak / MIB:,.0f}", ""))
    rows.append((model, "agent process (peak)", "", f"{agent_peak / MIB:,.0f}", ""))
    if failed:
        rows.append((model, failed, "", "", ""))
    return rows, ladder


def _print(header: tuple[str, ...], table: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="qwen3,phi4")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edgefarm-bench")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    table: list[tuple[str, str, str, str, str]] = []
    ladders: dict[str, Ladder] = {}
    for model in args.models.split(","):
        rows, ladders[model] = run_one(args.work, model)
        table += rows
    _print(("model", "what", "wall s", "peak RSS MiB", "children MiB"), table)
    for model, ladder in ladders.items():
        if len(ladder) < 3:
            continue
        klds = [kld for _, _, kld, _ in ladder]
        monotone = all(a <= b for a, b in itertools.pairwise(klds))
        print(f"\n{model}: llama.cpp ladder by bits per weight (KLD monotone: {monotone})")
        _print(
            ("type", "bits/weight", "KLD mean", "ppl ratio"),
            [(t, f"{b:.2f}", f"{k:.5f}", f"{p:.4f}") for t, b, k, p in ladder],
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
