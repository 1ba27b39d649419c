"""The tunnel's low-level wake-ups: :class:`tooti.tunnel.streams.StreamIO` (a stream's
reader) and :class:`tooti.tunnel.session.Wakeup` (the writer task).

Both replaced a new ``trio.Event`` per wake-up with trio's park/reschedule; these
tests pin the Event semantics they must keep: a wake-up that comes before the wait is
not lost, a cancelled waiter leaves nothing behind, every parked reader is woken.
Nothing sleeps to wait for a condition: ``wait_all_tasks_blocked`` settles the tasks.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tooti.tunnel.session import Wakeup
from tooti.tunnel.streams import StreamIO


async def test_a_wake_before_the_wait_is_not_lost() -> None:
    io = StreamIO()
    io.wake()
    with trio.fail_after(1):
        await io.wait_changed()  # returns at once: the mark was left
    woken = False

    async def reader() -> None:
        nonlocal woken
        await io.wait_changed()
        woken = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert not woken  # the mark was consumed: this wait parks
        io.wake()
    assert woken


async def test_every_parked_reader_is_woken_and_a_cancelled_one_is_forgotten() -> None:
    io = StreamIO()
    woken: list[int] = []
    scopes = [trio.CancelScope() for _ in range(3)]

    async def reader(index: int) -> None:
        with scopes[index]:
            await io.wait_changed()
            woken.append(index)

    async with trio.open_nursery() as nursery:
        for index in range(3):
            nursery.start_soon(reader, index)
        await trio.testing.wait_all_tasks_blocked()
        assert len(io._waiters) == 3
        scopes[0].cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert len(io._waiters) == 2  # the cancelled reader took itself off
        io.fail("lost")  # wakes every parked reader, as wake() does
    assert sorted(woken) == [1, 2]
    assert io.lost == "lost" and io._waiters == []


async def test_a_cancelled_reader_leaves_no_waiter_behind() -> None:
    io = StreamIO()
    with trio.move_on_after(0.01) as scope:  # a real deadline: cancels the parked wait
        await io.wait_changed()
    assert scope.cancelled_caught and io._waiters == []
    io.wake()  # nobody parked: a mark, not a reschedule of a dead task
    with trio.fail_after(1):
        await io.wait_changed()


async def test_the_writer_wakeup_keeps_event_semantics() -> None:
    wake = Wakeup()
    wake.set()
    with trio.fail_after(1):
        await wake.wait()  # marked before: at once
    done = False

    async def waiter() -> None:
        nonlocal done
        await wake.wait()
        done = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not done
        with pytest.raises(RuntimeError, match="already waiting"):
            await wake.wait()  # one waiter at a time
        wake.set()
    assert done
    with trio.move_on_after(0.01) as scope:
        await wake.wait()
    assert scope.cancelled_caught and wake._task is None
