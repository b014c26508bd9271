"""Jittered exponential backoff for reconnecting to the coordinator."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from edgefarm.wire_limits import MAX_RECONNECT_DELAY_S


@dataclass
class Backoff:
    """'Full jitter' backoff: each delay is uniform in [0, min(cap, base * 2**n)]."""

    base_s: float = 0.5
    cap_s: float = MAX_RECONNECT_DELAY_S
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        """The delay before the next try; grows until :meth:`reset`."""
        ceiling = min(self.cap_s, self.base_s * (2**self.attempt))
        self.attempt += 1
        return self.rng.uniform(self.base_s / 4, ceiling)

    def reset(self) -> None:
        """Call after a successful connection."""
        self.attempt = 0
