"""Collecting a non-streamed answer whole, within the gateway's memory for answers,
and sending it to the client.

A non-streamed answer is held until its END so that a node failing before then is
replaced by another and the client gets one clean answer. What is held is bounded:
each answer by ``max_response_bytes`` (502 above), all of them together by
``max_buffered_bytes``, of which one directly connected peer (a node, or a relay with
all its nodes) may hold at most a quarter (see :meth:`AnswerBuffers.node_budget`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from tooti.billing.base import Outcome
from tooti.errors import APIError, from_end_info
from tooti.gateway.byte_budget import BudgetExhausted, ByteBudget, Share
from tooti.gateway.proxy_settings import ProxySettings
from tooti.mesh.http import ClientGone, Headers, Send, send_bytes
from tooti.tunnel import OutboundStream, TunnelLost

log = logging.getLogger("tooti.gateway")


class AnswerLost(Exception):
    """The node failed before its answer was whole (tunnel lost, or an error END):
    nothing reached the client, so another node may be tried. ``error`` is what the
    client gets if none is."""

    def __init__(self, error: APIError) -> None:
        super().__init__(error.message)
        self.error = error


class AnswerBuffers:
    """The memory held by non-streamed answers being collected, over every request,
    and each directly connected peer's part of it."""

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        """Shared with the proxy: ``max_response_bytes`` and ``buffer_wait`` are read
        per answer."""
        self.buffers = ByteBudget(settings.max_buffered_bytes)
        """Memory held by non-streamed answers being collected, over every request."""
        self.node_buffers: dict[str, ByteBudget] = {}
        """Node id → its part of :attr:`buffers` (see :meth:`node_budget`), while it
        holds any."""

    def node_budget(self, node_id: str) -> ByteBudget:
        """The bytes of answers one directly connected peer (a node, or a relay with all
        its nodes) may have held at once: a quarter of :attr:`buffers`, but at least one
        whole answer, so that slow or huge answers of one peer cannot take the memory
        every other peer's answers need."""
        budget = self.node_buffers.get(node_id)
        if budget is None:
            limit = max(self.settings.max_response_bytes, self.buffers.limit // 4)
            budget = self.node_buffers[node_id] = ByteBudget(limit)
        return budget

    def shares(self, holder: str) -> tuple[Share, Share]:
        """A new answer's share of ``holder``'s :meth:`node_budget` and of :attr:`buffers`."""
        return self.node_budget(holder).share(), self.buffers.share()

    def release(self, holder: str, shares: tuple[Share, Share]) -> None:
        """Give back what an answer held (it was sent, failed or was cancelled)."""
        for share in shares:
            share.release()
        budget = self.node_buffers.get(holder)
        if budget is not None and budget.idle:
            del self.node_buffers[holder]

    async def collect_and_send(
        self, out: OutboundStream, node_id: str, holder: str, status: int,
        media_type: bytes, send: Send, headers: Headers, request_id: str,
        outcome: Outcome, settle: Callable[[], Awaitable[None]],
    ) -> None:
        """Collect a non-streamed answer whole in ``holder``'s part of the memory (a
        failure before its END raises :class:`AnswerLost`), run ``settle``, then send
        it; a client that takes longer than ``send_deadline`` to read it is
        disconnected (:class:`ClientGone`)."""
        shares = self.shares(holder)
        parts: list[bytes] = []
        try:
            parts = await self.collect(out, node_id, shares)
            outcome.served = True
            outcome.status = "ok" if status < 400 else "error"
            outcome.relayed_bytes = sum(map(len, parts))
            await settle()
            with trio.move_on_after(self.settings.send_deadline) as sending:
                await send_collected(send, status, parts, outcome.relayed_bytes, headers,
                                     media_type)
            if sending.cancelled_caught:  # its bytes were held for it long enough
                log.info("request %s: the client took over %gs to read its answer;"
                         " disconnected", request_id, self.settings.send_deadline)
                raise ClientGone
        finally:  # the bytes go as the budget gets them back
            parts.clear()
            self.release(holder, shares)

    async def collect(self, out: OutboundStream, node_id: str, shares: tuple[Share, Share]
                      ) -> list[bytes]:
        """Read a whole non-streamed answer, each byte reserved first in the node's share
        of :meth:`node_budget` and then in its share of :attr:`buffers` (the caller
        releases both). A failure before END raises :class:`AnswerLost`; an answer over
        ``max_response_bytes`` is 502; no room within ``buffer_wait`` is 503."""
        limit = self.settings.max_response_bytes
        parts: list[bytes] = []
        size = 0
        try:
            async for chunk in out.body():
                size += len(chunk)
                if size > limit:
                    raise APIError(502, f"node {node_id} answered more than {limit} bytes",
                                   code="response_too_large")
                for share in shares:
                    if not share.try_reserve(len(chunk)):
                        await self._wait_for_room(share, len(chunk))
                parts.append(chunk)
        except BaseException as exc:
            parts.clear()  # the exception's traceback would keep them alive while handled
            if isinstance(exc, TunnelLost):
                raise AnswerLost(APIError(502, f"node {node_id} lost mid-response: {exc}",
                                          code="node_unavailable")) from None
            raise
        info = out.end_info or {}
        if "error" in info:
            raise AnswerLost(from_end_info(info))
        return parts

    async def _wait_for_room(self, share: Share, size: int) -> None:
        """Reserve ``size`` bytes in ``share``, waiting at most ``buffer_wait``; else 503
        (also when the answer was refused to let an older one finish)."""
        wait = self.settings.buffer_wait
        why = f"no room within {wait:g}s"
        with trio.move_on_after(wait):
            try:
                await share.reserve(size)
                return
            except BudgetExhausted as exc:
                why = str(exc)
        log.warning("request answer refused: gateway memory for answers full (%d of %d "
                    "bytes held): %s", self.buffers.used, self.buffers.limit, why)
        raise APIError(503, "the gateway is holding as many answers as its memory allows; "
                       "retry shortly", code="gateway_memory_busy",
                       type="service_unavailable", headers={"retry-after": "1"})


async def send_collected(send: Send, status: int, parts: list[bytes], size: int,
                         headers: Headers, media_type: bytes) -> None:
    """Send a collected answer of ``size`` bytes with a content-length; several parts go
    out one by one (never joined into one more copy)."""
    if len(parts) <= 1:
        await send_bytes(send, status, parts[0] if parts else b"", headers, media_type)
        return
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", media_type),
                    (b"content-length", str(size).encode()), *headers],
    })
    last = len(parts) - 1
    for index, part in enumerate(parts):
        await send({"type": "http.response.body", "body": part, "more_body": index < last})
