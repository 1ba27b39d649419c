"""The ``/v1/models`` body of each node group, built again only when the registry's
live models changed (its version), and encoded once, so asking often costs nothing
however many nodes and models there are."""

from __future__ import annotations

from typing import Any

import msgspec

from tooti.mesh.registry import Registry


class ModelsList:
    """Per node group: ``(registry version, body, its JSON)``."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._entries: dict[str, tuple[int, dict[str, Any], bytes]] = {}

    def body(self, group: str = "") -> dict[str, Any]:
        """The union of the models of the live nodes a request of node group ``group``
        may use (``""``: the ungrouped nodes)."""
        return self._entry(group)[1]

    def json(self, group: str = "") -> bytes:
        """:meth:`body`, encoded."""
        return self._entry(group)[2]

    def _entry(self, group: str) -> tuple[int, dict[str, Any], bytes]:
        version = self.registry.live_version()
        cached = self._entries.get(group)
        if cached is not None and cached[0] == version:
            return cached
        data = []
        for model, peers in sorted(self.registry.live_in_group(group).items()):
            info = peers[0].models[model]
            data.append({
                "id": model,
                "object": "model",
                "created": int(min(p.connected_at for p in peers)),
                "owned_by": info.owned_by,
                "meta": {
                    **info.meta,
                    "nodes": len(peers),
                    "context_length": info.context_length,
                    "endpoints": list(info.endpoints),
                },
            })
        body = {"object": "list", "data": data}
        entry = self._entries[group] = (version, body, msgspec.json.encode(body))
        return entry
