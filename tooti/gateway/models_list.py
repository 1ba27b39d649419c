"""The ``/v1/models`` body of each caller's view, built again only when the registry's
live models changed (its version), and encoded once, so asking often costs nothing
however many nodes and models there are.

A view is the node groups a caller's requests may reach (its group, then the public
nodes ``""`` if the group allows) and the models its key may use (empty = all): it lists
only those, so no caller learns of another group's models. At most :data:`MAX_VIEWS`
views are kept (then the cache starts over).

Only models some live node serves *ready* are listed: a model every node still announces
as loading is left out (a client picking it from the list would get 503
``model_loading``), and appears once a node has it ready, as the registry's version
changes then."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from tooti.mesh.registry import Registry

MAX_VIEWS = 4096
"""Views (groups and allowed models) whose body is kept."""
View = tuple[tuple[str, ...], tuple[str, ...]]


class ModelsList:
    """Per view: ``(registry version, body, its JSON)``."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._entries: dict[View, tuple[int, dict[str, Any], bytes]] = {}

    def body(self, group: str = "", *, groups: Sequence[str] = (),
             allowed: Sequence[str] = ()) -> dict[str, Any]:
        """The union of the models of the live nodes a request of node group ``group``
        may use (``""``: the ungrouped nodes), or of every group in ``groups`` when given;
        only ``allowed`` models if that is not empty."""
        return self._entry(tuple(groups) or (group,), tuple(allowed))[1]

    def json(self, group: str = "", *, groups: Sequence[str] = (),
             allowed: Sequence[str] = ()) -> bytes:
        """:meth:`body`, encoded."""
        return self._entry(tuple(groups) or (group,), tuple(allowed))[2]

    def _entry(self, groups: tuple[str, ...], allowed: tuple[str, ...]
               ) -> tuple[int, dict[str, Any], bytes]:
        version = self.registry.live_version()
        view = (groups, allowed)
        cached = self._entries.get(view)
        if cached is not None and cached[0] == version:
            return cached
        live: dict[str, list[Any]] = {}
        for group in groups:
            for model, peers in self.registry.live_in_group(group).items():
                if not allowed or model in allowed:
                    live.setdefault(model, []).extend(peers)
        data = []
        for model, peers in sorted(live.items()):
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
        if len(self._entries) >= MAX_VIEWS:
            self._entries.clear()
        entry = self._entries[view] = (version, body, msgspec.json.encode(body))
        return entry
