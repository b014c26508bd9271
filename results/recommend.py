"""Which configuration to run on a device, answered from measured result rows.

Pure: :func:`recommend` takes rows (the store's dicts) and limits and returns the best
admissible configuration, the runners-up, and for every other configuration the
reasons it was excluded.

"Best" is the fastest admissible configuration (lowest p50 latency; for language
models, the p50 time per generated token), with lower peak memory breaking ties; the
``memory`` objective swaps the two. Latencies are not ranked inside their noise: the
configurations whose latency is indistinguishable from the fastest one's (the 95%
Welch interval of their ratio, over both rows' trial medians, contains 1) form a tie,
ordered by peak memory, and :meth:`Recommendation.why` says so. A configuration is
admissible when its run succeeded and was valid, and it meets every limit given:

- ``max_memory_bytes``: peak resident memory of the run;
- ``max_kld``: mean KL divergence to the full-precision reference (language models);
- ``max_energy_j``: energy per inference measured on the device (per generated
  token for language models: joules/token), the median over the trials; a device that
  measures no energy excludes every configuration and says why;
- ``max_accuracy_drop``: for classifiers, the top-1 accuracy lost against the
  full-precision reference of the same model (``reference_top1`` stored with the row,
  else a full-precision run of the same model, on this device first); for language
  models, the share of next-token predictions that differ from the reference's
  (``1 - top1_agreement``).

A limit that cannot be checked (the row lacks the figure) excludes the configuration:
a recommendation only ever stands on measured data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from edgefarm.domain import RatioInterval, ratio_interval
from results.compare import FULL_PRECISION, device_label, is_llm_row, kld_is_lower_bound
from results.report.fmt import fmt_bytes, fmt_ms, fmt_num, fmt_pct
from results.report.model import failure_reason
from results.units import as_number, fmt_joules

Row = dict[str, Any]
# A figure exactly at its limit is within it; this absorbs float rounding (0.91 - 0.90).
TOLERANCE = 1e-9
ConfigKey = tuple[str, str, str]  # model, backend, scheme


class Objective(StrEnum):
    """What "best" minimises among admissible configurations."""

    LATENCY = "latency"  # p50 latency (ms per item, or per generated token); memory breaks ties
    MEMORY = "memory"  # peak memory; latency breaks ties
    ENERGY = "energy"  # energy per inference (J/token for LLMs); latency breaks ties


@dataclass(frozen=True)
class Limits:
    """The user's limits; None means no limit."""

    max_memory_bytes: int | None = None
    max_kld: float | None = None
    max_accuracy_drop: float | None = None
    max_energy_j: float | None = None  # per inference; per generated token for LLMs

    def describe(self) -> str:
        """``memory <= 500.0 MiB, KLD <= 0.05`` or ``no limits``."""
        parts = []
        if self.max_memory_bytes is not None:
            parts.append(f"peak memory <= {fmt_bytes(self.max_memory_bytes)}")
        if self.max_kld is not None:
            parts.append(f"KLD <= {fmt_num(self.max_kld)}")
        if self.max_accuracy_drop is not None:
            parts.append(f"accuracy drop <= {fmt_pct(self.max_accuracy_drop, 2)}")
        if self.max_energy_j is not None:
            parts.append(f"energy <= {fmt_joules(self.max_energy_j)} per item or token")
        return ", ".join(parts) or "no limits"


