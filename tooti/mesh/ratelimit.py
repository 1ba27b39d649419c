"""Per-client-address limits for unauthenticated work (tunnel handshakes, logins).

A :class:`PerAddressLimiter` gives each client address a token bucket (``rate``
starts per second on average, ``burst`` at once) and a cap on how many it may have
unfinished at a time. IPv6 addresses count per /64, since one host usually holds a
whole /64. Memory stays bounded however many addresses appear: buckets are kept for
the ``max_addresses`` most recently seen addresses (forgetting an older one only
gives it a full bucket again), and counts of unfinished work exist only while some is
unfinished.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import tooti.clock


class Limited(Exception):
    """Refused: ``reason`` says why, ``retry_after`` when to try again (s), ``limit``
    which limit: :data:`CONCURRENT` or :data:`RATE`."""

    def __init__(self, reason: str, retry_after: float, limit: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.limit = limit


CONCURRENT = "concurrent"
"""The cap on unfinished work."""
RATE = "rate"
"""The token bucket."""


def address_key(address: str | None) -> str:
    """The unit limits count per: an IPv4 address, an IPv6 /64, or the text itself."""
    if address is None:
        return "unknown"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class Slot:
    """One admitted piece of unfinished work; :meth:`release` it when it finishes (more
    than once is harmless; leaving a ``with`` block releases it too)."""

    __slots__ = ("_key", "_limiter")

    def __init__(self, limiter: PerAddressLimiter, key: str) -> None:
        self._limiter: PerAddressLimiter | None = limiter
        self._key = key

    def release(self) -> None:
        if self._limiter is not None:
            self._limiter._release(self._key)
            self._limiter = None

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class PerAddressLimiter:
    """Token bucket plus concurrency cap per client address (see the module doc);
    ``clock`` gives the seconds the buckets refill by (trio's, :func:`tooti.clock.now`,
    unless a test passes its own)."""

    def __init__(self, rate: float, burst: int, concurrent: int, *,
                 max_addresses: int = 65_536,
                 clock: Callable[[], float] = tooti.clock.now) -> None:
        self.rate = rate
        self.burst = burst
        self.concurrent = concurrent
        self.max_addresses = max_addresses
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._unfinished: dict[str, int] = {}

    def acquire(self, address: str | None, what: str = "requests", *,
                held: str | None = None) -> Slot:
        """Admit one more piece of work from ``address`` or raise :class:`Limited`
        (``what`` names the work in the reason, ``held`` the unfinished work: by
        default ``unfinished <what>``)."""
        key = address_key(address)
        if self._unfinished.get(key, 0) >= self.concurrent:
            raise Limited(f"too many {held or 'unfinished ' + what} from {key} (at most "
                          f"{self.concurrent} at once)", 1.0, CONCURRENT)
        now = self._clock()
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
        else:
            bucket.tokens = min(float(self.burst),
                                bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        self._buckets[key] = bucket  # most recently seen last
        while len(self._buckets) > self.max_addresses:
            self._buckets.popitem(last=False)
        if bucket.tokens < 1:
            wait = (1 - bucket.tokens) / self.rate if self.rate > 0 else math.inf
            raise Limited(f"too many {what} from {key} (at most {self.rate:g} per second "
                          f"after a burst of {self.burst}); retry in {wait:.1f}s", wait, RATE)
        bucket.tokens -= 1
        self._unfinished[key] = self._unfinished.get(key, 0) + 1
        return Slot(self, key)

    def unfinished(self, address: str | None) -> int:
        """Admitted, unreleased work of ``address`` (and its /64)."""
        return self._unfinished.get(address_key(address), 0)

    def _release(self, key: str) -> None:
        left = self._unfinished.get(key, 0) - 1
        if left > 0:
            self._unfinished[key] = left
        else:
            self._unfinished.pop(key, None)


class Throttle:
    """Says yes to each key at most once per ``every`` seconds: for log lines a client
    could otherwise repeat at will. Remembers at most ``max_keys`` keys; ``clock`` as for
    :class:`PerAddressLimiter`."""

    def __init__(self, every: float, *, max_keys: int = 1024,
                 clock: Callable[[], float] = tooti.clock.now) -> None:
        self.every = every
        self.max_keys = max_keys
        self._clock = clock
        self._last: dict[object, float] = {}
        self._refused: dict[object, int] = {}

    def allow(self, key: object = None) -> bool:
        """True if ``key`` was not allowed within the last ``every`` seconds."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            self._refused[key] = self._refused.get(key, 0) + 1
            return False
        if len(self._last) >= self.max_keys:
            self._last.clear()
            self._refused.clear()
        self._last[key] = now
        return True

    def refused_since(self, key: object = None) -> int:
        """How often ``key`` was refused since it was last allowed (and reset that)."""
        return self._refused.pop(key, 0)
