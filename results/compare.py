"""The framework comparison: per device and model, each framework's quantizations
against that framework's own full-precision run, computed from measured rows.

Pure functions over result rows (the store's dicts); rendering is separate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from edgefarm.domain import RatioInterval, ratio_interval
from results.rows import p50_interval
from results.units import as_number, fmt_joules

Row = dict[str, Any]

# The scheme each backend's speed-up, memory and size reductions are measured against.
FULL_PRECISION = {
    "onnxruntime": "fp32",
    "openvino": "fp32",
    "llama-cpp": "F16",
    "mlx": "fp16",
    "onnxruntime-genai": "fp32",
    "foundry-local": "fp32",
    "qai-hub": "fp32",
    "noop": "none",
}


@dataclass(frozen=True)
class ComparisonRow:
    """One framework x scheme on one device for one model."""

    device: str
    model: str
    framework: str
    scheme: str
    is_llm: bool
    speed: float | None  # generation tok/s (LLM) or items/s
    memory_bytes: int | None
    size_bytes: int | None
    speedup: float | None  # speed / full-precision speed of the same framework
    memory_reduction: float | None  # 1 - memory / full-precision memory
    size_reduction: float | None
    fidelity: dict[str, float]  # kld_mean, ppl_ratio, top1_agreement | top1, agreement
    ok: bool
    note: str = ""
    bits_per_weight: float | None = None  # GGUF tensor bits per element (llama.cpp)
    # a full-precision conversion's max |logit difference| from its source checkpoint
    logit_max_abs_diff: float | None = None
    # the speed's 95% repeat-run interval, in percent (None: fewer than two trials)
    speed_pm_pct: float | None = None
    # 95% interval of the speed-up (Welch over both rows' trial medians); None: the
    # full-precision row itself, or fewer than two trials on a side
    speedup_interval: RatioInterval | None = None
    kld_lower_bound: bool = False  # KLD by the old top-k + residual method (shown as >=)
    energy_j: float | None = None  # measured energy per item (per generated token for LLMs)

    @property
    def same_speed(self) -> bool:
        """True when the speed-up's interval contains 1x: no measurable difference."""
        return self.speedup_interval is not None and not self.speedup_interval.distinguishable


def _speed(row: Row) -> float | None:
    p50 = row.get("lat_p50_ms")
    if not p50:
        return None
    return 1000.0 / p50 * (row.get("batch_size") or 1)


def speedup_interval(row: Row, base: Row | None) -> RatioInterval | None:
    """95% interval of ``row``'s speed over ``base``'s, from their trial medians."""
    if base is None or base is row or not row.get("ok") or not base.get("ok"):
        return None
    slower = ratio_interval(
        base.get("trial_medians_ms") or [], row.get("trial_medians_ms") or []
    )  # row latency / base latency: invert it for the speed-up
    if slower is None:
        return None
    return RatioInterval(1.0 / slower.ratio, 1.0 / slower.high, 1.0 / slower.low)


def _speed_pm(row: Row) -> float | None:
    interval = p50_interval(row) if row.get("ok") else None
    return interval.repeat_percent if interval is not None else None


# The KLD method a result records (agent.llm_eval.KLD_SAMPLED): rows scored any other
# way (old references, rows from before the method was recorded) carry the top-k +
# residual KLD, a lower bound of the full-vocabulary value.
KLD_METHOD_KEY = "fidelity.kld_method"
KLD_SAMPLED = "topk-tail-sampled"


def kld_is_lower_bound(row: Row) -> bool:
    """True when the row's KLD is the old top-k + residual lower bound (shown as ``≥``)."""
    if (row.get("accuracy") or {}).get("kld_mean") is None:
        return False
    return (row.get("environment") or {}).get(KLD_METHOD_KEY) != KLD_SAMPLED


