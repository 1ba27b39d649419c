"""Ollama's model listings answered from the network's live models, and its
model-management routes refused (sans-I/O).

The route hands over what the gateway knows of each live model a caller may use, as
:class:`NetworkModel` (:func:`models_from_list` reads them from the gateway's own
``/v1/models`` body). Only what the network knows is said: a model is listed under its
Ollama name (:func:`~tooti.fronts.ollama_api.ollama_name`: ``:latest`` added to an id
without a tag); ``modified_at`` is when its first live node connected; ``size``,
``size_vram`` and ``digest`` are unknown to a gateway and are 0 and ``""``; ``details``
carry what the nodes advertised (an Ollama-backed node sends ``family``,
``parameter_size``, ``quantization_level``, ``format``), ``""`` otherwise. ``/api/ps``
lists the same models as ``/api/tags`` (a live model is one a node has ready), with
``expires_at`` the zero time (no unload is scheduled) and ``context_length`` when
known. ``/api/show`` says ``capabilities`` only from the endpoints the nodes serve
(``completion``, ``embedding``: whether a model takes tools or images is unknown) and
no template, modelfile, parameters or license (unknown).

``/api/pull``, ``/api/push``, ``/api/create``, ``/api/delete``, ``/api/copy`` and
``/api/blobs/...`` answer 501 with ``{"error": "... not supported by a network
gateway ..."}`` (:func:`unsupported`).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import msgspec
from msgspec import Struct

from tooti.errors import APIError
from tooti.fronts.ollama_api import ModelName, decode_request, ollama_name, resolve_model

API_VERSION = "0.12.0"
"""The Ollama version ``/api/version`` reports: the API level this front speaks
(tools, ``format`` schemas, ``think``, ``/api/embed``), which clients gate features on."""

ROOT_TEXT = b"Ollama is running"
"""What ``GET /`` answers (``text/plain``): clients probe it to find a server."""

_encode = msgspec.json.encode
_ZERO_TIME = "0001-01-01T00:00:00Z"
_DETAILS = ("format", "family", "parameter_size", "quantization_level")


class NetworkModel(Struct, frozen=True):
    """What the gateway knows of one live model."""

    id: str
    owned_by: str = "tooti"
    created: int = 0
    """Unix seconds: when its first live node connected."""
    nodes: int = 1
    context_length: int | None = None
    endpoints: tuple[str, ...] = ("chat/completions", "completions", "embeddings")
    details: tuple[tuple[str, str], ...] = ()
    """``(key, value)`` of Ollama's ``details`` the nodes advertised in ``meta``."""


def models_from_list(body: dict[str, Any]) -> list[NetworkModel]:
    """The models of the gateway's ``/v1/models`` body (its ``meta``: ``nodes``,
    ``context_length``, ``endpoints``, and the Ollama details an Ollama node sent)."""
    out = []
    data = body.get("data")
    for entry in data if isinstance(data, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        meta = entry.get("meta") if isinstance(entry.get("meta"), dict) else {}
        assert isinstance(meta, dict)
        context = meta.get("context_length")
        endpoints = meta.get("endpoints")
        out.append(NetworkModel(
            id=entry["id"],
            owned_by=str(entry.get("owned_by") or "tooti"),
            created=entry["created"] if isinstance(entry.get("created"), int) else 0,
            nodes=meta["nodes"] if isinstance(meta.get("nodes"), int) else 1,
            context_length=context if isinstance(context, int) and context > 0 else None,
            endpoints=tuple(e for e in endpoints if isinstance(e, str))
            if isinstance(endpoints, list) else NetworkModel.__struct_defaults__[3],
            details=tuple((k, meta[k]) for k in _DETAILS if isinstance(meta.get(k), str)),
        ))
    return out


def _time(created: int) -> str:
    if created <= 0:
        return _ZERO_TIME
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))


def _details(model: NetworkModel) -> dict[str, Any]:
    known = dict(model.details)
    family = known.get("family", "")
    return {"parent_model": "", "format": known.get("format", ""), "family": family,
            "families": [family] if family else None,
            "parameter_size": known.get("parameter_size", ""),
            "quantization_level": known.get("quantization_level", "")}


