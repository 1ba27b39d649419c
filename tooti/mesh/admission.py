"""Admitting a tunnel: the one door every peer's tunnel comes through.

Three ways in, one decision: an upgrade the listener took off a fresh connection
(:meth:`TunnelAdmission.admit_upgrade`), an upgrade on a kept-alive HTTP connection
through ASGI (:meth:`~TunnelAdmission.admit_websocket`), and an already-connected
transport (in-memory peers, :meth:`~TunnelAdmission.admit`). Each upgrade is counted
against its client address (a rate and a cap on unfinished handshakes, whether it is
refused or not, so guessing join tokens is slowed too), checked by
:meth:`~TunnelAdmission.decide` (path, subprotocol, join token, draining), and then served by
:func:`~tooti.mesh.peer_session.serve_peer` (the identity handshake and registration).

With an accounts database, join tokens minted per account are admitted too (a
:class:`~tooti.accounts.join_directory.JoinTokenDirectory`): each node joining is bound
to the token's account, and when such a token is revoked the tunnels it admitted are
closed (unlike a static token dropped by a reload, whose tunnels stay until they
reconnect).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import trio

from tooti import clock
from tooti.accounts.join_directory import JoinTokenDirectory
from tooti.mesh.http import Receive, Scope, Send, header
from tooti.mesh.join_tokens import UNGROUPED, Admission, TokenChanges, join_auth
from tooti.mesh.listener import UpgradeRequest
from tooti.mesh.peer_session import serve_peer
from tooti.mesh.ratelimit import Limited, PerAddressLimiter, Slot, Throttle
from tooti.mesh.registry import Registry
from tooti.protocol.schemas import ALL_ENDPOINTS
from tooti.settings import GatewaySettings, TunnelSettings
from tooti.transport import Transport
from tooti.transport.websocket import (
    SUBPROTOCOL,
    TUNNEL_PATH,
    ASGIWebSocketTransport,
    WebSocketTransport,
    refusal_response,
    upgrade_response,
)
from tooti.tunnel import CLOSE_TIMEOUT, TunnelSession

log = logging.getLogger("tooti.gateway")

Decision = tuple[int, str, Admission]
"""``(0, "", admission)`` to accept, else ``(HTTP status, reason, UNGROUPED)``."""


class TunnelAdmission:
    """Decides and admits the tunnels of one gateway or relay, and holds their sessions."""

    def __init__(self, settings: GatewaySettings, tunnel: TunnelSettings, registry: Registry,
                 *, local_id: str = "",
                 welcome_peers: Callable[[], list[str]] = list,
                 join_directory: JoinTokenDirectory | None = None) -> None:
        """``local_id`` is a relay's own id (its session ids start with it);
        ``welcome_peers`` gives the public addresses each WELCOME lists;
        ``join_directory`` holds the join tokens minted per account (None: static
        tokens only) and binds every node joining to its owner."""
        self.registry = registry
        self.tunnel_settings = tunnel
        self.local_id = local_id
        self.welcome_peers = welcome_peers
        self.welcome_endpoints: Sequence[str] | None = ALL_ENDPOINTS
        """The endpoint names each WELCOME lists (:func:`serve_peer`'s ``endpoints``)."""
        self.group_names = frozenset(settings.groups)
        """The node groups configured at start (a reload cannot add one)."""
        self.join_directory = join_directory
        self.auth = join_auth(settings, settings.groups, join_directory)
        """The join tokens tunnels are admitted by (swapped by :meth:`reload`)."""
        if join_directory is not None:
            registry.join_directory = join_directory
            join_directory.on_revoked(self.close_revoked)
        self.handshakes = PerAddressLimiter(settings.tunnel_handshake_rate,
                                            settings.tunnel_handshake_burst,
                                            settings.tunnel_handshakes_per_ip)
        """Tunnel upgrades per client IP: a rate, and a cap on unfinished handshakes."""
        self.sessions: set[TunnelSession] = set()
        self.closed = False
        """Set when draining: every new tunnel is refused."""
        self._refusal_log = Throttle(60.0)

    def warn_if_loopback_only(self) -> None:
        """Say so when no join token admits peers from beyond loopback."""
        if not self.auth.open_to_network:
            log.warning("no join token configured: node tunnels are accepted from loopback only")

    def reload(self, settings: GatewaySettings) -> TokenChanges:
        """Admit new tunnels by the join tokens of ``settings`` from now on; returns the
        changes, by name. Tunnels already up stay up, even one whose token is gone,
        until it reconnects. A group's tokens are reloaded, a group no longer
        configured admits no one, and a new group needs a restart."""
        groups = {name: group for name, group in settings.groups.items()
                  if name in self.group_names}
        auth = join_auth(settings, groups, self.join_directory)
        changes = self.auth.changes(auth)
        was_open, self.auth = self.auth.open_to_network, auth
        if was_open:  # said once at start; again only when it becomes true
            self.warn_if_loopback_only()
        return changes

    def close_revoked(self, token_ids: frozenset[str]) -> None:
        """Close the tunnels admitted by the minted join tokens ``token_ids`` (revoked):
        the peer (and, for a relay, every node behind it) is gone at once, and its
        redial is refused."""
        for peer in list(self.registry.peers.values()):
            if not peer.via and peer.token_id in token_ids:
                log.warning("closing the tunnel of %s: its join token %s was revoked",
                            peer.id, peer.token_id)
                peer.session.abort("join token revoked")

    def decide(self, path: str, subprotocols: Sequence[str], authorization: bytes | None,
               host: str | None) -> Decision:
        """Accept or refuse an upgrade (both ways in ask this)."""
        if path != TUNNEL_PATH:
            return 404, "unknown path", UNGROUPED
        if SUBPROTOCOL not in subprotocols:
            return 400, f"subprotocol {SUBPROTOCOL} required", UNGROUPED
        refusal, group = self.auth.identify(authorization, host)
        if refusal is None and self.closed:
            refusal = "gateway is shutting down"
        if refusal is not None:
            log.warning("tunnel from %s refused: %s", host, refusal)
            return 403, refusal, UNGROUPED
        return 0, "", group

    def _slot(self, host: str | None) -> Slot | str:
        """Count an upgrade from ``host``: its slot, or why it is refused (429)."""
        try:
            return self.handshakes.acquire(host, "tunnel handshakes")
        except Limited as limited:
            if self._refusal_log.allow(host):
                log.warning("tunnel upgrade from %s refused: %s (more from it this minute "
                            "at debug level)", host, limited.reason)
            else:
                log.debug("tunnel upgrade from %s refused: %s", host, limited.reason)
            return limited.reason

    async def admit(self, transport: Transport, admission: Admission = UNGROUPED,
                    slot: Slot | None = None, proven: Callable[[], None] | None = None
                    ) -> None:
        """Serve an admitted tunnel until it ends. Its handshake's ``slot`` is released
        once the peer has proven its identity (else by the caller when the tunnel
        ends); ``proven`` is called then too (the listener stops counting the
        connection against its address). Called directly for in-memory peers."""

        def on_proven() -> None:
            if slot is not None:
                slot.release()
            if proven is not None:
                proven()

        started = clock.now()
        await serve_peer(transport, self.registry, self.tunnel_settings, self.sessions,
                         admission, welcome_peers=self.welcome_peers(),
                         local_id=self.local_id, on_proven=on_proven,
                         endpoints=self.welcome_endpoints)
        log.debug("tunnel from %s ended after %.1fs", transport.remote,
                  clock.now() - started)

    async def admit_upgrade(self, upgrade: UpgradeRequest) -> None:
        """Admit an upgrade taken off a fresh connection by the listener."""
        headers, client, stream = upgrade.headers, upgrade.client, upgrade.stream
        slot = self._slot(client[0] if client else None)
        if isinstance(slot, str):
            with trio.move_on_after(1):
                try:
                    await stream.send_all(refusal_response(429, slot))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
            return
        with slot:
            subprotocols = [p.strip()
                            for p in headers.get("sec-websocket-protocol", "").split(",")]
            key = headers.get("sec-websocket-key", "")
            if headers.get("sec-websocket-version") != "13" or not key:
                status, reason, group = (426, "WebSocket version 13 with a key is required",
                                         UNGROUPED)
            else:
                authorization = headers.get("authorization")
                status, reason, group = self.decide(
                    TUNNEL_PATH, subprotocols,
                    authorization.encode("latin-1") if authorization is not None else None,
                    client[0] if client else None)
            try:
                if status:
                    with trio.move_on_after(1):
                        await stream.send_all(refusal_response(status, reason))
                    return
                await stream.send_all(upgrade_response(key, SUBPROTOCOL))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            remote = f"{client[0]}:{client[1]}" if client else "unknown"
            transport = WebSocketTransport(
                stream, remote, client=False, max_message=self.tunnel_settings.max_frame_bytes,
                buffered=upgrade.buffered)
            try:
                await self.admit(transport, group, slot, upgrade.proven)
            finally:  # releases the socket even if the handshake ended without a close
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                    await transport.aclose()

    async def admit_websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Admit an upgrade on a connection that already carried HTTP requests."""
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        client = scope.get("client")
        slot = self._slot(client[0] if client else None)
        if isinstance(slot, str):
            await _refuse_websocket(send, 429, slot)
            return
        with slot:
            status, reason, group = self.decide(
                scope["path"], scope.get("subprotocols", []), header(scope, b"authorization"),
                client[0] if client else None)
            if status:
                await _refuse_websocket(send, status, reason)
                return
            await send({"type": "websocket.accept", "subprotocol": SUBPROTOCOL})
            remote = f"{client[0]}:{client[1]}" if client else "unknown"
            await self.admit(ASGIWebSocketTransport(receive, send, remote), group, slot)


async def _refuse_websocket(send: Send, status: int, reason: str) -> None:
    """Refuse an upgrade through ASGI with a plain-text reason."""
    message: dict[str, Any] = {"type": "websocket.http.response.start", "status": status,
                               "headers": [(b"content-type", b"text/plain; charset=utf-8")]}
    await send(message)
    await send({"type": "websocket.http.response.body", "body": reason.encode()})