@dataclass(frozen=True)
class Candidate:
    """An admissible configuration with the figures it was judged on."""

    model: str
    backend: str
    scheme: str
    device: str
    is_llm: bool
    latency_ms: float  # p50; per generated token for language models
    memory_bytes: int | None
    size_bytes: int | None
    kld_mean: float | None
    accuracy_drop: float | None
    result_id: int | None = None
    trial_medians_ms: tuple[float, ...] = ()  # the per-trial p50s the latency came from
    kld_lower_bound: bool = False  # KLD by the old top-k + residual method (a lower bound)
    energy_j: float | None = None  # per inference (per generated token for LLMs), measured

    @property
    def label(self) -> str:
        """``model backend/scheme``."""
        return f"{self.model} {self.backend}/{self.scheme}"

    @property
    def speed(self) -> float:
        """Items/s (classifiers, batch 1) or generated tokens/s (language models)."""
        return 1000.0 / self.latency_ms if self.latency_ms else float("nan")

    def describe(self) -> str:
        """One line of its figures, with units."""
        unit = "tok/s" if self.is_llm else "items/s"
        per = "/token" if self.is_llm else ""
        parts = [
            f"{fmt_ms(self.latency_ms)}{per} p50 ({self.speed:,.1f} {unit})",
            f"peak memory {fmt_bytes(self.memory_bytes)}",
        ]
        if self.energy_j is not None:
            parts.append(f"{fmt_joules(self.energy_j)}{per or '/item'}")
        if self.kld_mean is not None and self.kld_lower_bound:
            parts.append(
                f"KLD ≥{fmt_num(self.kld_mean)} (old top-k lower bound: the full KLD is higher)"
            )
        elif self.kld_mean is not None:
            parts.append(f"KLD {fmt_num(self.kld_mean)}")
        if self.accuracy_drop is not None and self.is_llm:
            parts.append(f"top-1 agreement {fmt_pct(1.0 - self.accuracy_drop, 1)}")
        elif self.accuracy_drop is not None:
            parts.append(f"top-1 drop {fmt_pct(self.accuracy_drop, 2)}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Exclusion:
    """A configuration that was not admissible, and every reason why."""

    model: str
    backend: str
    scheme: str
    reasons: tuple[str, ...]

    @property
    def label(self) -> str:
        """``model backend/scheme``."""
        return f"{self.model} {self.backend}/{self.scheme}"


@dataclass(frozen=True)
class Recommendation:
    """The answer: best, runners-up (in order), exclusions (with reasons).

    Every configuration measured is in exactly one of ``best``, ``runners_up``,
    ``rest`` and ``excluded``.
    """

    device: str
    model: str | None
    limits: Limits
    objective: Objective
    best: Candidate | None
    runners_up: tuple[Candidate, ...]
    excluded: tuple[Exclusion, ...]
    admissible: int  # how many configurations met every limit
    rest: tuple[Candidate, ...] = ()  # admissible, ranked below the runners-up
    # latency objective: the others whose latency is indistinguishable from the best's,
    # each with the 95% interval of its latency / the best's
    tied: tuple[tuple[Candidate, RatioInterval], ...] = ()

    def why(self) -> str:
        """Why the best one is best, in one sentence."""
        if self.best is None:
            return f"no measured configuration meets {self.limits.describe()}"
        what = {
            Objective.LATENCY: "fastest",
            Objective.MEMORY: "smallest peak memory",
            Objective.ENERGY: "least energy per inference",
        }[self.objective]
        text = (
            f"{what} of {self.admissible} admissible configuration"
            f"{'s' if self.admissible != 1 else ''} ({self.limits.describe()})"
        )
        if self.tied:
            names = ", ".join(_name(c, self.best) for c, _ in self.tied)
            low = min(i.low for _, i in self.tied)
            high = max(i.high for _, i in self.tied)
            return text + (
                f"; as fast as {names} within the noise (the 95% interval of their latency "
                f"over this one's, {(low - 1) * 100:+.1f}% .. {(high - 1) * 100:+.1f}%, "
                "contains no difference), so lower peak memory decides"
            )
        if self.runners_up:
            nxt = self.runners_up[0]
            name = f"{nxt.backend}/{nxt.scheme}" if nxt.model == self.best.model else nxt.label
            if self.objective is Objective.LATENCY:
                text += f"; {nxt.latency_ms / self.best.latency_ms:.2f}x faster than {name}"
            elif self.objective is Objective.ENERGY and nxt.energy_j and self.best.energy_j:
                text += f"; {nxt.energy_j / self.best.energy_j:.2f}x less energy than {name}"
            elif self.objective is Objective.MEMORY and nxt.memory_bytes and self.best.memory_bytes:
                saved = nxt.memory_bytes - self.best.memory_bytes
                text += f"; {fmt_bytes(saved)} less than {name}"
        return text


def _name(c: Candidate, best: Candidate) -> str:
    return f"{c.backend}/{c.scheme}" if c.model == best.model else c.label


def _ties(ranked: list[Candidate]) -> list[tuple[Candidate, RatioInterval]]:
    """Those after the fastest whose latency ratio to it has a 95% interval containing 1."""
    fastest = ranked[0]
    out = []
    for c in ranked[1:]:
        interval = ratio_interval(fastest.trial_medians_ms, c.trial_medians_ms)
        if interval is not None and not interval.distinguishable:
            out.append((c, interval))
    return out


def _matches(row: Row, device: str) -> bool:
    return device in (row.get("device_id"), row.get("device_name"))


def _key(row: Row) -> ConfigKey:
    return (str(row["model"]), str(row["backend"]), str(row["scheme"]))


def _newest(rows: Sequence[Row]) -> Row:
    """The newest usable measurement of a configuration, else the newest of any."""

    def order(item: tuple[int, Row]) -> tuple[bool, int]:
        index, row = item
        return (not failure_reason(row), int(row.get("result_id") or index))

    return max(enumerate(rows), key=order)[1]


def _reference_top1(row: Row, rows: Sequence[Row], device: str) -> float | None:
    """The full-precision top-1 of the row's model (stored reference first)."""
    stored = (row.get("accuracy") or {}).get("reference_top1")
    if stored is not None:
        return float(stored)
    full = [
        r
        for r in rows
        if r["model"] == row["model"]
        and r.get("scheme") == FULL_PRECISION.get(str(r.get("backend")))
        and not failure_reason(r)
        and (r.get("accuracy") or {}).get("top1") is not None
    ]
    full.sort(key=lambda r: not _matches(r, device))  # this device's run first
    return float(full[0]["accuracy"]["top1"]) if full else None


def _accuracy_drop(row: Row, rows: Sequence[Row], device: str) -> tuple[float | None, str]:
    """(drop, "" ) or (None, why it cannot be computed)."""
    accuracy = row.get("accuracy") or {}
    if is_llm_row(row):
        agreement = accuracy.get("top1_agreement")
        if agreement is None:
            return None, "no top-1 agreement measured"
        return 1.0 - float(agreement), ""
    top1 = accuracy.get("top1")
    if top1 is None:
        return None, "no top-1 accuracy measured"
    reference = _reference_top1(row, rows, device)
    if reference is None:
        return None, f"no full-precision reference of {row['model']} to compare top-1 with"
    return reference - float(top1), ""


def _judge(
    row: Row, rows: Sequence[Row], device: str, limits: Limits, need_energy: bool = False
) -> tuple[Candidate | None, list[str]]:
    """The row as a candidate, or the reasons it is excluded (``need_energy``: one
    without a measured energy is excluded, as under the energy objective)."""
    failed = failure_reason(row)
    if failed:
        return None, [failed]
    reasons: list[str] = []
    latency = row.get("lat_p50_ms")
    if latency is None:
        reasons.append("no latency measured")
    memory = row.get("peak_rss_bytes") or None
    if limits.max_memory_bytes is not None:
        if memory is None:
            reasons.append("no peak memory measured")
        elif memory > limits.max_memory_bytes:
            reasons.append(
                f"peak memory {fmt_bytes(memory)} is {fmt_bytes(memory - limits.max_memory_bytes)}"
                f" over the {fmt_bytes(limits.max_memory_bytes)} limit"
            )
    kld = (row.get("accuracy") or {}).get("kld_mean")
    if limits.max_kld is not None:
        if kld is None:
            what = "" if is_llm_row(row) else " (not a language model)"
            reasons.append(f"no KLD measured{what}")
        elif kld > limits.max_kld + TOLERANCE:
            reasons.append(f"KLD {fmt_num(kld)} over the {fmt_num(limits.max_kld)} limit")
    drop, missing = _accuracy_drop(row, rows, device)
    if limits.max_accuracy_drop is not None:
        if drop is None:
            reasons.append(missing)
        elif drop > limits.max_accuracy_drop + TOLERANCE:
            what = "top-1 agreement with full precision" if is_llm_row(row) else "top-1 accuracy"
            reasons.append(
                f"{what} drops by {fmt_pct(drop, 2)}, over the "
                f"{fmt_pct(limits.max_accuracy_drop, 2)} limit"
            )
    energy = as_number((row.get("metrics") or {}).get("energy_per_inference_j"))
    if limits.max_energy_j is not None or need_energy:
        per = "token" if is_llm_row(row) else "item"
        if energy is None:
            source = str((row.get("environment") or {}).get("energy.source") or "")
            why = source.removeprefix("none: ") if source.startswith("none") else ""
            reasons.append("no energy measured" + (f" ({why})" if why else ""))
        elif limits.max_energy_j is not None and energy > limits.max_energy_j + TOLERANCE:
            reasons.append(
                f"energy {fmt_joules(energy)}/{per} is over the "
                f"{fmt_joules(limits.max_energy_j)} limit"
            )
    if reasons or latency is None:
        return None, reasons
    candidate = Candidate(
        model=str(row["model"]),
        backend=str(row["backend"]),
        scheme=str(row["scheme"]),
        device=device_label(row),
        is_llm=is_llm_row(row),
        latency_ms=float(latency),
        memory_bytes=int(memory) if memory else None,
        size_bytes=row.get("model_size_bytes"),
        kld_mean=float(kld) if kld is not None else None,
        accuracy_drop=drop,
        result_id=row.get("result_id"),
        trial_medians_ms=tuple(float(v) for v in row.get("trial_medians_ms") or [] if v),
        kld_lower_bound=kld_is_lower_bound(row),
        energy_j=energy,
    )
    return candidate, []


def _order(objective: Objective) -> Any:
    inf = float("inf")
    if objective is Objective.MEMORY:
        return lambda c: (c.memory_bytes or inf, c.latency_ms)
    if objective is Objective.ENERGY:
        return lambda c: (inf if c.energy_j is None else c.energy_j, c.latency_ms)
    return lambda c: (c.latency_ms, c.memory_bytes or inf)


def recommend(
    rows: Iterable[Row],
    device: str,
    max_memory_bytes: int | None = None,
    max_kld: float | None = None,
    max_accuracy_drop: float | None = None,
    objective: Objective = Objective.LATENCY,
    model: str | None = None,
    runners_up: int = 3,
    max_energy_j: float | None = None,
) -> Recommendation:
    """The best configuration on ``device`` (its id or name) within the limits.

    ``model`` narrows to one model; without it every model measured is a candidate.
    Configurations measured only on other devices are listed as excluded.
    """
    limits = Limits(max_memory_bytes, max_kld, max_accuracy_drop, max_energy_j)
    pool = [r for r in rows if model is None or r["model"] == model]
    here: dict[ConfigKey, list[Row]] = {}
    elsewhere: dict[ConfigKey, set[str]] = {}
    for row in pool:
        if _matches(row, device):
            here.setdefault(_key(row), []).append(row)
        else:
            elsewhere.setdefault(_key(row), set()).add(device_label(row))
    admissible: list[Candidate] = []
    excluded: list[Exclusion] = []
    for key, measured in here.items():
        candidate, reasons = _judge(
            _newest(measured), pool, device, limits, objective is Objective.ENERGY
        )
        if candidate is not None:
            admissible.append(candidate)
        else:
            excluded.append(Exclusion(*key, tuple(reasons)))
    for key, devices in elsewhere.items():
        if key not in here:
            others = ", ".join(sorted(devices))
            excluded.append(Exclusion(*key, (f"not measured on {device} (only on {others})",)))
    admissible.sort(key=_order(objective))
    tied: list[tuple[Candidate, RatioInterval]] = []
    if objective is Objective.LATENCY and admissible:
        tied = _ties(admissible)
        if tied:  # not ranked inside the noise: the tie goes by peak memory
            group = sorted([admissible[0], *(c for c, _ in tied)], key=_order(Objective.MEMORY))
            admissible = group + [c for c in admissible if c not in group]
            tied = _ties(admissible)  # now against the chosen one
    return Recommendation(
        device=device,
        model=model,
        limits=limits,
        objective=objective,
        best=admissible[0] if admissible else None,
        runners_up=tuple(admissible[1 : 1 + runners_up]),
        excluded=tuple(excluded),
        admissible=len(admissible),
        rest=tuple(admissible[1 + runners_up :]),
        tied=tuple(tied),
    )
