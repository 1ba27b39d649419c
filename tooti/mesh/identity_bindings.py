"""Identity binding: which public key may use each node id here.

A derived id (``tooti-…``) belongs to the key it is derived from. A chosen name is
bound to the first key that proves it here (trust on first use) and refused to any
other key afterwards; with an :class:`~tooti.mesh.identity_store.IdentityStore` the
bindings outlive a restart.
"""

from __future__ import annotations

import logging

from tooti.identity import DERIVED_PREFIX, derive_id
from tooti.mesh.identity_store import IdentityStore, IdentityStoreError
from tooti.protocol.errors import ProtocolError

log = logging.getLogger("tooti.gateway")


class IdentityBindings:
    """Chosen node names → the public key that first proved each, kept in memory and
    written through to ``store``."""

    def __init__(self, store: IdentityStore | None = None, *, limit: int = 10_000) -> None:
        """Load the bindings from ``store`` (None = memory only); ``limit``: most chosen
        names bound at once."""
        self.store = store
        """Where bindings persist across restarts (None = memory only)."""
        self.bound: dict[str, bytes] = store.load() if store else {}
        """Chosen node names → the key bound to each."""
        self.limit = limit

    def bind(self, peer_id: str, public_key: bytes) -> None:
        """Accept ``public_key`` for ``peer_id`` or raise ProtocolError ``identity_mismatch``
        (another key owns it) or ``identity_limit`` (no room for a new chosen name)."""
        if peer_id.startswith(DERIVED_PREFIX):
            if derive_id(public_key) != peer_id:
                raise ProtocolError("identity_mismatch",
                                    f"{peer_id} is not the id of the presented key")
            return
        bound = self.bound.get(peer_id)
        if bound is None:
            if len(self.bound) >= self.limit:
                raise ProtocolError(
                    "identity_limit", f"this gateway binds at most {self.limit} "
                    "chosen node names (gateway.max_identity_bindings): use the id derived "
                    "from the node's key, or ask its operator to forget unused names")
            bound = public_key
            if self.store is not None:
                try:  # another process sharing the file may have bound it first
                    bound = self.store.bind(peer_id, public_key)
                except IdentityStoreError as exc:
                    log.error("node id %s is bound in memory only (lost on restart): %s",
                              peer_id, exc)
            self.bound[peer_id] = bound
        if bound != public_key:
            raise ProtocolError("identity_mismatch",
                                f"node id {peer_id} belongs to another key")