def is_llm_row(row: Row) -> bool:
    """True for a language-model row (prompt speed or KL divergence measured)."""
    metrics = row.get("metrics") or {}
    return "prompt_tok_per_s" in metrics or "kld_mean" in (row.get("accuracy") or {})


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or not base:
        return None
    return value / base


def _reduction(value: float | int | None, base: float | int | None) -> float | None:
    ratio = _ratio(
        float(value) if value is not None else None, float(base) if base is not None else None
    )
    return None if ratio is None else 1.0 - ratio


def _fidelity(row: Row, llm: bool) -> dict[str, float]:
    accuracy = row.get("accuracy") or {}
    keys = ("kld_mean", "ppl_ratio", "top1_agreement") if llm else ("top1", "agreement")
    return {k: float(accuracy[k]) for k in keys if accuracy.get(k) is not None}


def compare(
    rows: list[Row], logit_checks: dict[str, dict[str, Any]] | None = None
) -> list[ComparisonRow]:
    """Comparison rows, grouped by device, model and framework, full precision first.
    ``logit_checks`` (artifact sha256 -> its logit check) adds each full-precision
    conversion's measured difference from the source checkpoint."""
    logit_checks = logit_checks or {}
    baselines: dict[tuple[str, str, str], Row] = {}
    for row in rows:
        key = (device_label(row), row["model"], row["backend"])
        if row.get("ok") and row.get("scheme") == FULL_PRECISION.get(row["backend"]):
            baselines[key] = row
    out = []
    for row in rows:
        key = (device_label(row), row["model"], row["backend"])
        base = baselines.get(key)
        llm = is_llm_row(row)
        speed = _speed(row) if row.get("ok") else None
        note = "" if base is not None else f"no {FULL_PRECISION.get(row['backend'], '?')} run"
        if not row.get("ok"):
            note = f"failed: {row.get('error_kind', '')}"
        out.append(
            ComparisonRow(
                device=key[0],
                model=row["model"],
                framework=row["backend"],
                scheme=row["scheme"],
                is_llm=llm,
                speed=speed,
                memory_bytes=row.get("peak_rss_bytes") if row.get("ok") else None,
                size_bytes=row.get("model_size_bytes") if row.get("ok") else None,
                speedup=_ratio(speed, _speed(base)) if base else None,
                memory_reduction=_reduction(row.get("peak_rss_bytes"), base["peak_rss_bytes"])
                if base and row.get("ok")
                else None,
                size_reduction=_reduction(row.get("model_size_bytes"), base["model_size_bytes"])
                if base and row.get("ok")
                else None,
                fidelity=_fidelity(row, llm) if row.get("ok") else {},
                ok=bool(row.get("ok")),
                note=note,
                bits_per_weight=(row.get("metrics") or {}).get("bits_per_weight")
                if row.get("ok")
                else None,
                logit_max_abs_diff=(logit_checks.get(row.get("artifact_sha256", "")) or {}).get(
                    "max_abs_diff"
                ),
                speed_pm_pct=_speed_pm(row) if speed else None,
                speedup_interval=speedup_interval(row, base),
                kld_lower_bound=kld_is_lower_bound(row),
                energy_j=energy_per_inference(row),
            )
        )
    # stable: within a framework, full precision first, then the spec's order
    out.sort(
        key=lambda r: (r.device, r.model, r.framework, r.scheme != FULL_PRECISION.get(r.framework))
    )
    return out


def energy_per_inference(row: Row) -> float | None:
    """The row's measured energy per item (per generated token for language models), or
    None where the device measured none (see ``energy.source`` in its environment)."""
    if not row.get("ok"):
        return None
    return as_number((row.get("metrics") or {}).get("energy_per_inference_j"))


def device_label(row: Row) -> str:
    """The name tables and reports show for a row's device."""
    return str(row.get("device_name") or row.get("device_id") or "?")


