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
    """A plain-text report of a network view; peer-supplied text cannot drive the
    terminal (control characters are replaced)."""
    return "\n".join(_safe(line) for line in _lines(view, now))


def _lines(view: dict[str, Any], now: float | None) -> list[str]:
    now = clock.wall() if now is None else now
    lines = [f"roles: {', '.join(view.get('roles') or []) or '-'}",
             f"public url: {view.get('public_url') or '-'}",
             f"discovery: {'on' if view.get('discover') else 'off'}"]
    public = view.get("public_peers") or []
    lines.append(f"public peers told to dialers ({len(public)}):")
    lines += [f"  {url}" for url in public] or ["  -"]
    for dialer in view.get("dialing") or []:
        links = dialer.get("links") or []
        lines.append(f"dialing as {dialer.get('role')} {dialer.get('id')} ({len(links)}):")
        for link in links:
            since = link.get("since")
            age = f"{max(0.0, now - since):.0f}s" if isinstance(since, int | float) else "?"
            error = f"  last error: {link['last_error']}" if link.get("last_error") else ""
            lines.append(f"  {link.get('state', '?'):<10} {link.get('source', '?'):<10} "
                         f"{link.get('url')}  ({age}){error}")
    peers = view.get("peers") or []
    lines.append(f"peers connected here ({len(peers)}):")
    if not peers:
        lines.append("  -")
    for peer in sorted(peers, key=lambda p: (p.get("via") or "", p.get("id") or "")):
        route = f"via {peer['via']} ({peer.get('hops')} hops)" if peer.get("via") else "direct"
        group = f" group={peer['group']}" if peer.get("group") else ""
        token = f" token={peer['token']}" if peer.get("token") else ""
        models = ", ".join(peer.get("models") or []) or "-"
        lines.append(f"  {peer.get('id')}  {peer.get('role')}  {peer.get('state')}  {route}"
                     f"{group}{token}  models: {models}")
    return lines


def to_json(view: dict[str, Any]) -> str:
    """The view as indented JSON."""
    return json.dumps(view, indent=2, sort_keys=True)
