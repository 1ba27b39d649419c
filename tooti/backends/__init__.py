"""Node backends: what actually answers a request (see :mod:`tooti.backends.base`).

``BACKEND_TYPES`` maps config type names to classes; :func:`create_backend`
builds one from its :class:`~tooti.settings.BackendSettings`. Every class takes
the settings as its only constructor argument.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from tooti.backends.base import Backend, BackendError, BackendResponse, ModelInfo
from tooti.backends.llamacpp import LlamaCppBackend
from tooti.backends.ollama import OllamaBackend
from tooti.backends.openai import OpenAIBackend
from tooti.backends.simulated import SimulatedBackend
from tooti.hookspecs import hookimpl
from tooti.settings import BackendSettings

__all__ = [
    "BACKEND_TYPES",
    "Backend",
    "BackendError",
    "BackendResponse",
    "LlamaCppBackend",
    "ModelInfo",
    "OpenAIBackend",
    "SimulatedBackend",
    "create_backend",
]

BACKEND_TYPES: dict[str, type] = {
    "llamacpp": LlamaCppBackend,
    "ollama": OllamaBackend,
    "openai": OpenAIBackend,
    "simulated": SimulatedBackend,
}


def create_backend(settings: BackendSettings) -> Backend:
    """Build the backend named by ``settings.type`` from the loaded plugins.

    Raises ``ValueError`` (listing the available types) for an unknown type;
    a type's own constructor may raise too (e.g. ``llamacpp`` without the
    'local' extra installed).
    """
    from tooti import plugins

    try:
        factory = plugins.get().factory("tooti_backends", settings.type, "backend type")
    except plugins.PluginError as exc:
        raise ValueError(str(exc)) from None
    backend: Backend = factory(settings)
    return backend


@hookimpl
def tooti_backends() -> Mapping[str, Callable[[BackendSettings], Backend]]:
    """The built-in backend types."""
    return dict(BACKEND_TYPES)
