"""Probing a node's model out of cooldown with one cheap request.

A probe task runs in the gateway's nursery, so nothing it meets may end it: a probe
that raises counts as a failed probe (a longer cooldown follows), and anything else
that raises is logged and the probing starts over.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import msgspec
import trio

from tooti import clock
from tooti.gateway.proxy_settings import ProxySettings
from tooti.mesh.peer import Peer
from tooti.mesh.registry import Registry
from tooti.protocol.connection import FlowControlError
from tooti.tunnel import TunnelLost

log = logging.getLogger("tooti.gateway")

RETRY_DELAY = 5.0
"""Seconds before probing starts over after an unexpected error."""


def probe_body(model: str, endpoints: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """The cheapest request ``model`` accepts: one token, or one short embedding."""
    if "chat/completions" in endpoints:
        return "chat/completions", {"model": model, "max_tokens": 1,
                                    "messages": [{"role": "user", "content": "ping"}]}
    if "completions" in endpoints:
        return "completions", {"model": model, "prompt": "ping", "max_tokens": 1}
    return "embeddings", {"model": model, "input": "ping"}


async def probe_once(peer: Peer, model: str, limit: float) -> str | None:
    """Send one probe, allowing it ``limit`` seconds; None on success, else why it failed."""
    info = peer.models.get(model)
    if info is None:
        return "model no longer served"
    endpoint, body = probe_body(model, info.endpoints)
    meta = {"request_id": "probe_" + uuid.uuid4().hex, "endpoint": endpoint, "model": model,
            "stream": False, "probe": True}
    if peer.draining:
        return "node is draining"
    try:
        with trio.fail_after(limit):
            out = await peer.open_stream(meta, msgspec.json.encode(body))
            try:
                head = await out.head()
                async for _chunk in out.body():
                    pass
            finally:
                await out.cancel("probe over")
    except (TunnelLost, FlowControlError) as exc:
        return f"tunnel unavailable: {exc}"
    except trio.TooSlowError:
        return f"probe got no answer within {limit:g}s"
    end = out.end_info or {}
    if head is None or head.status >= 400 or "error" in end:
        return f"probe answered {head.status if head else 'no head'}: {end.get('error')}"
    return None


async def probe_until_healthy(registry: Registry, peer: Peer, model: str,
                              settings: ProxySettings) -> None:
    """Wait out the cooldown, probe; success ends it, failure starts a longer one.
    Never raises (see the module docstring)."""
    while True:
        try:
            await _probe_until_healthy(registry, peer, model, settings)
            return
        except Exception:
            log.exception("probing node %s model %s failed; starting over in %gs",
                          peer.id, model, RETRY_DELAY)
        await trio.sleep(RETRY_DELAY)


async def _probe_until_healthy(registry: Registry, peer: Peer, model: str,
                               settings: ProxySettings) -> None:
    record = peer.health_of(model)
    while record.in_cooldown and not peer.session.closed.is_set():
        await trio.sleep(max(0.0, record.cooldown_until - clock.now()))
        # A node that withdrew the model (sick backend) is probed once it offers it again.
        await registry.wait_until(
            lambda: model in peer.models or peer.session.closed.is_set())
        if peer.session.closed.is_set():
            return
        record.probing = True
        try:
            failure = await probe_once(peer, model, settings.first_byte_timeout)
        except Exception as exc:
            log.exception("probe of node %s model %s raised", peer.id, model)
            failure = f"probe raised {type(exc).__name__}"
        finally:
            record.probing = False
        if failure is None:
            log.info("node %s model %s passed its probe: back in service", peer.id, model)
            record.end_cooldown()
        else:
            duration = record.start_cooldown(f"probe failed: {failure}", settings.cooldown)
            log.warning("node %s model %s failed its probe (%s); cooldown %.0fs",
                        peer.id, model, failure, duration)
        registry.changed()
        registry.bus.publish("peer.cooldown", peer_id=peer.id, model=model,
                             **record.describe())
