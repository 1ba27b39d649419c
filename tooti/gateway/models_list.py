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
changes then.

Aliases (:mod:`tooti.gateway.aliases`) are listed beside the models, ``owned_by``
``"tooti-alias"``, when at least one of their ids is listed for the view (an alias
whose name is also a model id replaces that model's entry). ``GET /v1/models/{id}``
(:meth:`ModelsList.model`) answers one entry of the same view, encoded once per view
and registry version like the list, so the same caller sees the same objects both ways
and an id hidden from the list (another group's, not allowed by the key) is 404 as if
it did not exist."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from tooti.gateway.aliases import Aliases, alias_entry
from tooti.mesh.registry import Registry

MAX_VIEWS = 4096
"""Views (groups and allowed models) whose body is kept."""
View = tuple[tuple[str, ...], tuple[str, ...]]


class ModelsList:
    """Per view: ``(registry version, body, its JSON, each entry's JSON by id)``."""

    def __init__(self, registry: Registry, aliases: Aliases | None = None) -> None:
        self.registry = registry
        self.aliases = aliases or Aliases({})
        self._entries: dict[View, tuple[int, dict[str, Any], bytes, dict[str, bytes]]] = {}

    def use_aliases(self, aliases: Aliases) -> None:
        """List ``aliases`` from now on (SIGHUP); every cached view is built again."""
        self.aliases = aliases
        self._entries = {}

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

    def model(self, model: str, *, groups: Sequence[str] = ("",),
              allowed: Sequence[str] = ()) -> bytes | None:
        """The encoded entry of ``model`` in the view's list (None when it is not
        listed there: ``/v1/models/{id}`` answers 404)."""
        return self._entry(tuple(groups), tuple(allowed))[3].get(model)

    def _entry(self, groups: tuple[str, ...], allowed: tuple[str, ...]
               ) -> tuple[int, dict[str, Any], bytes, dict[str, bytes]]:
        version = self.registry.live_version()
        view = (groups, allowed)
        cached = self._entries.get(view)
        if cached is not None and cached[0] == version:
            return cached
        aliases = self.aliases
        live: dict[str, list[Any]] = {}
        everything: dict[str, list[Any]] = {}
        for group in groups:
            for model, peers in self.registry.live_in_group(group).items():
                if aliases:
                    everything.setdefault(model, []).extend(peers)
                if not allowed or model in allowed:
                    live.setdefault(model, []).extend(peers)
        entries: dict[str, dict[str, Any]] = {}
        for model, peers in live.items():
            info = peers[0].models[model]
            entries[model] = {
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
            }
        for name in aliases.tiers:
            visible = [m for tier in aliases.targets(name, allowed) for m in tier
                       if m in everything]
            if visible:
                nodes = {p for m in visible for p in everything[m]}
                entries[name] = alias_entry(
                    name, int(min(p.connected_at for p in nodes)), len(nodes), visible)
        data = [entries[model] for model in sorted(entries)]
        body = {"object": "list", "data": data}
        if len(self._entries) >= MAX_VIEWS:
            self._entries.clear()
        entry = self._entries[view] = (
            version, body, msgspec.json.encode(body),
            {model: msgspec.json.encode(item) for model, item in entries.items()})
        return entry
