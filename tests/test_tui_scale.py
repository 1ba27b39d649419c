"""The TUI against a gateway with 10,000 peers: its tables are virtualised.

The peers table orders every peer but draws only a window of at most
:data:`tooti.tui.table.WINDOW` rows around the cursor, and a redraw writes only the
cells whose text changed. These tests drive the real app (Textual pilot, no network,
a fixed clock) over a 10,000-peer state and check the bounds by construction - rows
held by the table, cells written per redraw - never wall-clock time.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tests.test_tui_snapshots import NOW, SIZE
from tests.test_tui_state import T0, describe
from tooti.tui.app import TootiApp
from tooti.tui.columns import PEER_COLUMNS
from tooti.tui.state import NetworkState
from tooti.tui.table import WINDOW

PEERS = 10_000


def peer_id(index: int) -> str:
    return f"node-{index:05d}"


def big_network() -> NetworkState:
    """A snapshot of 10,000 live nodes, as the gateway's events stream starts."""
    state = NetworkState()
    state.handle("snapshot", {
        "seq": 1, "ts": T0, "queued": 0, "requests": [],
        "peers": [describe(peer_id(i), rtt_ms=1.0 + i % 7) for i in range(PEERS)],
    }, received_at=NOW)
    return state


def updated(seq: int, index: int, in_flight: int) -> dict[str, Any]:
    """A ``peer.updated`` event for node ``index`` with ``in_flight`` streams."""
    return {"seq": seq, "ts": T0 + 1, "kind": "peer.updated",
            "data": {"peer": describe(peer_id(index), in_flight=in_flight,
                                      rtt_ms=1.0 + index % 7)}}


def test_ten_thousand_peers_are_a_bounded_window() -> None:
    async def scenario() -> None:
        app = TootiApp("http://gw.example:8080", state=big_network(), connect=False,
                       clock=lambda: NOW)
        async with app.run_test(size=SIZE) as pilot:
            table = app.peers_table
            await pilot.pause()
            # Every peer is ordered (and counted in the title), only a window is drawn.
            assert len(table.shown_keys()) == PEERS
            assert f"({PEERS})" in str(table.border_title)
            assert table.row_count == WINDOW < PEERS
            assert table.drawn_keys() == table.shown_keys()[:WINDOW]
            assert table.cell(peer_id(PEERS - 1), "state") == "live"  # not drawn, known

            # A burst of events (one per peer, most outside the window) is folded into
            # the state and costs one redraw, which writes only the changed cells of the
            # drawn rows - never a row per event.
            shown = table.shown_keys()
            drawn = set(table.drawn_keys())
            for seq, key in enumerate(shown, start=2):
                app.state.handle("event", updated(seq, int(key.split("-")[1]), 1))
            app.redraw(force=True)
            assert table.row_count == WINDOW
            assert 0 < table.cells_written <= WINDOW * len(PEER_COLUMNS)
            assert table.cell(shown[0], "load") == "1/8"

            # A change to a peer outside the window writes nothing at all.
            outside = next(key for key in reversed(shown) if key not in drawn)
            app.state.handle("event", updated(PEERS + 10, int(outside.split("-")[1]), 3))
            app.redraw(force=True)
            assert table.cells_written == 0
            assert table.cell(outside, "load") == "3/8"

            # The cursor walks past the window: the window slides, still bounded.
            table.focus()
            while table.shown_keys().index(table.selected_key() or "") < WINDOW + 50:
                before = table.selected_key()
                await pilot.press("pagedown")
                assert table.selected_key() != before  # each page moves on
            position = table.shown_keys().index(table.selected_key() or "")
            assert position >= WINDOW and table.row_count <= WINDOW
            assert table.selected_key() in table.drawn_keys()
            await pilot.press("ctrl+end")
            assert table.selected_key() == table.shown_keys()[-1]
            assert table.row_count <= WINDOW
            await pilot.press("ctrl+home")
            assert table.selected_key() == table.shown_keys()[0]
            await pilot.press("up")  # already at the top: stays
            assert table.selected_key() == table.shown_keys()[0]

            # Walking down row by row crosses the window's edge without losing a row.
            table.show_key(table.shown_keys()[WINDOW - 2])
            await pilot.pause()
            walked = []
            for _ in range(4):
                await pilot.press("down")
                walked.append(table.selected_key())
            assert walked == table.shown_keys()[WINDOW - 1:WINDOW + 3]
            assert table.row_count <= WINDOW
            await pilot.press("q")
        assert app.return_code == 0

    asyncio.run(scenario())


def test_a_filter_over_ten_thousand_peers_draws_only_what_matches() -> None:
    async def scenario() -> None:
        app = TootiApp("http://gw.example:8080", state=big_network(), connect=False,
                       clock=lambda: NOW)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("slash", *"node-0999", "enter")
            await pilot.pause()
            table = app.peers_table
            assert table.shown_keys() == [peer_id(i) for i in range(9990, 10000)]
            assert table.row_count == 10
            await pilot.press("q")
        assert app.return_code == 0

    asyncio.run(scenario())
