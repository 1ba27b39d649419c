"""The addresses the console writes into what it shows (a login link, the quick start,
the ``tooti run --peer`` line of a join token).

When the gateway has a public address (``network.public_url``, its tunnel URL as others
reach it), every address derives from it: the request's ``Host`` header is the client's
to choose, so a request sent with a forged one (or through a proxy that passes it on)
must not make a login link point elsewhere. Without one, the address is the one the
browser used, which is what a user of a gateway on its own address expects.
"""

from __future__ import annotations

from quart import g, request

from tooti.admin.accounts_api import public_origin


def tunnel_url() -> str:
    """Where a node dials: ``network.public_url``, else ``ws://`` (``wss://`` behind
    TLS) and the host the browser reached."""
    public = g.ctx.public_url()
    if public:
        return str(public)
    scheme = "wss" if request.scheme in ("https", "wss") else "ws"
    return f"{scheme}://{request.host}"


def site_url() -> str:
    """This gateway's HTTP address without a trailing slash: the origin of
    ``network.public_url`` (``ws`` read as ``http``, ``wss`` as ``https``), else the
    one the browser reached."""
    return public_origin(g.ctx.public_url()) or request.host_url.rstrip("/")
