"""CORS: letting web pages of configured origins call the gateway's API from a browser
(``[gateway.cors] allow_origins``), and refusing every other site's pages.

The station asks :meth:`Cors.__call__` first for every HTTP request. Every answer of the
gateway gets ``X-Content-Type-Options: nosniff`` (a browser never guesses a type a node
or a client could steer: an answer is only what its ``content-type`` says). The rest
applies to the API's paths only (``/v1/…`` and the Ollama front's ``/api/…``; never the
admin API, ``/healthz`` or tunnels), and costs nothing more to a request without an
``Origin`` header (the SDKs, curl, servers):

* **A preflight** (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``)
  is answered here, before authentication (a browser sends no credentials with it):
  204 with ``Access-Control-Allow-Origin``, ``-Methods`` (GET, POST, OPTIONS),
  ``-Headers`` and ``-Max-Age`` for an allowed origin. ``-Headers`` repeats the headers
  the browser asked for when each is a plain header name (the official SDKs send many
  ``x-stainless-*`` headers of their own; a fixed list would break them), else lists
  ``authorization, content-type, x-api-key, anthropic-version, x-request-id``; since it
  repeats them, the answer says ``Vary: Access-Control-Request-Headers`` (and ``Origin``
  when origins are listed). No credentials (cookies) are ever involved: the API key
  travels in a header, so ``Access-Control-Allow-Credentials`` is not sent. A preflight
  from an origin not allowed gets 403 ``origin_not_allowed`` without CORS headers.
* **Any other request** carrying an allowed ``Origin`` gets
  ``Access-Control-Allow-Origin`` (``*`` when ``"*"`` is configured, else the origin)
  and ``Access-Control-Expose-Headers`` (``x-request-id``, Anthropic's ``request-id``,
  the rate-limit headers, ``retry-after``, ``x-tooti-node``, ``x-tooti-model``) on its
  answer, errors included: they are added to the headers every answer of the request
  carries. When origins are listed (not ``"*"``) every answer of an API path says
  ``Vary: Origin``, with an ``Origin`` or without, so a cache never hands one origin's
  answer to another.
* **A request from another site's page** (an ``Origin`` neither allowed nor the
  gateway's own) is refused with 403 ``origin_not_allowed`` before anything runs, as
  Ollama refuses an origin outside ``OLLAMA_ORIGINS``: a browser sends a "simple"
  request (a ``text/plain`` POST) without a preflight, so hiding the answer is not
  enough, the request would still run. This holds with CORS off too (decision: with no
  ``allow_origins`` no other site's page may call the API, whatever the gateway's auth;
  its page could not read the answer anyway, and on an open gateway it could otherwise
  spend the network's capacity, or a local gateway's, from any site the user visits).
  The gateway's own origin is the ``Origin`` whose host and port are the request's
  ``Host`` (scheme ignored, default ports implied), or a browser's
  ``Sec-Fetch-Site: same-origin``; behind a proxy that rewrites ``Host`` for a site that
  calls the API from its pages, list that site in ``allow_origins``.
"""

from __future__ import annotations

import re

from tooti.errors import APIError
from tooti.mesh.http import Headers, Scope, Send, send_error
from tooti.settings import CorsSettings

PATHS = ("/v1/", "/api/")
"""Path prefixes CORS applies to: the API, never the admin API or the probes."""
METHODS = b"GET, POST, OPTIONS"
DEFAULT_HEADERS = b"authorization, content-type, x-api-key, anthropic-version, x-request-id"
EXPOSED = (b"x-request-id, request-id, retry-after, x-tooti-node, x-tooti-model, "
           b"x-ratelimit-limit-requests, x-ratelimit-remaining-requests, "
           b"x-ratelimit-reset-requests, x-ratelimit-limit-tokens, "
           b"x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens")
