"""Node backends: what actually answers a request (see :mod:`tooti.backends.base`).

``BACKEND_TYPES`` maps config type names to classes; :func:`create_backend`
builds one from its :class:`~tooti.settings.BackendSettings`. Every class takes
the settings as its only constructor argument.
"""

from __future__ import annotations

from tooti.backends.base import Backend, BackendError, BackendResponse, ModelInfo
from tooti.backends.llamacpp import LlamaCppBackend
from tooti.backends.openai import OpenAIBackend
from tooti.backends.simulated import SimulatedBackend
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
    "openai": OpenAIBackend,
    "simulated": SimulatedBackend,
}


def create_backend(settings: BackendSettings) -> Backend:
    """Build the backend named by ``settings.type``.

    Raises ``ValueError`` (listing the available types) for an unknown type;
    a type's own constructor may raise too (e.g. ``llamacpp`` without the
    'local' extra installed).
    """
    cls = BACKEND_TYPES.get(settings.type)
    if cls is None:
        available = ", ".join(sorted(BACKEND_TYPES))
        raise ValueError(f"unknown backend type {settings.type!r}; available: {available}")
    backend: Backend = cls(settings)
    return backend
