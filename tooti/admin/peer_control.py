"""An admin's control of the peers of one gateway: disable, enable and drain a node.

The admin API (``POST /admin/v1/peers/{id}/disable|enable|drain``), the CLI
(``tooti nodes disable|enable|drain ID``) and the web console all call one
:class:`PeerControl`, which acts on the gateway's :class:`~tooti.mesh.registry.Registry`
(the one source of truth for peers; nothing is stored anywhere else):

- **disable** ``id``: the gateway routes the node nothing new from this moment (the
  routing index re-files it at once), while the streams it serves finish. Its state
  reads ``disabled`` (``Peer.state()``, ``GET /admin/v1/peers``, the ``/events``
  snapshot, and a ``peer.updated`` event). The id is remembered
  (:attr:`Registry.disabled_ids`, at most :data:`~tooti.mesh.registry.DISABLED_LIMIT`
  ids; past that a disable answers 409 ``too_many_disabled`` rather than silently
  re-enabling the oldest), so a node that re-joins (a new tunnel, a new relay route)
  stays disabled, until **enable** ``id``. The memory is this gateway's alone and
  lasts for its process's life: another gateway on the same database, or this one after
  a restart, routes the node again. A disabled id that is not connected can still be
  enabled; disabling an id that is not connected is a 404 (there is nothing to name).
- **drain** ``id``: the node is routed nothing new (``draining``), and once the last
  stream on its tunnel ended the gateway sends GOAWAY ``draining`` and closes the
  tunnel (at once if nothing is in flight; there is no deadline: the streams are
  bounded by the gateway's request timeouts). The node dials again after its backoff
  and is routed again then: to keep it out, disable it. Draining a relay drains the
  relay's tunnel with every node behind it.

  A node reached through a relay shares the relay's tunnel: this gateway has no tunnel
  of its own to close for it, and cutting the relay would cut its other nodes. So a
  drain of a relayed node answers 409 ``relayed_node`` (the message says to disable
  the node, or to drain the relay) and changes nothing. Disable works for relayed nodes
  like for any other (it is routing only).

Each call returns the peer's admin view (:meth:`Peer.describe`, what
``GET /admin/v1/peers`` lists), or for a disabled id with no live tunnel
``{"id", "state": "disabled", "disabled": true, "connected": false, "disabled_at"}``
(and an id enabled while not connected ``{"id", "state": "gone", "disabled": false,
"connected": false}``).
Unknown ids are APIError 404 ``peer_not_found``.
"""

from __future__ import annotations

from typing import Any

from tooti.errors import APIError
from tooti.mesh.peer import Peer
from tooti.mesh.registry import Registry, TooManyDisabled


class PeerControl:
    """Disable, enable and drain the peers of one gateway's registry."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def disable(self, node_id: str) -> dict[str, Any]:
        """Route ``node_id`` nothing new until :meth:`enable`, across its re-joins.
        Idempotent. 404 if it is neither connected nor disabled; 409 when too many ids
        are disabled."""
        registry = self.registry
        if node_id not in registry.peers and node_id not in registry.disabled_ids:
            raise _not_found(node_id)
        try:
            registry.disable(node_id)
        except TooManyDisabled as exc:
            raise APIError(409, f"{exc}: enable some before disabling more",
                           code="too_many_disabled") from None
        return self.view(node_id)

    def enable(self, node_id: str) -> dict[str, Any]:
        """Route ``node_id`` again (undoes :meth:`disable`; a drain in progress goes
        on). Idempotent. 404 if it is neither connected nor disabled."""
        registry = self.registry
        if node_id not in registry.peers and node_id not in registry.disabled_ids:
            raise _not_found(node_id)
        registry.enable(node_id)
        if node_id not in registry.peers:  # enabled while away: routed when it re-joins
            return {"id": node_id, "state": "gone", "disabled": False, "connected": False}
        return self.view(node_id)

    def drain(self, node_id: str) -> dict[str, Any]:
        """Route ``node_id`` nothing new and close its tunnel with GOAWAY ``draining``
        once its in-flight streams ended. 404 if not connected; 409 ``relayed_node``
        for a node reached through a relay (see the module docstring)."""
        peer = self._peer(node_id)
        try:
            self.registry.drain(peer)
        except ValueError:
            raise APIError(409, f"node '{node_id}' is reached through relay '{peer.via}' "
                           "and has no tunnel of its own here: disable it, or drain the "
                           "relay", code="relayed_node") from None
        return self.view(node_id)

    def view(self, node_id: str) -> dict[str, Any]:
        """The admin view of ``node_id``: its :meth:`Peer.describe` while connected,
        else a short record of a disabled id; 404 otherwise."""
        registry = self.registry
        peer = registry.peers.get(node_id)
        if peer is not None:
            return peer.describe()
        disabled_at = registry.disabled_ids.get(node_id)
        if disabled_at is None:
            raise _not_found(node_id)
        return {"id": node_id, "state": "disabled", "disabled": True, "connected": False,
                "disabled_at": disabled_at}

    def _peer(self, node_id: str) -> Peer:
        peer = self.registry.peers.get(node_id)
        if peer is None:
            raise _not_found(node_id)
        return peer


def _not_found(node_id: str) -> APIError:
    return APIError(404, f"no peer '{node_id}' is connected here", code="peer_not_found")
