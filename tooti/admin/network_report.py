"""``tooti peers``: what a running gateway or relay knows of the network, from its
admin API (``GET /admin/v1/network``), as text or JSON."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tooti import clock

NETWORK_PATH = "/admin/v1/network"


class NetworkViewError(Exception):
    """The process could not be reached or refused the request (message is for users)."""


def fetch(base_url: str, admin_key: str = "", timeout: float = 5.0) -> dict[str, Any]:
    """The network view of the process at ``base_url``; raises NetworkViewError."""
    headers = {"authorization": f"Bearer {admin_key}"} if admin_key else {}
    url = base_url.rstrip("/") + NETWORK_PATH
    try:
        response = httpx.get(url, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise NetworkViewError(f"cannot reach {url}: {exc}") from None
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise NetworkViewError(f"{url} answered {response.status_code}: {message}")
    try:
        view = response.json()
    except ValueError:
        raise NetworkViewError(f"{url} did not answer JSON") from None
    if not isinstance(view, dict):
        raise NetworkViewError(f"{url} did not answer a JSON object")
    return view


_CONTROL = dict.fromkeys([*range(0x20), 0x7F, *range(0x80, 0xA0)], "?")


def _safe(text: str) -> str:
    """``text`` with control characters (terminal escapes, new lines) replaced."""
    return text.translate(_CONTROL)


def render(view: dict[str, Any], now: float | None = None) -> str:
    """A plain-text report of a network view: the addresses it tells dialers (or
    ``none``), each dialer with links (a dialer with none, such as a node attached in
    memory to this process's gateway, is left out) and the peers connected here, in
    columns as wide as their widest value. Peer-supplied text cannot drive the terminal
    (control characters are replaced)."""
    return "\n".join(_safe(line) for line in _lines(view, now))


def _lines(view: dict[str, Any], now: float | None) -> list[str]:
    now = clock.wall() if now is None else now
    roles = view.get("roles") or []
    lines = [f"roles: {', '.join(roles) or '-'}",
             f"public url: {view.get('public_url') or '-'}",
             f"discovery: {'on' if view.get('discover') else 'off'}"]
    this = "gateway" if "gateway" in roles else "relay" if "relay" in roles else "process"
    public = view.get("public_peers") or []
    if public:
        lines.append(f"addresses this {this} tells its dialers ({len(public)}):")
        lines += [f"  {url}" for url in public]
    else:
        lines.append(f"addresses this {this} tells its dialers: none")
    for dialer in view.get("dialing") or []:
        links = dialer.get("links") or []
        if not links:  # e.g. a node attached in memory to this process's gateway
            continue
        lines.append(f"dialing as {dialer.get('role')} {dialer.get('id')} "
                     f"({_count(len(links), 'peer')}):")
        rows = []
        for link in links:
            since = link.get("since")
            age = (f"{max(0.0, now - since):.0f}s ago" if isinstance(since, int | float)
                   else "?")
            rows.append([link.get("state") or "?", link.get("source") or "?",
                         link.get("url") or "?", age, link.get("last_error") or ""])
        lines += _table(["state", "source", "url", "since", "last error"], rows)
    peers = view.get("peers") or []
    if not peers:
        lines.append("peers connected here: none")
        return lines
    lines.append(f"peers connected here ({len(peers)}):")
    rows = []
    for peer in sorted(peers, key=lambda p: (p.get("via") or "", p.get("id") or "")):
        hops = peer.get("hops")
        route = (f"via {peer['via']}"
                 + (f" ({_count(hops, 'hop')})" if isinstance(hops, int) else "")
                 if peer.get("via") else "direct")
        rows.append([peer.get("id") or "?", peer.get("role") or "?",
                     peer.get("state") or "?", route,
                     peer.get("group") or "", peer.get("token") or "",
                     ", ".join(peer.get("models") or []) or "-"])
    lines += _table(["id", "role", "state", "route", "group", "token", "models"], rows)
    return lines


def _count(n: int, noun: str) -> str:
    """``1 hop``, ``2 hops``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    """``rows`` under ``head`` in columns as wide as their widest cell (control
    characters already replaced, so the width is what the terminal shows), two spaces
    apart; a column empty in every row is left out, and the last is not padded."""
    cells = [[_safe(str(cell)) for cell in row] for row in rows]
    keep = [i for i in range(len(head)) if any(row[i] for row in cells)]
    table = [[head[i].upper() for i in keep], *([row[i] for i in keep] for row in cells)]
    widths = [max(len(row[c]) for row in table) for c in range(len(keep))]
    return ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            .rstrip() for row in table]


def to_json(view: dict[str, Any]) -> str:
    """The view as indented JSON."""
    return json.dumps(view, indent=2, sort_keys=True)