def _fmt(value: float | None, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


COLUMNS = (
    "framework",
    "quantization",
    "memory MiB",
    "speed",
    "speed-up",
    "memory -",
    "size MiB",
    "size -",
    "fidelity",
)


def cells(r: ComparisonRow) -> list[str]:
    """The table cells of one comparison row."""
    unit = "tok/s" if r.is_llm else "items/s"
    if r.is_llm:
        fidelity = ", ".join(
            f"{name} {'≥' if key == 'kld_mean' and r.kld_lower_bound else ''}"
            f"{_fmt(r.fidelity.get(key), fmt)}"
            for name, key, fmt in (
                ("KLD", "kld_mean", ".4f"),
                ("ppl x", "ppl_ratio", ".3f"),
                ("top1", "top1_agreement", ".3f"),
            )
            if key in r.fidelity
        )
        if r.logit_max_abs_diff is not None:
            fidelity += f"{', ' if fidelity else ''}logits vs checkpoint {r.logit_max_abs_diff:.1e}"
    else:
        fidelity = ", ".join(
            f"{name} {_fmt(r.fidelity.get(key), '.4f')}"
            for name, key in (("top1", "top1"), ("agree", "agreement"))
            if key in r.fidelity
        )
    return [
        r.framework,
        r.scheme,
        _fmt(r.memory_bytes / (1 << 20) if r.memory_bytes else None, ".1f"),
        (f"{_fmt(r.speed, ',.1f')} {unit}" + _pm(r.speed_pm_pct) if r.speed else "-") + _energy(r),
        _speedup_cell(r),
        f"{_fmt(r.memory_reduction * 100, '.0f')}%" if r.memory_reduction is not None else "-",
        _fmt(r.size_bytes / (1 << 20) if r.size_bytes else None, ".1f")
        + (f" ({r.bits_per_weight:.2f} b/w)" if r.bits_per_weight else ""),
        f"{_fmt(r.size_reduction * 100, '.0f')}%" if r.size_reduction is not None else "-",
        fidelity or (r.note or "-"),
    ]


def _energy(r: ComparisonRow) -> str:
    """``, 250 mJ/token`` beside the speed where energy was measured."""
    if r.energy_j is None:
        return ""
    return f", {fmt_joules(r.energy_j)}/{'token' if r.is_llm else 'item'}"


def _pm(percent: float | None) -> str:
    return f" ±{percent:.1f}%" if percent is not None else ""


def _speedup_cell(r: ComparisonRow) -> str:
    """``1.12x``, or ``1.03x (same: 0.97-1.10x)`` when its interval contains 1x."""
    if not r.speedup:
        return "-"
    text = f"{_fmt(r.speedup, '.2f')}x"
    if r.same_speed and r.speedup_interval is not None:
        text += f" (same: {r.speedup_interval.low:.2f}-{r.speedup_interval.high:.2f}x)"
    return text


INTERVAL_NOTE = (
    "Speeds carry ±: the 95% interval for a repeat run, over trials. A speed-up marked "
    "'same' is not a measured difference: its 95% interval (Welch, over both runs' "
    "trial medians) contains 1x."
)


def groups(rows: list[ComparisonRow]) -> dict[tuple[str, str], list[ComparisonRow]]:
    """Comparison rows by (device, model), in order."""
    out: dict[tuple[str, str], list[ComparisonRow]] = {}
    for r in rows:
        out.setdefault((r.device, r.model), []).append(r)
    return out


def to_markdown(rows: list[ComparisonRow]) -> str:
    """The comparison as Markdown: one table per device and model."""
    parts = []
    for (device, model), members in groups(rows).items():
        parts.append(f"### {model} on {device}\n")
        parts.append("| " + " | ".join(COLUMNS) + " |")
        parts.append("|" + "---|" * len(COLUMNS))
        for r in members:
            parts.append("| " + " | ".join(cells(r)) + " |")
        parts.append("")
    parts.append(
        "Speed-up, memory and size reductions are against the same framework's "
        "full-precision run; fidelity is against the shared full-precision reference. "
        + INTERVAL_NOTE
    )
    return "\n".join(parts) + "\n"
