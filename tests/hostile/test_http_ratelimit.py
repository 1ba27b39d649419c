"""The per-address limiter behind the tunnel-handshake limits (and, later, logins), with
a clock the test moves by hand."""

from __future__ import annotations

import pytest

from tooti.mesh.ratelimit import Limited, PerAddressLimiter, Throttle, address_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_rate() -> None:
    clock = Clock()
    limiter = PerAddressLimiter(rate=2.0, burst=3, concurrent=100, clock=clock)
    for _ in range(3):
        limiter.acquire("10.0.0.1").release()
    with pytest.raises(Limited) as refused:
        limiter.acquire("10.0.0.1", "logins")
    assert refused.value.reason.startswith("too many logins from 10.0.0.1")
    assert refused.value.retry_after == pytest.approx(0.5)
    clock.now += 0.5  # one token back at 2 per second
    limiter.acquire("10.0.0.1").release()
    with pytest.raises(Limited):
        limiter.acquire("10.0.0.1")
    clock.now += 100  # never more than the burst
    for _ in range(3):
        limiter.acquire("10.0.0.1").release()
    with pytest.raises(Limited):
        limiter.acquire("10.0.0.1")
    limiter.acquire("10.0.0.2").release()  # another address has its own bucket


def test_unfinished_work_is_capped_until_released() -> None:
    limiter = PerAddressLimiter(rate=100.0, burst=100, concurrent=2, clock=Clock())
    first = limiter.acquire("10.0.0.1")
    with limiter.acquire("10.0.0.1"):
        with pytest.raises(Limited) as refused:
            limiter.acquire("10.0.0.1", "handshakes")
        assert "unfinished handshakes" in refused.value.reason
    assert limiter.unfinished("10.0.0.1") == 1
    first.release()
    first.release()  # twice is harmless
    assert limiter.unfinished("10.0.0.1") == 0
    limiter.acquire("10.0.0.1")


def test_ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() -> None:
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::2") \
        == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key(None) == "unknown"
    limiter = PerAddressLimiter(rate=0.001, burst=1, concurrent=10, clock=Clock())
    limiter.acquire("2001:db8:1:2::1").release()
    with pytest.raises(Limited):
        limiter.acquire("2001:db8:1:2:ffff::9")  # same /64: same bucket


def test_memory_stays_bounded_however_many_addresses() -> None:
    limiter = PerAddressLimiter(rate=1.0, burst=1, concurrent=10, max_addresses=100,
                                clock=Clock())
    for i in range(10_000):
        limiter.acquire(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}").release()
    assert len(limiter._buckets) == 100
    assert not limiter._unfinished


def test_throttle_allows_each_key_once_per_interval() -> None:
    clock = Clock()
    throttle = Throttle(60.0, clock=clock)
    assert throttle.allow("a") and throttle.allow("b")
    assert not throttle.allow("a")
    clock.now += 60
    assert throttle.allow("a")
