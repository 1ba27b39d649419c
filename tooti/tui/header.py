"""The header of ``tooti tui`` as text: the connection status line, the notice shown
when the gateway refuses the admin key, and the totals with their rates.

Pure functions returning Rich text (no Textual); the app puts them on screen.
"""

from __future__ import annotations

from rich.text import Text

from tooti.tui.client import Status
from tooti.tui.columns import rate
from tooti.tui.views import Totals


def status_line(gateway: str, status: Status, retry: float | None) -> Text:
    """``tooti <gateway>`` and the connection's state; ``retry`` is the seconds left
    before the next attempt, if one is scheduled."""
    line = Text()
    line.append("tooti ", style="bold")
    line.append(gateway + "  ", style="dim")
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
    return line


def notice(status: Status) -> Text | None:
    """The boxed notice under the header (why the admin key was refused), or None
    when there is nothing to say."""
    if status.state != "unauthorized":
        return None
    return Text.assemble(("✗ ", "bold red"), status.message)


def totals_line(totals: Totals) -> Text:
    """Peers live / connected, requests in flight and how many of them are queued."""
    return Text.assemble(
        ("peers ", "dim"), (str(totals.live_peers), "bold green"),
        (f" live / {totals.peers}   in-flight ", "dim"), (str(totals.in_flight), "bold"),
        (f" ({totals.queued} queued)", "dim"),
    )


def request_rate(totals: Totals) -> Text:
    """Finished requests per second."""
    return Text.assemble(("req/s ", "dim"), (f"{totals.req_rate:.1f}", "bold"))


def token_rate(totals: Totals) -> Text:
    """Completion tokens per second."""
    return Text.assemble(("tok/s ", "dim"), (f"{rate(totals.tok_rate)}", "bold"))
