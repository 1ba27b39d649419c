"""What the gateway itself measures about each node and model: speed and failures.

Nothing here is taken from the node's word: time to first token and decode
speed are measured by the gateway on the requests it forwards (EWMA), and
failures are counted by the gateway. ``N`` failures within a window put a
node's model in **cooldown**; each further cooldown doubles the duration (up
to a cap). When a cooldown expires the node is not trusted again at once: the
gateway sends it a cheap probe request, and only a successful probe returns
it to user traffic; a failed probe starts the next, longer cooldown.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from tooti import clock

EWMA_WEIGHT = 0.3
"""Weight of the newest sample in the moving averages."""


@dataclass(frozen=True)
class CooldownPolicy:
    """When failures put a node's model in cooldown, and for how long."""

    failures: int = 3
    """Failures within ``window`` seconds that start a cooldown."""
    window: float = 60.0
    base: float = 5.0
    """Seconds of the first cooldown; each repeat doubles it."""
    maximum: float = 300.0
    forgive_after: float = 600.0
    """Seconds of good health after which the doubling starts over."""


FAILURES_KEPT = 64
"""Failure times a :class:`ModelHealth` keeps (enough for any sensible cooldown policy)."""


@dataclass
class ModelHealth:
    """One node's record for one model."""

    ttft_ms: float | None = None
    """EWMA of time from OPEN to the first token (first body byte), measured here."""
    tokens_per_s: float | None = None
    """EWMA of completion tokens per second after the first token."""
    samples: int = 0
    recent_failures: deque[float] | None = None
    """When the last failures happened (at most :data:`FAILURES_KEPT`), made at the first
    failure: most of 10,000 idle nodes never fail, and an empty deque is ~600 bytes."""
    cooldowns: int = 0
    """Cooldowns in a row (the exponent of the next duration)."""
    cooldown_until: float = 0.0
    """:func:`tooti.clock.now` time the current cooldown ends; 0 when not in cooldown."""
    cooldown_reason: str = ""
    probing: bool = False
    last_cooldown_end: float = 0.0

    @property
    def in_cooldown(self) -> bool:
        """True from the start of a cooldown until a probe succeeds."""
        return self.cooldown_until > 0.0

    def record_success(self, ttft_s: float | None, tokens: int, decode_s: float) -> None:
        """Fold one successful request's timings into the averages."""
        self.samples += 1
        if ttft_s is not None:
            ms = ttft_s * 1000
            self.ttft_ms = ms if self.ttft_ms is None else _ewma(self.ttft_ms, ms)
        if tokens > 1 and decode_s > 0:
            rate = tokens / decode_s
            self.tokens_per_s = rate if self.tokens_per_s is None else _ewma(
                self.tokens_per_s, rate)

    def record_failure(self, reason: str, policy: CooldownPolicy,
                       now: float | None = None) -> bool:
        """Count a failure; returns True if it started a cooldown."""
        now = clock.now() if now is None else now
        if self.in_cooldown:
            return False
        failures = self.recent_failures
        if failures is None:
            failures = self.recent_failures = deque(maxlen=FAILURES_KEPT)
        failures.append(now)
        recent = sum(1 for t in failures if now - t <= policy.window)
        if recent < policy.failures:
            return False
        self.start_cooldown(reason, policy, now)
        return True

    def start_cooldown(self, reason: str, policy: CooldownPolicy,
                       now: float | None = None) -> float:
        """Enter cooldown (longer each time in a row); returns its duration."""
        now = clock.now() if now is None else now
        if self.last_cooldown_end and now - self.last_cooldown_end > policy.forgive_after:
            self.cooldowns = 0
        duration = min(policy.maximum, policy.base * 2 ** self.cooldowns)
        self.cooldowns += 1
        self.cooldown_until = now + duration
        self.cooldown_reason = reason
        self.recent_failures = None
        return duration

    def end_cooldown(self, now: float | None = None) -> None:
        """A probe succeeded: back to user traffic."""
        self.cooldown_until = 0.0
        self.cooldown_reason = ""
        self.probing = False
        self.last_cooldown_end = clock.now() if now is None else now

    def describe(self, now: float | None = None) -> dict[str, Any]:
        """JSON-able state for the admin API."""
        now = clock.now() if now is None else now
        out: dict[str, Any] = {
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 2),
            "tokens_per_s": None if self.tokens_per_s is None else round(self.tokens_per_s, 2),
            "samples": self.samples,
            "state": "cooldown" if self.in_cooldown else "ok",
        }
        if self.in_cooldown:
            out["cooldown"] = {
                "reason": self.cooldown_reason,
                "seconds_left": round(max(0.0, self.cooldown_until - now), 3),
                "count": self.cooldowns,
                "probing": self.probing,
            }
        return out


def _ewma(old: float, new: float) -> float:
    return (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * new
