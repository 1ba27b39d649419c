"""The modal screens of ``tooti tui``: one peer's or request's details, and the help.

The details screen re-renders its body twice a second from a callable, so it follows
the request or peer while it is open; what the body says is
:mod:`tooti.tui.details`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static


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
