"""Finding 4: non-streamed answers are held whole until END (so they can still fail
over), and each could take 64 MiB with no bound over all of them: ten hostile 100 MB
answers took a gateway from 52 to 710 MB. Now every byte held is reserved from one
gateway-wide budget (``gateway.max_buffered_bytes``); an answer that finds no room
within ``gateway.buffer_wait`` (or is refused so that an older answer can finish) gets
503 ``gateway_memory_busy``, and the budget is given back on every path."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import simulated
from tests.hostile.ledgered import CHAT, LIMIT, LedgeredNetwork, start_ledgered, still_serves
from tests.hostile.scripted_backend import MODEL, Answer, ScriptedBackend
from tooti.gateway.byte_budget import BudgetExhausted, ByteBudget, Share

MiB = 1 << 20
BUDGET = 16 * MiB
BLOCK = b"x" * (256 * 1024)
PROMPT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def answering(size: int, hold: trio.Event | None = None) -> ScriptedBackend:
    """A backend whose every non-streamed answer is ``size`` bytes (one block object
    repeated, so the backend itself holds no more than a block)."""
    def script(request: dict[str, Any]) -> Answer:
        return Answer(chunks=[BLOCK] * (size // len(BLOCK)), hold=hold)
    return ScriptedBackend(script)


async def ask_all(net: LedgeredNetwork, count: int,
                  answered: Callable[[int], None] = lambda done: None,
                  ) -> list[tuple[int, str | None]]:
    """``count`` concurrent requests; each one's status and error code (``answered``
    is told how many are done after each)."""
    results: list[tuple[int, str | None]] = []

    async def one() -> None:
        async with net.client() as http:
            response = await http.post(CHAT, json=PROMPT)
        code = None if response.status_code == 200 else response.json()["error"]["code"]
        results.append((response.status_code, code))
        answered(len(results))

    with trio.fail_after(LIMIT * 2):
        async with trio.open_nursery() as requests:
            for _ in range(count):
                requests.start_soon(one)
    return sorted(results, key=lambda result: (result[0], result[1] or ""))


async def with_nodes(nursery: trio.Nursery, tmp_path: Path, count: int,
                     backend: Callable[[], ScriptedBackend]) -> LedgeredNetwork:
    net = await start_ledgered(nursery, tmp_path, max_buffered_bytes=BUDGET,
                               max_response_bytes=8 * MiB, buffer_wait=1.0)
    for index in range(count):
        await net.add_node([backend()], node_id=f"hostile-{index}")
    return net


async def test_answers_beyond_the_budget_wait_then_get_503(
    nursery: trio.Nursery, tmp_path: Path,
) -> None:
    """Four 6 MiB answers held in flight against a 16 MiB budget: all four cannot fit,
    and answers that each hold part of the budget while waiting for more would starve
    each other; the two youngest are refused (503) so the two oldest finish."""
    hold = trio.Event()
    net = await with_nodes(nursery, tmp_path, 4, lambda: answering(6 * MiB, hold))

    def release_when_two_refused(done: int) -> None:
        if done == 2:  # only refusals can come back while the answers are held
            hold.set()

    results = await ask_all(net, 4, release_when_two_refused)
    assert results == [(200, None), (200, None),
                       (503, "gateway_memory_busy"), (503, "gateway_memory_busy")]
    budget = net.gateway.proxy.buffers
    assert budget.high_water <= BUDGET
    await trio.testing.wait_all_tasks_blocked()  # the request tasks have finished
    assert budget.used == 0
    await still_serves(net)


async def test_hostile_100_mb_answers_never_hold_more_than_the_budget(
    nursery: trio.Nursery, tmp_path: Path,
) -> None:
    """Four nodes each answer 100 MB at once: each answer is cut at the per-answer cap
    (502), the budget is never exceeded and is all given back."""
    net = await with_nodes(nursery, tmp_path, 4, lambda: answering(100 * MiB))
    results = await ask_all(net, 4)
    assert {code for _, code in results} <= {"response_too_large", "gateway_memory_busy"}
    assert all(status in (502, 503) for status, _ in results)
    budget = net.gateway.proxy.buffers
    assert 8 * MiB <= budget.high_water <= BUDGET
    await trio.testing.wait_all_tasks_blocked()
    assert budget.used == 0
    await still_serves(net)


async def test_the_oldest_waiting_holder_goes_on_and_the_youngest_is_refused(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Two answers each hold half the budget and both need more: without refusing one
    they would wait for each other until both time out."""
    budget = ByteBudget(10)
    older, younger = budget.share(), budget.share()
    assert older.try_reserve(5) and younger.try_reserve(5)
    outcomes: dict[str, str] = {}

    async def more(name: str, share: Share) -> None:
        try:
            await share.reserve(1)
            outcomes[name] = "granted"
        except BudgetExhausted:
            outcomes[name] = "refused"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(more, "older", older)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(more, "younger", younger)
    assert outcomes == {"older": "granted", "younger": "refused"}
    assert (budget.used, older.held, younger.held, budget.high_water) == (6, 6, 0, 10)
    assert not younger.try_reserve(1)  # a refused answer gets nothing more
    older.release()
    assert budget.used == 0


