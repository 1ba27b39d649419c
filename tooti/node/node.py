"""The node role: serve streams from gateways out of local backends.

A node dials every configured peer (re-dialling with exponential backoff and
jitter), introduces itself with HELLO, announces its models, sends load
figures in heartbeats, and answers each OPEN by calling the backend that
serves the model. A CANCEL frame, or the tunnel's loss, cancels the stream's
scope, which closes the backend's upstream request.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import trio

from tooti import clock
from tooti.backends.base import Backend, BackendError, ModelInfo, health_problem
from tooti.dialer import Dialer
from tooti.identity import Identity
from tooti.node.metering import UsageMeter
from tooti.protocol.usage import completion_limit, end_error
from tooti.settings import NetworkSettings, NodeSettings, TunnelSettings
from tooti.transport import Transport
from tooti.tunnel import InboundStream, StreamHandler, StreamOpener, TunnelLost, TunnelSession

log = logging.getLogger("tooti.node")
_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()

MAX_REQUEST_BYTES = 64 * 1024 * 1024


class Node:
    """One node: backends, model table, and a tunnel session per peer."""

    def __init__(
        self, settings: NodeSettings, tunnel: TunnelSettings, backends: list[Backend],
        node_id: str | None = None, poll_interval: float = 30.0,
        identity: Identity | None = None, network: NetworkSettings | None = None,
        dial: bool = True,
    ) -> None:
        self.settings = settings
        self.tunnel_settings = tunnel
        self.backends = backends
        self.identity = identity or Identity.generate()
        """The keypair this node proves in every handshake (in memory if not given)."""
        self.id = node_id or self.identity.id
        self.poll_interval = poll_interval
        self.dial = dial
        """False when the node only attaches in memory to a relay in the same process."""
        self.health_interval = settings.health_interval
        self.models: dict[str, tuple[Backend, ModelInfo]] = {}
        self.in_flight = 0
        self.queued = 0
        self.healthy = True
        self.draining = False
        self._slots: dict[str, trio.Semaphore] = {}
        self._listed: dict[int, list[ModelInfo]] = {}
        self._backend_ok: dict[int, bool] = {}
        self._idle = trio.Event()
        self._idle.set()
        self._ttft_ms = 0.0
        self.dialer = Dialer(
            self, peer_id=self.id, role="node", identity=self.identity, tunnel=tunnel,
            network=network, labels=dict(settings.labels), join_token=settings.join_token,
            reconnect_initial=settings.reconnect_initial,
            reconnect_max=settings.reconnect_max, is_stopping=lambda: self.draining,
            streams_wanted=self.slots,
        )
        self.sessions: set[TunnelSession] = self.dialer.sessions
        self.handler: StreamHandler | None = self._serve_stream
        self.opener: StreamOpener | None = None

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start backends, dial every peer, and serve until cancelled."""
        for backend in self.backends:
            await backend.start()
        try:
            await self.refresh_models()
            async with trio.open_nursery() as nursery:
                for backend in self.backends:
                    nursery.start_soon(backend.run)
                nursery.start_soon(self._watch_backends)
                if self.dial:
                    await nursery.start(self.dialer.run, list(self.settings.peers))
                task_status.started()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                for backend in self.backends:
                    await backend.close()

    async def drain(self, grace: float) -> None:
        """Refuse new streams (GOAWAY), let in-flight ones finish for up to ``grace``."""
        self.draining = True
        await self.dialer.drain(grace, self.wait_idle, "node shutting down")

    @property
    def connected(self) -> trio.Event:
        """Set each time a session completes its handshake (for callers that wait)."""
        return self.dialer.connected

    async def wait_idle(self) -> None:
        """Wait until no stream is in flight on this node."""
        await self._idle.wait()

    async def refresh_models(self, list_models: bool = True) -> bool:
        """Check every backend's health and (with ``list_models``) re-read its models.

        Only healthy backends' models are served, so a sick backend's models
        stop receiving traffic at the next announcement. Returns True if the
        served model table changed.
        """
        table: dict[str, tuple[Backend, ModelInfo]] = {}
        healthy_any = False
        for index, backend in enumerate(self.backends):
            try:
                if not await backend.health():
                    raise RuntimeError(health_problem(backend))
                if list_models or index not in self._listed:
                    self._listed[index] = await backend.models()
            except Exception as exc:  # a sick backend only loses its models
                if self._backend_ok.get(index, True):
                    log.warning("backend %s unavailable: %s", backend.type_name, exc)
                self._backend_ok[index] = False
                continue
            if not self._backend_ok.get(index, True):
                log.info("backend %s is healthy again", backend.type_name)
            self._backend_ok[index] = True
            healthy_any = True
            for info in self._listed[index]:
                table.setdefault(info.id, (backend, info))
        self.healthy = healthy_any
        changed = {k: v[1] for k, v in table.items()} != {k: v[1] for k, v in self.models.items()}
        self.models = table
        for model, (_, info) in table.items():
            if model not in self._slots:
                self._slots[model] = trio.Semaphore(max(1, info.max_concurrency))
        return changed

    def slots(self) -> int:
        """Concurrent requests the node's models advertise, over all of them."""
        return sum(info.max_concurrency for _, info in self.models.values())

    def models_wire(self) -> list[dict[str, Any]]:
        """The MODELS frame payload."""
        return [info.to_wire() for _, info in self.models.values()]

    async def _watch_backends(self) -> None:
        """Health every ``health_interval``, models every ``poll_interval``; announce changes."""
        next_listing = clock.now() + self.poll_interval
        while True:
            await trio.sleep(min(self.health_interval, self.poll_interval))
            list_models = clock.now() >= next_listing
            if list_models:
                next_listing = clock.now() + self.poll_interval
            if await self.refresh_models(list_models):
                log.info("models changed: %s", ", ".join(sorted(self.models)) or "none")
                await self.announce_models()

    async def announce_models(self) -> None:
        """Send the current model table to every connected peer."""
        for session in list(self.sessions):
            try:
                await session.send_control(lambda conn: conn.send_models(self.models_wire()))
            except TunnelLost:
                continue

    def stats(self) -> dict[str, Any]:
        """The HEARTBEAT payload: load and health."""
        return {
            "in_flight": self.in_flight,
            "queued": self.queued,
            "capacity": self.slots(),
            "healthy": self.healthy,
            "ttft_ms": round(self._ttft_ms, 3),
        }

    # ------------------------------------------------------------ dialling

    async def dial_forever(self, url: str) -> None:
        """Keep one session with ``url``, re-dialling with backoff and jitter."""
        await self.dialer.dial_forever(url)

    async def serve_transport(self, transport: Transport) -> None:
        """Run the dialer side of one tunnel (handshake, then serve) until it closes."""
        await self.dialer.serve_transport(transport)

    async def on_session(self, session: TunnelSession) -> None:
        """A new session is open: announce our models on it."""
        await session.send_control(lambda conn: conn.send_models(self.models_wire()))

    # ------------------------------------------------------------ serving

    async def _serve_stream(self, stream: InboundStream) -> None:
        meta = stream.meta
        endpoint, model = meta.get("endpoint"), meta.get("model")
        if not isinstance(endpoint, str) or not isinstance(model, str):
            await stream.end(end_error(400, "bad_open", "OPEN needs endpoint and model strings"))
            return
        entry = self.models.get(model)
        if entry is None or endpoint not in entry[1].endpoints:
            await stream.end(end_error(503, "model_not_served",
                                       f"node {self.id} does not serve {model} on /{endpoint}"))
            return
        backend, _info = entry
        try:
            body = await stream.read_body(MAX_REQUEST_BYTES)
            request = _decoder.decode(body)
        except (ValueError, msgspec.DecodeError) as exc:
            await stream.end(end_error(400, "bad_body", str(exc)))
            return
        if not isinstance(request, dict):
            await stream.end(end_error(400, "bad_body", "request body must be a JSON object"))
            return
        streaming = request.get("stream") is True
        strip = False
        if streaming:
            options = request.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                request["stream_options"] = {**(options or {}), "include_usage": True}
                body = _encoder.encode(request)
                strip = True
        self.in_flight += 1
        self._idle = trio.Event() if self.in_flight == 1 else self._idle
        try:
            self.queued += 1
            try:
                await self._slots[model].acquire()
            finally:
                self.queued -= 1
            try:
                await self._call_backend(stream, backend, endpoint, body, request, strip)
            finally:
                self._slots[model].release()
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def _call_backend(
        self, stream: InboundStream, backend: Backend, endpoint: str, body: bytes,
        request: dict[str, Any], strip: bool,
    ) -> None:
        meter: UsageMeter | None = None
        started = clock.now()
        try:
            async with backend.open(endpoint, body, request) as response:
                sse = response.content_type.startswith("text/event-stream")
                meter = UsageMeter(sse=sse, strip_usage_chunk=strip and sse,
                                   completion_cap=completion_limit(endpoint, request))
                await stream.respond(response.status, {"content-type": response.content_type})
                first = True
                async for chunk in response.chunks:
                    out = meter.feed(chunk)
                    if out:
                        if first:
                            first = False
                            self._ttft_ms = 0.8 * self._ttft_ms + 0.2 * (
                                (clock.now() - started) * 1000)
                        await stream.send(out)
                tail = meter.finish()
                if tail:
                    await stream.send(tail)
        except BackendError as exc:
            await stream.end({
                **(meter.report() if meter else {}),
                **end_error(exc.status, exc.code, exc.message, retryable=exc.retryable),
            })
            return
        except TunnelLost:
            raise
        except Exception as exc:
            log.warning("backend %s failed: %r", backend.type_name, exc)
            info = meter.report() if meter else {}
            await stream.end({**info, **end_error(502, "backend_failed",
                                                   f"backend failed: {type(exc).__name__}")})
            return
        await stream.end(meter.report())
