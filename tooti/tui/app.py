"""The Textual app behind ``tooti tui``: peers, request flows and totals, live.

A worker reads the gateway's admin events stream (:func:`tooti.tui.client.follow`)
into a :class:`~tooti.tui.state.NetworkState`; a timer redraws whatever changed a
few times a second, so a busy gateway costs one redraw per tick, not one per
event. This module holds the app (layout, drawing, keys); its widgets are
:mod:`tooti.tui.table` and :mod:`tooti.tui.screens`, and what they say comes from
:mod:`tooti.tui.columns`, :mod:`tooti.tui.header` and :mod:`tooti.tui.details`.
Textual is imported only by this module, ``table`` and ``screens``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar

from textual import events
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Input, Sparkline, Static

from tooti.backoff import Backoff
from tooti.tui import header
from tooti.tui.client import (
    AUTH_RETRY,
    DEFAULT_GATEWAY,
    EventsClient,
    Status,
    follow,
    reconnect_backoff,
)
from tooti.tui.columns import PEER_COLUMNS, REQUEST_COLUMNS, peer_matches, request_matches
from tooti.tui.details import peer_detail, request_detail
from tooti.tui.screens import DetailScreen, HelpScreen
from tooti.tui.state import NetworkState
from tooti.tui.table import LiveTable
from tooti.tui.views import PeerView, RequestView


class TootiApp(App[None]):
    """Live view of one gateway: totals, peers and request flows."""

    TITLE = "tooti"
    CSS = """
    #top { height: 3; padding: 0 1; }
    #status { height: 1; }
    #totals-row { height: 2; }
    #totals { width: auto; padding-right: 2; }
    .rate { width: 14; }
    .spark { width: 1fr; margin-right: 2; }
    LiveTable { border: round $panel; border-title-color: $text-muted; }
    LiveTable:focus { border: round $accent; border-title-color: $accent; }
    #peers { height: auto; min-height: 5; max-height: 45%; }
    #requests { height: 1fr; }
    #notice {
        display: none; height: auto; margin: 0 1; padding: 0 1;
        border: round $error; color: $text;
    }
    #notice.visible { display: block; }
    #filter { dock: bottom; display: none; }
    #filter.visible { display: block; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("tab", "switch_pane", "Switch pane", priority=True),
        Binding("slash", "filter", "Filter"),
        Binding("enter", "details", "Details", show=False),
        Binding("question_mark", "help", "Help"),
    ]

    def __init__(
        self, gateway: str = DEFAULT_GATEWAY, admin_key: str = "", *,
        state: NetworkState | None = None, connect: bool = True,
        clock: Callable[[], float] = time.time, backoff: Backoff | None = None,
        status: Status | None = None, tick: float = 0.25, auth_retry: float = AUTH_RETRY,
    ) -> None:
        """``connect=False`` shows ``state`` as given (recorded events, screenshots);
        ``clock`` is the local time source (fixed in snapshot tests); ``backoff`` and
        ``auth_retry`` pace reconnections (see :func:`tooti.tui.client.follow`)."""
        super().__init__()
        self.client = EventsClient(gateway, admin_key)
        self.state = state or NetworkState()
        self.connect = connect
        self.clock = clock
        self.backoff = backoff or reconnect_backoff()
        self.auth_retry = auth_retry
        self.status = status or Status("connecting", f"connecting to {self.client.gateway}…")
        self._status_at = clock()
        self.tick = tick
        self.filter_text = ""
        self._drawn: tuple[int, int] = (-1, -1)
        self._view_ready = False

    # ------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        """Totals on top, then peers and requests, the filter and the footer."""
        with Vertical(id="top"):
            yield Static(id="status")
            with Horizontal(id="totals-row"):
                yield Static(id="totals")
                yield Static(id="req-rate", classes="rate")
                yield Sparkline([], id="req-spark", classes="spark")
                yield Static(id="tok-rate", classes="rate")
                yield Sparkline([], id="tok-spark", classes="spark")
        yield Static(id="notice")
        yield LiveTable("Peers", PEER_COLUMNS, lambda p: p.id, "id", id="peers",
                        row_style=lambda p: "dim" if p.gone else "")
        yield LiveTable("Requests", REQUEST_COLUMNS, lambda r: r.id, "age", id="requests",
                        row_style=lambda r: "dim" if r.phase == "lost" else "")
        yield Input(placeholder="filter peers and requests (enter keeps, esc clears)",
                    id="filter")
        yield Footer()

    def on_mount(self) -> None:
        """Draw, start the redraw timer and the events worker."""
        self._view_ready = True
        self.peers_table.focus()
        self.redraw(force=True)
        self.set_interval(self.tick, self.redraw)
        if self.connect:
            self.run_worker(self._follow(), name="events", group="events", exclusive=True)

    @property
    def peers_table(self) -> LiveTable[PeerView]:
        """The peers pane."""
        return self.query_one("#peers", LiveTable)

    @property
    def requests_table(self) -> LiveTable[RequestView]:
        """The requests pane."""
        return self.query_one("#requests", LiveTable)

    # ------------------------------------------------------------ events in

    async def _follow(self) -> None:
        try:
            await follow(self.client, self.on_stream_message, self.on_stream_status,
                         self.backoff, auth_retry=self.auth_retry)
        finally:
            await self.client.aclose()

    def on_stream_message(self, kind: str, data: dict[str, Any]) -> None:
        """One message from the events stream: fold it into the state."""
        self.state.handle(kind, data, received_at=self.clock())

    def on_stream_status(self, status: Status) -> None:
        """The connection changed state: show it at once."""
        self.status = status
        self._status_at = self.clock()
        if self._view_ready:
            try:
                self._draw_status()
            except NoMatches:  # shutting down
                pass

    # ------------------------------------------------------------ drawing

    def redraw(self, force: bool = False) -> None:
        """Redraw what changed since the last tick (and the clock-driven parts)."""
        try:
            self._redraw(force)
        except NoMatches:  # a last tick while the app is shutting down
            pass

    def _redraw(self, force: bool) -> None:
        now = self.clock()
        self.state.prune(now)
        second = int(now)
        if not force and self._drawn == (self.state.version, second):
            return
        self._drawn = (self.state.version, second)
        self._draw_status()
        self._draw_totals(now)
        gateway_now = now - self.state.clock_offset
        needle = self.filter_text.lower()
        notes = []
        if self.status.state != "live" and self.state.snapshots:
            notes.append("last known state")
        if needle:
            notes.append(f"filter: {self.filter_text}")
        note = " · ".join(notes)
        peers = [p for p in self.state.peers.values() if not needle or peer_matches(p, needle)]
        self.peers_table.show(peers, gateway_now, note)
        requests = [r for r in self.state.requests.values()
                    if not needle or request_matches(r, needle)]
        self.requests_table.show(requests, gateway_now, note)

    def _draw_status(self) -> None:
        status = self.status
        retry = None
        if status.retry_in is not None:
            retry = max(0.0, status.retry_in - (self.clock() - self._status_at))
        self.query_one("#status", Static).update(
            header.status_line(self.client.gateway, status, retry))
        box = self.query_one("#notice", Static)
        text = header.notice(status)
        if text is not None:
            box.update(text)
            box.add_class("visible")
        else:
            box.remove_class("visible")

    def _draw_totals(self, now: float) -> None:
        totals = self.state.totals(now)
        self.query_one("#totals", Static).update(header.totals_line(totals))
        self.query_one("#req-rate", Static).update(header.request_rate(totals))
        self.query_one("#tok-rate", Static).update(header.token_rate(totals))
        self.query_one("#req-spark", Sparkline).data = totals.req_series
        self.query_one("#tok-spark", Sparkline).data = totals.tok_series

    # ------------------------------------------------------------ actions

    def action_switch_pane(self) -> None:
        """Move focus between the peers and requests panes."""
        if isinstance(self.screen, ModalScreen):
            return
        if self.focused is self.peers_table:
            self.requests_table.focus()
        else:
            self.peers_table.focus()

    def action_filter(self) -> None:
        """Show the filter box."""
        box = self.query_one("#filter", Input)
        box.add_class("visible")
        box.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        """Filter as the user types."""
        self.filter_text = event.value.strip()
        self.redraw(force=True)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        """Enter: keep the filter, back to the tables."""
        self._close_filter()

    def on_key(self, event: events.Key) -> None:
        """Escape clears the filter: while it is being typed (the box focused: back to
        the tables) and after Enter kept it (a pane focused: the pane keeps the focus).
        In a details or help screen Escape only closes that screen."""
        if event.key != "escape" or isinstance(self.screen, ModalScreen):
            return
        box = self.query_one("#filter", Input)
        if self.focused is not box and not box.value and not self.filter_text:
            return
        typing = self.focused is box
        box.value = ""
        self.filter_text = ""
        box.remove_class("visible")
        if typing:
            self.peers_table.focus()
        self.redraw(force=True)
        event.stop()

    def _close_filter(self) -> None:
        box = self.query_one("#filter", Input)
        if not box.value:
            box.remove_class("visible")
        self.peers_table.focus()

    def action_details(self) -> None:
        """Details of the row under the cursor in the focused pane."""
        table = self.focused
        if isinstance(table, LiveTable):
            key = table.selected_key()
            if key is not None:
                self._open_details(str(table.id), key)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """Enter (or a click) on a row opens its details."""
        key = event.row_key.value
        if key is not None:
            self._open_details(str(event.data_table.id), key)

    def _open_details(self, table: str, key: str) -> None:
        if table == "requests":
            self.push_screen(DetailScreen(f"request {key}",
                                          lambda: request_detail(self.state, key,
                                                                 self._gateway_now())))
        else:
            self.push_screen(DetailScreen(f"peer {key}",
                                          lambda: peer_detail(self.state, key,
                                                              self._gateway_now())))

    def _gateway_now(self) -> float:
        return self.clock() - self.state.clock_offset

    def action_help(self) -> None:
        """Show the keys."""
        self.push_screen(HelpScreen())


def run(gateway: str = DEFAULT_GATEWAY, admin_key: str = "") -> int:
    """Run the TUI until the user quits; returns the exit status."""
    TootiApp(gateway, admin_key).run()
    return 0
