"""The tunnels' shared timer (:mod:`tooti.tunnel.deadlines`): entries called in time
order at (or just after) their time, cancelled ones never, one task for all of them, and
a wake-up far past its deadline (a blocked loop) first lets other tasks catch up."""

from __future__ import annotations

import trio
import trio.testing

from tooti.tunnel import deadlines
from tooti.tunnel.deadlines import shared_timer


async def test_entries_called_in_order_and_cancelled_ones_never(
        autojump_clock: trio.testing.MockClock) -> None:
    timer = shared_timer()
    assert shared_timer() is timer  # one per run
    calls: list[tuple[str, float]] = []
    start = trio.current_time()
    timer.call_at(start + 3, lambda now: calls.append(("c", now)))
    timer.call_at(start + 1, lambda now: calls.append(("a", now)))
    dropped = timer.call_at(start + 2, lambda now: calls.append(("dropped", now)))
    timer.call_at(start + 2, lambda now: calls.append(("b", now)))
    dropped.cancel()
    await trio.sleep(5)
    assert [name for name, _ in calls] == ["a", "b", "c"]
    for (_, now), due in zip(calls, (1, 2, 3), strict=True):
        assert start + due <= now <= start + due + deadlines.GRANULARITY
    assert len(timer) == 0


async def test_an_earlier_entry_wakes_the_timer_sooner(
        autojump_clock: trio.testing.MockClock) -> None:
    timer = shared_timer()
    start = trio.current_time()
    seen: list[float] = []
    timer.call_at(start + 100, seen.append)
    await trio.sleep(1)
    timer.call_at(trio.current_time() + 1, seen.append)  # earlier than the sleeping one
    await trio.sleep(1.5)
    assert len(seen) == 1 and seen[0] < start + 3


async def test_a_failing_callback_does_not_stop_the_others(
        autojump_clock: trio.testing.MockClock) -> None:
    timer = shared_timer()
    start = trio.current_time()
    seen: list[float] = []

    def boom(now: float) -> None:
        raise ValueError("boom")

    timer.call_at(start + 1, boom)
    timer.call_at(start + 1, seen.append)
    timer.call_at(start + 2, seen.append)
    await trio.sleep(3)
    assert len(seen) == 2


async def test_a_late_wake_up_lets_the_loop_catch_up_first(
        autojump_clock: trio.testing.MockClock) -> None:
    """The loop blocked past an entry's time (a long synchronous job: the clock jumps
    while nothing runs): the entry is called only after the other runnable tasks had
    :data:`GRACE` to run."""
    timer = shared_timer()
    order: list[str] = []
    due = trio.current_time() + 0.05

    async def reader() -> None:  # its input "arrived" during the block, after the due time
        await trio.sleep_until(due + 0.5)
        order.append("reader")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        timer.call_at(due, lambda now: order.append("timer"))
        await trio.lowlevel.checkpoint()  # the timer task and the reader sleep now
        autojump_clock.jump(deadlines.LATE + 1.0)  # the loop "blocked" past both
    assert order == ["reader"]
    await trio.sleep(1)
    assert order == ["reader", "timer"]
