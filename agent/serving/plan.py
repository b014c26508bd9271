"""A serving trial's plan: its load levels, request shape and service-level objective,
and how the plan travels in a task's options (``serving.*`` keys: the campaign spec
writes them with :meth:`ServingPlan.to_options`, the agent reads them back with
:meth:`ServingPlan.from_options`). Plain data, no I/O: the coordinator imports it too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from edgefarm.errors import TaskError
from edgefarm.wire_limits import MAX_SERVING_LEVELS

ARRIVALS = ("constant", "poisson")
OPTION_PREFIX = "serving."


@dataclass(frozen=True)
class Level:
    """One load level: ``concurrency`` > 0, or ``rate`` > 0 with ``arrival``."""

    concurrency: int = 0
    rate: float = 0.0
    arrival: str = "constant"
    max_requests: int = 32
    max_duration_s: float = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.concurrency > 0) == (self.rate > 0):
            raise ValueError("a load level is a concurrency or a rate, not both or neither")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival must be one of {', '.join(ARRIVALS)}")
        if self.max_requests < 1 or self.max_duration_s <= 0:
            raise ValueError("a load level needs max_requests >= 1 and max_duration_s > 0")

    def label(self) -> str:
        """``c=4`` or ``r=2.0/s poisson``."""
        if self.concurrency:
            return f"c={self.concurrency}"
        return f"r={self.rate:g}/s {self.arrival}"


@dataclass(frozen=True)
class Slo:
    """Service-level objective for goodput."""

    ttft_ms: float = 500.0
    tpot_ms: float = 100.0


def split_options(options: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """``(serving plan options without their prefix, the backend's own options)``."""
    plan = {k[len(OPTION_PREFIX) :]: v for k, v in options.items() if k.startswith(OPTION_PREFIX)}
    own = {k: v for k, v in options.items() if not k.startswith(OPTION_PREFIX)}
    return plan, own


@dataclass(frozen=True)
class ServingPlan:
    """What one serving trial sends: its levels, request shape and objective."""

    concurrency: tuple[int, ...] = (1,)
    rates: tuple[float, ...] = ()
    arrival: str = "constant"
    requests: int = 16
    level_s: float = 60.0
    output_tokens: int = 64
    slo: Slo = field(default_factory=Slo)
    first_token_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        count = len(self.concurrency) + len(self.rates)
        if not 1 <= count <= MAX_SERVING_LEVELS:
            raise ValueError(f"needs 1 to {MAX_SERVING_LEVELS} levels, got {count}")
        if any(c < 1 for c in self.concurrency) or any(not r > 0 for r in self.rates):
            raise ValueError("concurrency levels must be >= 1 and rates > 0")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival must be one of {', '.join(ARRIVALS)}")
        if self.requests < 1 or self.output_tokens < 1:
            raise ValueError("requests and output_tokens must be at least 1")
        if not (self.level_s > 0 and self.first_token_timeout_s > 0):
            raise ValueError("level_s and first_token_timeout_s must be positive")

    def levels(self) -> list[Level]:
        """The load levels, concurrency levels first, each bounded in count and time."""
        n, s = self.requests, self.level_s
        return [
            Level(concurrency=c, max_requests=n, max_duration_s=s) for c in self.concurrency
        ] + [
            Level(rate=r, arrival=self.arrival, max_requests=n, max_duration_s=s)
            for r in self.rates
        ]

    def longest_s(self) -> float:
        """An upper bound of the plan's time: every level to its end, plus the last
        requests' time limits."""
        return len(self.levels()) * (self.level_s + 2 * self.first_token_timeout_s)

    def to_options(self) -> dict[str, str]:
        """The plan as ``serving.*`` task options."""
        values = {
            "concurrency": ",".join(str(c) for c in self.concurrency),
            "rates": ",".join(f"{r:g}" for r in self.rates),
            "arrival": self.arrival,
            "requests": str(self.requests),
            "level_s": f"{self.level_s:g}",
            "output_tokens": str(self.output_tokens),
            "slo_ttft_ms": f"{self.slo.ttft_ms:g}",
            "slo_tpot_ms": f"{self.slo.tpot_ms:g}",
            "first_token_timeout_s": f"{self.first_token_timeout_s:g}",
        }
        return {OPTION_PREFIX + k: v for k, v in values.items() if v}

    @classmethod
    def from_options(cls, options: dict[str, str]) -> ServingPlan:
        """The plan from :func:`split_options`' first part; TaskError naming the option."""
        parsers: dict[str, Callable[[str], object]] = {
            "concurrency": lambda v: tuple(int(x) for x in v.split(",") if x.strip()),
            "rates": lambda v: tuple(float(x) for x in v.split(",") if x.strip()),
            "arrival": str,
            "requests": int,
            "level_s": float,
            "output_tokens": int,
            "slo_ttft_ms": float,
            "slo_tpot_ms": float,
            "first_token_timeout_s": float,
        }
        unknown = sorted(set(options) - set(parsers))
        if unknown:
            raise TaskError(f"unknown serving option(s): {', '.join(unknown)}")
        values: dict[str, object] = {}
        for key, text in options.items():
            try:
                values[key] = parsers[key](text)
            except ValueError:
                raise TaskError(f"serving option {key}: cannot read {text[:40]!r}") from None
        slo = Slo(
            ttft_ms=float(values.pop("slo_ttft_ms", Slo.ttft_ms)),  # type: ignore[arg-type]
            tpot_ms=float(values.pop("slo_tpot_ms", Slo.tpot_ms)),  # type: ignore[arg-type]
        )
        if "rates" in values and "concurrency" not in values:
            values["concurrency"] = ()
        try:
            return cls(slo=slo, **values)  # type: ignore[arg-type]
        except (TypeError, ValueError) as err:
            raise TaskError(f"serving options: {err}") from None