async def test_a_holder_waits_for_room_until_given_or_until_its_wait_ends(
    autojump_clock: trio.abc.Clock,
) -> None:
    budget = ByteBudget(10)
    sending, waiting = budget.share(), budget.share()
    assert sending.try_reserve(8)
    with trio.move_on_after(5) as timer:  # the holder is not waiting: nobody is refused
        await waiting.reserve(4)
    assert timer.cancelled_caught and budget.used == 8 and waiting.held == 0

    async def release_later() -> None:
        await trio.sleep(1)
        sending.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(release_later)
        await waiting.reserve(4)
    assert (budget.used, waiting.held) == (4, 4)
    with pytest.raises(BudgetExhausted):
        await waiting.reserve(11)  # can never fit


async def test_one_node_holds_at_most_a_quarter_of_the_budget(
    nursery: trio.Nursery, tmp_path: Path,
) -> None:
    """A node whose answers stall holds at most a quarter of the budget (its answers
    beyond it wait, then get 503), so another node's answer is still served meanwhile."""
    hold = trio.Event()
    net = await start_ledgered(nursery, tmp_path, max_buffered_bytes=BUDGET,
                               max_response_bytes=2 * MiB, buffer_wait=1.0)
    await net.add_node([answering(2 * MiB - len(BLOCK), hold)], node_id="stalling")
    await net.add_node([simulated()], node_id="honest")
    proxy = net.gateway.proxy
    two_answered, all_answered = trio.Event(), trio.Event()
    results: list[tuple[int, str | None]] = []

    def answered(done: int) -> None:
        if done == 2:  # only refusals can come back while the node stalls
            two_answered.set()
        if done == 4:
            all_answered.set()

    async def stalled() -> None:  # four answers of 2 MiB, each held before its last block
        results.extend(await ask_all(net, 4, answered))

    nursery.start_soon(stalled)
    with trio.fail_after(LIMIT):
        await two_answered.wait()
    assert 0 < proxy.node_buffers["stalling"].used <= BUDGET // 4
    async with net.client() as http:  # the rest of the budget serves other nodes
        response = await http.post(CHAT, json={**PROMPT, "model": "tooti-sim"})
    assert response.status_code == 200, response.text
    hold.set()
    with trio.fail_after(LIMIT):
        await all_answered.wait()
        while len(results) < 4:  # ask_all returns right after its last answer
            await trio.testing.wait_all_tasks_blocked()
    assert results == [(200, None), (200, None),
                       (503, "gateway_memory_busy"), (503, "gateway_memory_busy")]
    await trio.testing.wait_all_tasks_blocked()
    assert proxy.buffers.used == 0 and "stalling" not in proxy.node_buffers


async def test_memory_held_for_answers_stays_near_the_budget(
    nursery: trio.Nursery, tmp_path: Path,
) -> None:
    """What the process really allocates (traced by tracemalloc, gateway and nodes
    together) while four nodes answer 100 MB at once stays within the budget plus the
    tunnels' windows and buffers: no copy of an answer is kept outside its share."""
    net = await with_nodes(nursery, tmp_path, 4, lambda: answering(100 * MiB))
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        results = await ask_all(net, 4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(status in (502, 503) for status, _ in results)
    assert peak < BUDGET + 16 * MiB, f"{peak / MiB:.1f} MiB traced at the peak"