NOSNIFF = (b"x-content-type-options", b"nosniff")
"""On every answer of the gateway."""
VARY_ORIGIN = (b"vary", b"origin")
_HEADER_LIST = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+(\s*,\s*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")
MAX_REQUESTED = 2048
"""Longest ``Access-Control-Request-Headers`` repeated back."""
MAX_SHOWN = 128
"""Most characters of a refused origin named in the error."""
_DEFAULT_PORTS = {"http": ":80", "https": ":443"}


def same_origin(origin: bytes, host: bytes | None) -> bool:
    """True when ``origin`` (``scheme://host[:port]``) names the host and port of the
    request's ``Host`` header (the scheme's default port implied on either side)."""
    if host is None:
        return False
    scheme, sep, authority = origin.decode("latin-1").lower().partition("://")
    if not sep:
        return False
    default = _DEFAULT_PORTS.get(scheme, "")
    served = host.decode("latin-1").lower()
    if default:
        authority = authority.removesuffix(default)
        served = served.removesuffix(default)
    return authority == served


class Cors:
    """The CORS answer of one gateway configuration (see the module docstring)."""

    def __init__(self, settings: CorsSettings) -> None:
        self.any = "*" in settings.allow_origins
        self.origins = frozenset(o.lower() for o in settings.allow_origins if o != "*")
        self.listed = bool(self.origins) and not self.any
        """Origins are listed (not ``"*"``): every API answer varies by ``Origin``."""
        self.max_age = str(settings.max_age).encode()

    def allows(self, origin: bytes) -> bool:
        """True when pages of ``origin`` may call the API."""
        return self.any or origin.decode("latin-1").lower() in self.origins

    async def __call__(self, scope: Scope, send: Send, headers: Headers) -> bool:
        """Answer a preflight or refuse another site's request (True: the request is
        done), or add this request's headers to ``headers`` (the list every answer of
        the request carries) and return False."""
        headers.append(NOSNIFF)
        if not scope["path"].startswith(PATHS):
            return False
        if self.listed:
            headers.append(VARY_ORIGIN)
        origin = method = requested = host = fetch_site = None
        for key, value in scope["headers"]:
            if key == b"origin":
                origin = bytes(value)
            elif key == b"access-control-request-method":
                method = value
            elif key == b"access-control-request-headers":
                requested = bytes(value)
            elif key == b"host":
                host = bytes(value)
            elif key == b"sec-fetch-site":
                fetch_site = value
        if origin is None:
            return False
        preflight = scope["method"] == "OPTIONS" and method is not None
        if self.allows(origin):
            headers.append((b"access-control-allow-origin", b"*" if self.any else origin))
            if preflight:
                await self._preflight(send, headers, requested)
                return True
            headers.append((b"access-control-expose-headers", EXPOSED))
            return False
        if not preflight and (fetch_site == b"same-origin" or same_origin(origin, host)):
            return False  # the gateway's own page: no CORS involved
        shown = origin.decode("latin-1")[:MAX_SHOWN]
        await send_error(send, APIError(
            403, f"pages of {shown} may not call this API from a browser (see "
            "gateway.cors.allow_origins)", code="origin_not_allowed",
            type="permission_error"), headers)
        return True

    async def _preflight(self, send: Send, headers: Headers, requested: bytes | None
                         ) -> None:
        """The 204 of an allowed origin's preflight (``headers`` already allow it)."""
        allowed = (requested.strip() if requested is not None
                   and len(requested) <= MAX_REQUESTED
                   and _HEADER_LIST.fullmatch(requested.strip()) else DEFAULT_HEADERS)
        vary = (b"origin, access-control-request-headers" if self.listed
                else b"access-control-request-headers")
        await send({"type": "http.response.start", "status": 204, "headers": [
            *(h for h in headers if h != VARY_ORIGIN), (b"vary", vary),
            (b"access-control-allow-methods", METHODS),
            (b"access-control-allow-headers", allowed),
            (b"access-control-max-age", self.max_age),
        ]})
        await send({"type": "http.response.body", "body": b""})


def cors_of(settings: CorsSettings) -> Cors:
    """The station's CORS hook for ``settings`` (with ``allow_origins`` empty it still
    refuses other sites' pages and marks answers ``nosniff``)."""
    return Cors(settings)
