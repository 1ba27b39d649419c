"""Snapshots of the TUI's screens (pytest-textual-snapshot), from a recorded event
sequence with fixed times: no gateway, no clock, so the SVGs are stable.

Update after an intended change of the layout with
``pytest tests/test_tui_snapshots.py --snapshot-update`` and review the SVGs under
``tests/__snapshots__/``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tests.test_tui_state import T0, Recorder, describe, replay
from tooti.tui.app import DetailScreen, HelpScreen, TootiApp
from tooti.tui.client import Status
from tooti.tui.state import NetworkState

SIZE = (130, 34)
NOW = T0 + 30.0
"""The fixed moment every screen is drawn at."""
LIVE = Status("live", "connected to http://gw.example:8080")
COOLDOWN = {"reason": "node cpu-c sent no token within 10s", "seconds_left": 4.2,
            "count": 1, "probing": False}


def recorded_network() -> NetworkState:
    """Thirty seconds of a small network: four nodes (one behind a relay), one that
    fails into cooldown, one that leaves; requests that succeed, fail over, fail,
    get cancelled, stream and wait."""
    rec = Recorder()
    rec.at(0, "peer.joined", peer=describe("gpu-a", labels={"region": "eu"}, ttft_ms=85.3,
                                           tok_s=142.7, samples=40, rtt_ms=2.1))
    rec.at(0, "peer.joined", peer=describe("gpu-b", labels={"region": "us"}, ttft_ms=131.0,
                                           tok_s=96.4, samples=22, rtt_ms=48.6))
    rec.at(0, "peer.joined", peer=describe("cpu-c", capacity=2, ttft_ms=410.0, tok_s=21.5,
                                           samples=5, rtt_ms=3.4))
    rec.at(0, "peer.joined", peer=describe("relay-1", role="relay", models=(), rtt_ms=12.0))
    rec.at(0, "peer.joined", peer=describe("edge-d", models=("tooti-sim", "tiny-embed"),
                                           via="relay-1", capacity=4, ttft_ms=220.0,
                                           samples=3, rtt_ms=25.0))
    rec.at(0, "peer.joined", peer=describe("edge-e", capacity=2, rtt_ms=30.0))
    snapshot = rec.snapshot()
    state = NetworkState()
    state.apply_snapshot(snapshot, received_at=T0)

    keys = ["anonymous", "key-5f2a9c0e11d34b7a", "key-c0ffee0042421337"]
    for i in range(14):
        node = ("gpu-a", "gpu-b", "gpu-a", "edge-d")[i % 4]
        rec.request(1 + i * 1.5, f"req_{i:02d}a1b2c3d4e5f6", [node], ttft=0.08 + 0.01 * (i % 5),
                    duration=0.6 + 0.1 * (i % 3), completion=24 + 8 * (i % 6),
                    prompt=9 + i, key_id=keys[i % 3], stream=i % 5 != 4)
    rec.request(12, "req_failover0000000", ["cpu-c", "gpu-a"], ttft=0.11, duration=1.4,
                completion=64, key_id=keys[1])
    for n in range(3):
        rec.at(13 + n, "request.received", request_id=f"req_cfail{n}", model="tooti-sim",
               endpoint="chat/completions", stream=True, key_id=keys[0])
        rec.at(13.01 + n, "request.routed", request_id=f"req_cfail{n}", node="cpu-c",
               model="tooti-sim", attempt=1)
        rec.at(13.02 + n, "request.routed", request_id=f"req_cfail{n}", node="gpu-b",
               model="tooti-sim", attempt=2)
        rec.at(13.2 + n, "request.first_token", request_id=f"req_cfail{n}", node="gpu-b",
               ttft_ms=180.0)
        rec.at(13.9 + n, "request.finished", request_id=f"req_cfail{n}", status="ok",
               node="gpu-b", model="tooti-sim", attempts=2, prompt_tokens=11,
               completion_tokens=48, estimated=False, ttft_ms=180.0, tok_s=68.6,
               latency_ms=900.0, error=None)
    rec.at(15.5, "peer.cooldown", peer_id="cpu-c", model="tooti-sim", ttft_ms=410.0,
           tokens_per_s=21.5, samples=5, state="cooldown", cooldown=COOLDOWN)
    rec.request(18, "req_nomodel00000000", [], status="failed", duration=0.002,
                error="model 'llama-70b' is not served by any live node", model="llama-70b")
    rec.request(20, "req_cancelled000000", ["gpu-b"], status="cancelled", duration=2.5,
                error=None)
    rec.at(22, "peer.left", peer_id="edge-e", reason="tunnel lost: no heartbeat for 9s")
    rec.at(25, "peer.updated", peer=describe("gpu-a", labels={"region": "eu"}, in_flight=0,
                                             ttft_ms=84.9, tok_s=141.2, samples=44,
                                             rtt_ms=2.0))
    rec.request(27.5, "req_streaming000001", ["gpu-a"], ttft=0.09, until="first_token",
                key_id=keys[2])
    rec.request(28.8, "req_streaming000002", ["gpu-a"], ttft=0.12, until="first_token")
    rec.at(29.9, "request.received", request_id="req_queued000000001", model="tooti-sim",
           endpoint="completions", stream=False, key_id=keys[1])
    replay(state, rec.since(snapshot["seq"]))
    return state


def make_app(status: Status = LIVE, state: NetworkState | None = None) -> TootiApp:
    """The TUI on the recorded network, frozen at :data:`NOW`."""
    return TootiApp("http://gw.example:8080", state=state or recorded_network(),
                    connect=False, clock=lambda: NOW, status=status)


def open_row(table: str, key: str) -> Callable[[Any], Any]:
    """A ``run_before`` that opens the details of row ``key`` of ``table``."""
    async def run_before(pilot: Any) -> None:
        app: TootiApp = pilot.app
        live = app.peers_table if table == "peers" else app.requests_table
        live.focus()
        await pilot.pause()
        live.move_cursor(row=live.shown_keys().index(key))
        await pilot.press("enter")
        await pilot.pause()
    return run_before


def test_main_screen(snap_compare: Any) -> None:
    assert snap_compare(make_app(), terminal_size=SIZE)


def test_request_timeline_with_failover(snap_compare: Any) -> None:
    assert snap_compare(make_app(), terminal_size=SIZE,
                        run_before=open_row("requests", "req_failover0000000"))


def test_peer_details_in_cooldown(snap_compare: Any) -> None:
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=open_row("peers", "cpu-c"))


def test_filtered_and_sorted(snap_compare: Any) -> None:
    async def sort_by_ttft(pilot: Any) -> None:
        pilot.app.requests_table.sort_on("ttft")
        pilot.app.requests_table.sort_on("ttft")  # again: slowest first

    assert snap_compare(make_app(), terminal_size=SIZE,
                        press=["slash", *"gpu-b", "enter"], run_before=sort_by_ttft)


def test_help(snap_compare: Any) -> None:
    assert snap_compare(make_app(), terminal_size=SIZE, press=["question_mark"])


def test_reconnecting_keeps_the_last_picture(snap_compare: Any) -> None:
    status = Status("reconnecting", "cannot connect to http://gw.example:8080",
                    retry_in=4.0, attempt=3)
    assert snap_compare(make_app(status), terminal_size=SIZE)


def test_refused_admin_key(snap_compare: Any) -> None:
    status = Status("unauthorized", "admin key rejected: check --admin-key / "
                    "TOOTI_ADMIN_KEY [a valid admin key is required (invalid_admin_key)]",
                    retry_in=30.0, attempt=1)
    assert snap_compare(make_app(status, NetworkState()), terminal_size=SIZE)


def test_keys_open_and_close_the_modals() -> None:
    async def scenario() -> None:
        app = make_app()
        async with app.run_test(size=SIZE) as pilot:
            assert app.focused is app.peers_table
            await pilot.press("tab")
            assert app.focused is app.requests_table
            await pilot.press("enter")
            assert isinstance(app.screen, DetailScreen)
            await pilot.press("escape")
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape")
            await pilot.press("slash", *"qz")  # typed into the filter: no quitting
            assert app.filter_text == "qz" and app.peers_table.shown_keys() == []
            await pilot.press("escape")
            assert len(app.peers_table.shown_keys()) == 6
            await pilot.press("s")  # the focused pane sorts by its next column
            assert app.peers_table.sort_by == "role"
            await pilot.press("q")
        assert app.return_code == 0

    asyncio.run(scenario())


def test_the_cursor_stays_on_its_row_as_new_requests_arrive() -> None:
    async def scenario() -> None:
        app = make_app()
        async with app.run_test(size=SIZE) as pilot:
            table = app.requests_table
            table.focus()
            await pilot.pause()
            for n, row in enumerate((0, 3)):
                table.move_cursor(row=row)
                await pilot.pause()
                chosen = table.selected_key()
                newest = f"req_newest{n}"
                app.state.apply({"seq": app.state.seq + 1, "kind": "request.received",
                                 "ts": NOW, "data": {"request_id": newest, "model": "m"}})
                for _ in range(100):
                    if table.shown_keys()[0] == newest:
                        break
                    await pilot.pause(0.05)
                if row == 0:  # on the top row: stays on top, on the newest request
                    assert table.selected_key() == newest and table.cursor_row == 0
                else:  # elsewhere: stays on its request, which moved down one row
                    assert table.selected_key() == chosen and table.cursor_row == row + 1

    asyncio.run(scenario())
