"""CORS: letting web pages of configured origins call the gateway's API from a browser
(``[gateway.cors] allow_origins``; off while it is empty).

The station asks :meth:`Cors.__call__` first for every HTTP request when CORS is on
(one attribute check when it is off) and only for the API's paths (``/v1/…`` and the
Ollama front's ``/api/…``; never the admin API, ``/healthz`` or tunnels):

* **A preflight** (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``)
  is answered here, before authentication (a browser sends no credentials with it):
  204 with ``Access-Control-Allow-Origin``, ``-Methods`` (GET, POST, OPTIONS),
  ``-Headers`` and ``-Max-Age`` for an allowed origin. ``-Headers`` repeats the headers
  the browser asked for when each is a plain header name (the official SDKs send many
  ``x-stainless-*`` headers of their own; a fixed list would break them), else lists
  ``authorization, content-type, x-api-key, anthropic-version, x-request-id``. No
  credentials (cookies) are ever involved: the API key travels in a header, so
  ``Access-Control-Allow-Credentials`` is not sent. A preflight from an origin not
  allowed gets 403 ``origin_not_allowed`` without CORS headers (the browser refuses the
  call; the 403 tells a person reading the network tab why).
* **Any other request** carrying an allowed ``Origin`` gets
  ``Access-Control-Allow-Origin`` (``*`` when ``"*"`` is configured, else the origin,
  with ``Vary: Origin``) and ``Access-Control-Expose-Headers`` (``x-request-id``, the
  rate-limit headers, ``retry-after``, ``x-tooti-node``, ``x-tooti-model``) on its
  answer, errors included: they are added to the headers every answer of the request
  carries. A disallowed origin gets no CORS header (the browser hides the answer).
"""

from __future__ import annotations

import re

from tooti.errors import APIError
from tooti.mesh.http import Headers, Scope, Send, header, send_error
from tooti.settings import CorsSettings

PATHS = ("/v1/", "/api/")
"""Path prefixes CORS applies to: the API, never the admin API or the probes."""
METHODS = b"GET, POST, OPTIONS"
DEFAULT_HEADERS = b"authorization, content-type, x-api-key, anthropic-version, x-request-id"
EXPOSED = (b"x-request-id, retry-after, x-tooti-node, x-tooti-model, "
           b"x-ratelimit-limit-requests, x-ratelimit-remaining-requests, "
           b"x-ratelimit-reset-requests, x-ratelimit-limit-tokens, "
           b"x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens")
_HEADER_LIST = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+(\s*,\s*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")
MAX_REQUESTED = 2048
"""Longest ``Access-Control-Request-Headers`` repeated back."""


class Cors:
    """The CORS answer of one gateway configuration (see the module docstring)."""

    def __init__(self, settings: CorsSettings) -> None:
        self.any = "*" in settings.allow_origins
        self.origins = frozenset(o.lower() for o in settings.allow_origins if o != "*")
        self.max_age = str(settings.max_age).encode()

    def allows(self, origin: bytes) -> bool:
        """True when pages of ``origin`` may call the API."""
        return self.any or origin.decode("latin-1").lower() in self.origins

    def _allow_origin(self, origin: bytes) -> Headers:
        if self.any:
            return [(b"access-control-allow-origin", b"*")]
        return [(b"access-control-allow-origin", origin), (b"vary", b"origin")]

    async def __call__(self, scope: Scope, send: Send, headers: Headers) -> bool:
        """Answer a preflight (True: the request is done), or add the CORS headers of
        an allowed origin to ``headers`` (the list every answer of the request carries)
        and return False."""
        path = scope["path"]
        if not path.startswith(PATHS):
            return False
        origin = header(scope, b"origin")
        if origin is None:
            return False
        if scope["method"] == "OPTIONS" and header(
                scope, b"access-control-request-method") is not None:
            if not self.allows(origin):
                await send_error(send, APIError(
                    403, "this origin may not call the API from a browser (see "
                    "gateway.cors.allow_origins)", code="origin_not_allowed",
                    type="permission_error"), headers)
                return True
            requested = header(scope, b"access-control-request-headers")
            allowed = (requested.strip() if requested is not None
                       and len(requested) <= MAX_REQUESTED
                       and _HEADER_LIST.fullmatch(requested.strip()) else DEFAULT_HEADERS)
            await send({"type": "http.response.start", "status": 204, "headers": [
                *headers, *self._allow_origin(origin),
                (b"access-control-allow-methods", METHODS),
                (b"access-control-allow-headers", allowed),
                (b"access-control-max-age", self.max_age),
            ]})
            await send({"type": "http.response.body", "body": b""})
            return True
        if self.allows(origin):
            headers.extend(self._allow_origin(origin))
            headers.append((b"access-control-expose-headers", EXPOSED))
        return False


def cors_of(settings: CorsSettings) -> Cors | None:
    """The station's CORS hook for ``settings``; None (no cost per request) when off."""
    return Cors(settings) if settings.allow_origins else None