def _listed(models: Iterable[NetworkModel]) -> list[tuple[str, NetworkModel]]:
    """``(Ollama name, model)``, one per name (an exact id wins over a ``:latest``
    alias of another id), sorted by name."""
    named: dict[str, NetworkModel] = {}
    for model in models:
        name = ollama_name(model.id)
        if name not in named or model.id == name:
            named[name] = model
    return sorted(named.items())


def _tag(name: str, model: NetworkModel) -> dict[str, Any]:
    return {"name": name, "model": name, "modified_at": _time(model.created), "size": 0,
            "digest": "", "details": _details(model)}


def tags_body(models: Iterable[NetworkModel]) -> bytes:
    """``GET /api/tags``: the live models, by Ollama name."""
    return _encode({"models": [_tag(name, model) for name, model in _listed(models)]})


def ps_body(models: Iterable[NetworkModel]) -> bytes:
    """``GET /api/ps``: the live models as loaded ones."""
    entries = []
    for name, model in _listed(models):
        entry = {**_tag(name, model), "expires_at": _ZERO_TIME, "size_vram": 0}
        if model.context_length is not None:
            entry["context_length"] = model.context_length
        entries.append(entry)
    return _encode({"models": entries})


def version_body() -> bytes:
    """``GET /api/version``."""
    return _encode({"version": API_VERSION})


class _Show(Struct):
    model: ModelName | None = None
    name: ModelName | None = None  # the field's older name
    verbose: bool | None = None


def _capabilities(model: NetworkModel) -> list[str]:
    caps = []
    if "chat/completions" in model.endpoints or "completions" in model.endpoints:
        caps.append("completion")
    if "embeddings" in model.endpoints:
        caps.append("embedding")
    return caps


def show_body(raw: bytes, models: Sequence[NetworkModel]) -> bytes:
    """``POST /api/show`` for the model the body names; APIError 400 for a bad body,
    404 (Ollama's ``model "x" not found``) for a model the caller has no live node of."""
    request: _Show = decode_request(raw, _Show)
    name = request.model or request.name
    if not name:
        raise APIError(400, "model is required", param="model", code="invalid_value")
    by_id = {model.id: model for model in models}
    model = by_id.get(resolve_model(name, by_id))
    if model is None:
        raise not_found(name)
    details = _details(model)
    info: dict[str, Any] = {"tooti.owned_by": model.owned_by, "tooti.nodes": model.nodes}
    if details["family"]:
        info["general.architecture"] = details["family"]
        if model.context_length is not None:
            info[f"{details['family']}.context_length"] = model.context_length
    if model.context_length is not None:
        info["tooti.context_length"] = model.context_length
    return _encode({"details": details, "model_info": info,
                    "capabilities": _capabilities(model),
                    "modified_at": _time(model.created)})


def not_found(name: str) -> APIError:
    """Ollama's 404 for a model no live node serves (clients look for the status)."""
    return APIError(404, f'model "{name}" not found', code="model_not_found", param="model")


UNSUPPORTED: dict[str, str] = {
    "/api/pull": "pull", "/api/push": "push", "/api/create": "create",
    "/api/delete": "delete", "/api/copy": "copy", "/api/blobs": "blobs",
}
"""The model-management routes (path, or prefix for ``/api/blobs/<digest>``) a gateway
refuses, with the action each names."""


def unsupported(action: str) -> APIError:
    """The 501 a model-management route answers: a network gateway serves the models
    its nodes run and stores none."""
    return APIError(501, f"{action} is not supported by a network gateway: the models are "
                    "the ones the network's nodes serve (GET /api/tags lists them)",
                    code="not_supported")


def unsupported_action(path: str) -> str | None:
    """The action of a refused model-management ``path``, or None."""
    for prefix, action in UNSUPPORTED.items():
        if path == prefix or path.startswith(prefix + "/"):
            return action
    return None


def live_ids(models: Collection[NetworkModel]) -> frozenset[str]:
    """The ids to resolve Ollama names against (``live=`` of the parsers)."""
    return frozenset(model.id for model in models)
