"""The one backoff: doubling delays up to a cap, jitter from an injected RNG, reset,
holding at the cap; and the loops that wait on it, on trio's autojump clock."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from tooti import clock
from tooti.backoff import Backoff
from tooti.billing.base import Billing
from tooti.billing.pipeline import MAX_RESTART_DELAY, RESTART_DELAY, _keep_running


def test_delays_double_up_to_the_cap() -> None:
    backoff = Backoff(0.5, 4.0)
    assert [backoff.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.attempts == 6


def test_a_factor_other_than_two() -> None:
    backoff = Backoff(1.0, 50.0, factor=3.0)
    assert [backoff.next() for _ in range(5)] == [1.0, 3.0, 9.0, 27.0, 50.0]


def test_reset_starts_over() -> None:
    backoff = Backoff(1.0, 8.0)
    for _ in range(3):
        backoff.next()
    backoff.reset()
    assert backoff.attempts == 0
    assert [backoff.next() for _ in range(2)] == [1.0, 2.0]


def test_hold_at_cap_until_reset() -> None:
    backoff = Backoff(0.25, 10.0)
    backoff.next()
    backoff.hold_at_cap()
    assert [backoff.next() for _ in range(3)] == [10.0, 10.0, 10.0]
    backoff.reset()
    assert backoff.next() == 0.25


def test_jitter_scales_each_delay_within_its_range() -> None:
    backoff = Backoff(1.0, 8.0, jitter=(0.5, 1.0), rng=random.Random(7))
    plain = [1.0, 2.0, 4.0, 8.0] + [8.0] * 196
    delays = [backoff.next() for _ in plain]
    assert all(0.5 * p <= d <= p for d, p in zip(delays, plain, strict=True))
    assert len(set(delays)) > 100  # drawn, not fixed


def test_the_injected_rng_makes_the_delays_repeatable() -> None:
    def delays(seed: int) -> list[float]:
        backoff = Backoff(0.5, 10.0, jitter=(0.8, 1.2), rng=random.Random(seed))
        return [backoff.next() for _ in range(10)]

    assert delays(1) == delays(1)
    assert delays(1) != delays(2)


def test_many_attempts_do_not_overflow() -> None:
    backoff = Backoff(1.0, 30.0)
    for _ in range(5000):
        delay = backoff.next()
    assert delay == 30.0


@pytest.mark.parametrize(
    ("base", "cap", "factor", "jitter"),
    [(-1.0, 1.0, 2.0, (1.0, 1.0)), (2.0, 1.0, 2.0, (1.0, 1.0)),
     (1.0, 2.0, 0.5, (1.0, 1.0)), (1.0, 2.0, 2.0, (1.2, 0.8)), (1.0, 2.0, 2.0, (-0.1, 1.0))],
    ids=["negative-base", "cap-below-base", "shrinking", "inverted-jitter", "negative-jitter"],
)
def test_nonsense_is_refused(base: float, cap: float, factor: float,
                             jitter: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(base, cap, factor=factor, jitter=jitter)


class _Failing(Billing):
    """A billing plugin whose ``run`` raises ``failures`` times (each after ``ran``
    seconds), then returns; it notes when each run started."""

    def __init__(self, failures: int, ran: float = 0.0) -> None:
        self.failures = failures
        self.ran = ran
        self.starts: list[float] = []

    async def run(self) -> None:
        self.starts.append(clock.now())
        if len(self.starts) > self.failures:
            return
        await trio.sleep(self.ran)
        raise RuntimeError("broken plugin")


def _gaps(plugin: _Failing) -> list[float]:
    return [round(b - a, 6) for a, b in zip(plugin.starts, plugin.starts[1:], strict=False)]


async def test_a_failing_billing_plugin_restarts_later_each_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    plugin = _Failing(failures=7)
    await _keep_running(plugin)
    assert RESTART_DELAY == 1.0 and MAX_RESTART_DELAY == 60.0
    assert _gaps(plugin) == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0]


async def test_a_billing_plugin_that_ran_long_restarts_quickly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    plugin = _Failing(failures=3, ran=MAX_RESTART_DELAY + 1)
    await _keep_running(plugin)
    assert _gaps(plugin) == [MAX_RESTART_DELAY + 1 + 1.0] * 3
