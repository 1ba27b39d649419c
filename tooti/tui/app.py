"""The Textual app behind ``tooti tui``: peers, request flows and totals, live.

A worker reads the gateway's admin events stream (:func:`tooti.tui.client.follow`)
into a :class:`~tooti.tui.state.NetworkState`; a timer redraws whatever changed a
few times a second, so a busy gateway costs one redraw per tick, not one per
event. This is the only module that imports Textual.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Generic, TypeVar

from rich.cells import cell_len
from rich.text import Text
from textual import events
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Input, Sparkline, Static

from tooti.backoff import Backoff
from tooti.tui.client import (
    AUTH_RETRY,
    DEFAULT_GATEWAY,
    EventsClient,
    Status,
    follow,
    reconnect_backoff,
)
from tooti.tui.columns import (
    PEER_COLUMNS,
    REQUEST_COLUMNS,
    STATE_STYLES,
    Column,
    age,
    ms,
    peer_matches,
    peer_state,
    rate,
    request_matches,
    request_tok_s,
    tokens,
)
from tooti.tui.state import NetworkState, PeerView, RequestView

T = TypeVar("T")

STEP_NAMES = {"received": "received", "routed": "routed", "first_token": "first token",
              "finished": "finished", "lost": "lost"}


class LiveTable(DataTable[Text], Generic[T]):
    """A table redrawn from a list of items, keeping its sort order and the row under
    the cursor. Click a header (or press ``s``) to sort by it; ``r`` reverses."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "select_cursor", "Details"),
        Binding("s", "next_sort", "Sort"),
        Binding("r", "reverse_sort", "Reverse"),
    ]

    def __init__(self, title: str, columns: list[Column[T]], row_key: Callable[[T], str],
                 sort_by: str, *, id: str, row_style: Callable[[T], str] | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self.title = title
        self.specs = columns
        self.row_key = row_key
        self.row_style = row_style
        self.sort_by = sort_by
        self.reverse = False
        self.note = ""
        self._live_items: list[T] = []
        self._live_now = 0.0
        self._live_rows: list[tuple[str, tuple[tuple[str, str], ...]]] = []

    def on_mount(self) -> None:
        """Add the columns."""
        self._add_columns([cell_len(spec.label) for spec in self.specs])
        self._update_title()

    def _add_columns(self, widths: list[int]) -> None:
        # Explicit widths: DataTable's own measuring happens on idle, after a frame may
        # already have been cached at the old widths.
        for spec, width in zip(self.specs, widths, strict=True):
            self.add_column(Text(spec.label, justify="right" if spec.numeric else "left"),
                            key=spec.key, width=width)

    def show(self, items: Iterable[T], now: float, note: str = "") -> None:
        """Display ``items`` (already filtered) at gateway time ``now``."""
        self._live_items = list(items)
        self._live_now = now
        self.note = note
        self.redraw()

    def redraw(self) -> None:
        """Rebuild the rows if anything visible changed."""
        spec = next((c for c in self.specs if c.key == self.sort_by), self.specs[0])
        by_key = sorted(self._live_items, key=self.row_key)
        known = [item for item in by_key if spec.sort(item) is not None]
        known.sort(key=spec.sort, reverse=self.reverse)
        ordered = known + [item for item in by_key if spec.sort(item) is None]  # "-" last
        rows = []
        for item in ordered:
            base = self.row_style(item) if self.row_style else ""
            rows.append((self.row_key(item), tuple(
                (c.text(item, self._live_now),
                 " ".join(filter(None, (c.style(item) if c.style else "", base))))
                for c in self.specs)))
        self._update_title()
        if rows == self._live_rows:
            return
        current = self._cursor_key()  # keep the cursor on this row, wherever it moves
        index = self.cursor_row
        self._live_rows = rows
        widths = [max([cell_len(spec.label)] + [cell_len(cells[i][0]) for _, cells in rows])
                  for i, spec in enumerate(self.specs)]
        self.clear(columns=True)  # columns sized to what is shown now
        self._add_columns(widths)
        for key, cells in rows:
            self.add_row(*(Text(text, style=style,
                                justify="right" if c.numeric else "left")
                           for (text, style), c in zip(cells, self.specs, strict=True)),
                         key=key)
        keys = [key for key, _ in rows]
        if current in keys and index > 0:  # on the top row, stay on top (newest first)
            index = keys.index(current)
        if rows:
            self.move_cursor(row=min(index, len(rows) - 1))

    def _cursor_key(self) -> str | None:
        if not self._live_rows or not 0 <= self.cursor_row < len(self._live_rows):
            return None
        return self._live_rows[self.cursor_row][0]

    def selected_key(self) -> str | None:
        """Key of the row under the cursor, if any."""
        return self._cursor_key()

    def shown_keys(self) -> list[str]:
        """Row keys in display order."""
        return [key for key, _ in self._live_rows]

    def cell(self, key: str, column: str) -> str | None:
        """The text shown in row ``key``, column ``column`` (None if not shown)."""
        index = [c.key for c in self.specs].index(column)
        for row_key, cells in self._live_rows:
            if row_key == key:
                return cells[index][0]
        return None

    def _update_title(self) -> None:
        spec = next((c for c in self.specs if c.key == self.sort_by), self.specs[0])
        arrow = "↓" if self.reverse else "↑"
        parts = [f"{self.title} ({len(self._live_items)})", f"sort: {spec.label} {arrow}"]
        if self.note:
            parts.append(self.note)
        self.border_title = " · ".join(parts)

    def sort_on(self, key: str) -> None:
        """Sort by column ``key``; the same column again reverses the order."""
        if key == self.sort_by:
            self.reverse = not self.reverse
        else:
            self.sort_by, self.reverse = key, False
        self.redraw()

    def action_next_sort(self) -> None:
        """Sort by the next column."""
        keys = [c.key for c in self.specs]
        position = keys.index(self.sort_by) if self.sort_by in keys else -1
        self.sort_by, self.reverse = keys[(position + 1) % len(keys)], False
        self.redraw()

    def action_reverse_sort(self) -> None:
        """Reverse the sort order."""
        self.reverse = not self.reverse
        self.redraw()

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        """A header was clicked: sort by that column."""
        event.stop()
        self.sort_on(str(event.column_key.value))


class DetailScreen(ModalScreen[None]):
    """A modal showing one peer or request, refreshed while it is open."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,enter", "dismiss", "Close"),
    ]
    DEFAULT_CSS = """
    DetailScreen { align: center middle; }
    DetailScreen > VerticalScroll {
        width: 90%; max-width: 110; height: auto; max-height: 90%;
        border: round $accent; background: $surface; padding: 0 1;
    }
    DetailScreen #hint { color: $text-muted; margin-top: 1; }
    """

    def __init__(self, title: str, render: Callable[[], Text]) -> None:
        super().__init__()
        self.detail_title = title
        self.render_body = render

    def compose(self) -> ComposeResult:
        """The body and a hint."""
        with VerticalScroll() as body:
            body.border_title = self.detail_title
            yield Static(self.render_body(), id="body")
            yield Static("esc / enter / q to close", id="hint")

    def on_mount(self) -> None:
        """Keep the body current."""
        self.set_interval(0.5, self.refresh_body)

    def refresh_body(self) -> None:
        """Re-render the body from the app's state."""
        self.query_one("#body", Static).update(self.render_body())


HELP = """\
[b]Keys[/b]
  [b]tab[/b]        switch between the peers and requests panes
  [b]↑ ↓ pgup pgdn[/b]  move in the focused pane
  [b]enter[/b]      details of the selected peer or request (its timeline)
  [b]/[/b]          filter both panes (enter keeps the filter, esc clears it)
  [b]s[/b] / [b]r[/b]      sort by the next column / reverse (or click a header)
  [b]?[/b]          this help
  [b]q[/b]          quit

[b]Peers[/b]  in-flight = streams this gateway has open on the peer / its advertised
capacity; TTFT and tok/s are what the gateway measured (node-reported until it has
samples); RTT is the tunnel's heartbeat round trip; departed peers stay as [dim]gone[/dim]
for two minutes.
[b]Requests[/b]  tries = nodes attempted (failover before the first token); tokens =
prompt→completion (~ when estimated); tok/s = decode speed after the first token."""


class HelpScreen(ModalScreen[None]):
    """The keys and what the columns mean."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,question_mark,enter", "dismiss", "Close"),
    ]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Static {
        width: auto; max-width: 90; height: auto;
        border: round $accent; background: $surface; padding: 0 1;
    }
    """

    def compose(self) -> ComposeResult:
        """The help text."""
        body = Static(HELP)
        body.border_title = "tooti tui — help"
        yield body


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
        line = Text()
        line.append("tooti ", style="bold")
        line.append(self.client.gateway + "  ", style="dim")
        retry = None
        if status.retry_in is not None:
            retry = max(0.0, status.retry_in - (self.clock() - self._status_at))
        if status.state == "live":
            line.append("● live", style="bold green")
        elif status.state == "connecting":
            line.append(status.message, style="yellow")
        elif status.state == "reconnecting":
            line.append(f"reconnecting… ({status.message}", style="bold yellow")
            if retry is not None:
                line.append(f"; attempt {status.attempt + 1} in {retry:.0f}s",
                            style="bold yellow")
            line.append(")", style="bold yellow")
        elif status.state == "unauthorized":
            line.append("✗ the gateway refused the admin API", style="bold red")
            if status.retry_in is not None:
                line.append(f" — retrying every {status.retry_in:g}s", style="red")
        else:
            line.append(status.message)
        self.query_one("#status", Static).update(line)
        notice = self.query_one("#notice", Static)
        if status.state == "unauthorized":
            notice.update(Text.assemble(("✗ ", "bold red"), status.message))
            notice.add_class("visible")
        else:
            notice.remove_class("visible")

    def _draw_totals(self, now: float) -> None:
        totals = self.state.totals(now)
        text = Text.assemble(
            ("peers ", "dim"), (str(totals.live_peers), "bold green"),
            (f" live / {totals.peers}   in-flight ", "dim"), (str(totals.in_flight), "bold"),
            (f" ({totals.queued} queued)", "dim"),
        )
        self.query_one("#totals", Static).update(text)
        self.query_one("#req-rate", Static).update(
            Text.assemble(("req/s ", "dim"), (f"{totals.req_rate:.1f}", "bold")))
        self.query_one("#tok-rate", Static).update(
            Text.assemble(("tok/s ", "dim"), (f"{rate(totals.tok_rate)}", "bold")))
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
        """Escape in the filter box clears the filter."""
        box = self.query_one("#filter", Input)
        if event.key == "escape" and self.focused is box:
            box.value = ""
            self.filter_text = ""
            self._close_filter()
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


# ---------------------------------------------------------------- detail views


def request_detail(state: NetworkState, request_id: str, now: float) -> Text:
    """A request's fields and its timeline (received → routed → first token →
    finished), with failovers, relative to when it was received."""
    request = state.requests.get(request_id)
    if request is None:
        return Text("This request is no longer tracked.", style="dim")
    out = Text()
    state_word = request.state
    out.append(f"{request.id}\n", style="bold")
    _field(out, "state", state_word, STATE_STYLES.get(state_word, ""))
    _field(out, "model", request.model or "-")
    _field(out, "endpoint", request.endpoint or "-")
    _field(out, "stream", "yes" if request.stream else "no")
    _field(out, "key", request.key_id or "-")
    out.append("\n")
    _field(out, "node", request.node or "-")
    _field(out, "tries", str(request.attempts))
    if len(set(request.nodes_tried)) > 1:
        _field(out, "nodes tried", " → ".join(request.nodes_tried))
    out.append("\n")
    _field(out, "TTFT", ms(request.ttft_ms))
    _field(out, "tokens", tokens(request))
    _field(out, "tok/s", rate(request_tok_s(request)))
    _field(out, "latency", ms(request.latency_ms))
    _field(out, "age", age(now - request.received_at))
    out.append("\n")
    if request.error:
        _field(out, "error", request.error, "red")
        out.append("\n")
    out.append("\nTimeline\n", style="bold underline")
    start = request.timeline[0].ts if request.timeline else request.received_at
    previous_node: str | None = None
    for step in request.timeline:
        out.append(f"  +{ms((step.ts - start) * 1000):>8}  ", style="dim")
        name = STEP_NAMES.get(step.kind, step.kind)
        style = STATE_STYLES.get(step.detail, "") if step.kind == "finished" else ""
        out.append(f"{name:<12}", style=style or "bold")
        if step.node:
            arrow = "→ " if step.kind == "routed" else ""
            out.append(f" {arrow}{step.node}", style="cyan")
        if step.detail:
            out.append(f"  {step.detail}", style=style)
        if step.kind == "routed":
            if previous_node is not None and previous_node != step.node:
                out.append(f"  (failover from {previous_node})", style="yellow")
            previous_node = step.node
        out.append("\n")
    if request.active:
        out.append(f"  +{ms((now - start) * 1000):>8}  … in progress\n", style="dim italic")
    return out


def peer_detail(state: NetworkState, peer_id: str, now: float) -> Text:
    """A peer's identity, health per model, heartbeat figures and recent requests."""
    peer = state.peers.get(peer_id)
    if peer is None:
        return Text("This peer is no longer tracked.", style="dim")
    out = Text()
    out.append(f"{peer.id}\n", style="bold")
    word = peer_state(peer, now)
    _field(out, "state", word, STATE_STYLES.get(peer.state, ""))
    _field(out, "role", peer.role)
    _field(out, "via", peer.via)
    _field(out, "address", peer.address or "-")
    out.append("\n")
    _field(out, "software", peer.software or "-")
    if peer.connected_at is not None:
        _field(out, "connected", age(now - peer.connected_at) + " ago")
    _field(out, "RTT", ms(peer.rtt_ms))
    _field(out, "failures", str(peer.failures))
    out.append("\n")
    if peer.gone and peer.left_reason:
        _field(out, "left", peer.left_reason, "red")
        out.append("\n")
    if peer.labels:
        _field(out, "labels", ", ".join(f"{k}={v}" for k, v in sorted(peer.labels.items())))
        out.append("\n")
    if peer.stats:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(peer.stats.items()))
        _field(out, "heartbeat", shown)
        out.append("\n")
    out.append("\nModels\n", style="bold underline")
    for model, record in sorted(peer.per_model.items()):
        price = record.get("price") or {}
        out.append(f"  {model:<24}", style="bold")
        out.append(f" {record.get('in_flight', 0)}/{record.get('capacity', '?')}"
                   f"  TTFT {ms(record.get('ttft_ms'))}  {rate(record.get('tokens_per_s'))}"
                   f" tok/s  {record.get('samples', 0)} samples"
                   f"  price {price.get('input', 0)}/{price.get('output', 0)} per 1M")
        if record.get("state") == "cooldown":
            cooldown = record.get("cooldown") or {}
            out.append(f"  cooldown ({cooldown.get('reason', '?')}, "
                       f"{cooldown.get('seconds_left', '?')}s left)", style="dark_orange")
        out.append("\n")
    recent = state.requests_by_node(peer.id)[:8]
    if recent:
        out.append("\nRecent requests\n", style="bold underline")
        for request in recent:
            out.append(f"  {request.id[:20]:<20}  {request.model:<16} ")
            out.append(f"{request.state:<10}", style=STATE_STYLES.get(request.state, ""))
            out.append(f"  {ms(request.ttft_ms):>8}  {tokens(request)}\n")
    return out


def _field(out: Text, name: str, value: str, style: str = "") -> None:
    out.append(f"{name} ", style="dim")
    out.append(value, style=style or "")
    out.append("   ")


def run(gateway: str = DEFAULT_GATEWAY, admin_key: str = "") -> int:
    """Run the TUI until the user quits; returns the exit status."""
    TootiApp(gateway, admin_key).run()
    return 0
