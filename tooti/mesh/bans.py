"""Bans and strikes: which peer ids and relay routes are refused after a violation, and
how many different nodes violated the protocol through each relay lately.

Only the bookkeeping: :meth:`tooti.mesh.registry.Registry.penalize` decides whom to
ban and cuts the peer off. Every time here is on :func:`tooti.clock.now`.
"""

from __future__ import annotations

from tooti import clock

MAX_BANS = 10_000
"""Most peer ids and relay routes banned at once (the oldest bans go first beyond it);
also the most relays whose strikes are remembered."""

BanKey = str | tuple[str, str]
"""What a ban refuses: a peer id (on every path), or a ``(node id, relay id)`` route."""


class Bans:
    """Bans by peer id or ``(node id, relay id)`` route, each for ``seconds``, and the
    strikes counted against relays."""

    def __init__(self, seconds: float = 60.0, *, relay_strikes: int = 0,
                 relay_strike_seconds: float = 600.0) -> None:
        """``seconds``: how long a ban lasts; ``relay_strikes`` / ``relay_strike_seconds``:
        a relay through which that many different nodes violated the protocol within
        that time has struck out (0 strikes = never)."""
        self.seconds = seconds
        self.relay_strikes = relay_strikes
        self.relay_strike_seconds = relay_strike_seconds
        self.entries: dict[BanKey, tuple[float, str]] = {}
        """Peer id, or (node id, relay id) route → (``clock.now()`` its ban ends, why),
        oldest ban first."""
        self.strikes: dict[str, dict[str, float]] = {}
        """Relay id → node id → when that node last violated the protocol through it."""

    def ban(self, key: BanKey, reason: str) -> None:
        """Refuse ``key`` for :attr:`seconds` from now (dropping bans that ended)."""
        now = clock.now()
        entries = self.entries
        for banned, (until, _) in list(entries.items()):
            if until <= now:
                del entries[banned]
        entries.pop(key, None)
        entries[key] = (now + self.seconds, reason)
        while len(entries) > MAX_BANS:
            del entries[next(iter(entries))]

    def refusal(self, peer_id: str, via: str = "") -> str | None:
        """Why ``peer_id`` (reached through relay ``via``, if given) is refused now, with
        the seconds left, or None: its id is banned, or its route through ``via``."""
        entries = self.entries
        if not entries:
            return None
        for key in ((peer_id, (peer_id, via)) if via else (peer_id,)):
            ban = entries.get(key)
            if ban is None:
                continue
            left = ban[0] - clock.now()
            if left <= 0:
                del entries[key]
                continue
            what = f"{peer_id} via {via}" if isinstance(key, tuple) else peer_id
            return f"{what} is refused for {left:.0f} more seconds after a violation: {ban[1]}"
        return None

    def strike(self, relay_id: str, node_id: str) -> int:
        """Count that ``node_id`` violated the protocol through relay ``relay_id``;
        returns how many different nodes did within :attr:`relay_strike_seconds`
        (0 while strikes are off)."""
        if self.relay_strikes <= 0:  # off (the default)
            return 0
        now = clock.now()
        seen = self.strikes.pop(relay_id, {})
        self.strikes[relay_id] = seen = {
            node: at for node, at in seen.items() if at > now - self.relay_strike_seconds}
        seen.pop(node_id, None)
        seen[node_id] = now
        while len(self.strikes) > MAX_BANS:
            del self.strikes[next(iter(self.strikes))]
        return len(seen)

    def struck_out(self, count: int) -> bool:
        """True if ``count`` strikes (from :meth:`strike`) reach :attr:`relay_strikes`."""
        return 0 < self.relay_strikes <= count

    def forget_strikes(self, relay_id: str) -> None:
        """Start counting ``relay_id``'s strikes afresh (it was penalized)."""
        self.strikes.pop(relay_id, None)
