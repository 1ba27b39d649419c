"""The node role: serve streams from gateways out of local backends.

A node dials every configured peer (re-dialling with exponential backoff and
jitter), introduces itself with HELLO, announces its models, sends load
figures in heartbeats, and answers each OPEN by calling the backend that
serves the model. A CANCEL frame, or the tunnel's loss, cancels the stream's
scope, which closes the backend's upstream request.

A backend that can say what it is loading (``loading_models``, see
:mod:`tooti.backends.base`: the embedded llama.cpp backend) is started in the
background: the node dials at once and announces its models with state ``loading``
until the backend answers health and lists them, then as ``ready``. A gateway routes
only ready models. If such a backend's start fails, the error ends the node (and
``tooti run``) as a failed start always did: nothing stays "loading" for ever. A
backend that loads again later (a restarted llama.cpp child) is announced loading
while its launch is under way, and not at all between failed launches.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import msgspec
import trio

from tooti import clock
from tooti.backends.base import (
    Backend,
    BackendError,
    ModelInfo,
    announces_loading,
    health_problem,
    loading_models,
)
from tooti.dialer import Dialer
from tooti.identity import Identity
from tooti.node.metering import UsageMeter
from tooti.node.passthrough import UPLOAD_ENDPOINTS, PassThroughMeter, open_answer
from tooti.protocol.schemas import PASSTHROUGH_ENDPOINTS, announceable
from tooti.protocol.usage import completion_limit, end_error
from tooti.settings import NetworkSettings, NodeSettings, TunnelSettings
from tooti.transport import Transport
from tooti.tunnel import InboundStream, StreamHandler, StreamOpener, TunnelLost, TunnelSession

log = logging.getLogger("tooti.node")
_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()

MAX_REQUEST_BYTES = 64 * 1024 * 1024


class _NotStarted(Exception):
    """A backend started in the background has not finished starting."""


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
        """The ready models: the ones streams are served for."""
        self.loading: dict[str, ModelInfo] = {}
        """Models announced as loading (a backend still starting), none of them ready."""
        self.in_flight = 0
        self.queued = 0
        self.healthy = True
        self.draining = False
        self._slots: dict[str, trio.Semaphore] = {}
        self._listed: dict[int, list[ModelInfo]] = {}
        self._backend_ok: dict[int, bool] = {}
        self._started: set[int] = set()
        """Backends (by index) whose :meth:`Backend.start` returned."""
        self._starting: set[int] = set()
        """Backends whose start was called (closed at the end)."""
        self._was_loading: set[int] = set()
        self._refresh_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        """The nursery of :meth:`run` (backends a reload adds run in it)."""
        self._streams_of: dict[int, int] = {}
        """Streams in flight per backend (by ``id``), so a removed one closes after them."""
        self._stream_ended: trio.Event | None = None
        """Set when a stream ends, for a retiring backend waiting for its last stream
        (made only while one waits: no Event per request)."""
        self._run_scopes: dict[int, trio.CancelScope] = {}
        """The ``run`` task of every backend (cancelled when a reload removes it)."""
        self._idle: trio.Event | None = None
        """Set when the last stream in flight ends, for :meth:`wait_idle` (made only
        while one waits)."""
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
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for index, backend in enumerate(self.backends):
                    self._starting.add(index)
                    if announces_loading(backend):  # announced as loading meanwhile
                        nursery.start_soon(self._start_backend, index, backend)
                        continue
                    await backend.start()
                    self._started.add(index)
                    nursery.start_soon(self._supervise, backend)
                await self.refresh_models()
                nursery.start_soon(self._watch_backends)
                if self.dial:
                    await nursery.start(self.dialer.run, list(self.settings.peers))
                task_status.started()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                for index, backend in enumerate(self.backends):
                    if index in self._starting:
                        await backend.close()

    async def _start_backend(self, index: int, backend: Backend) -> None:
        """Start a backend that announces its models as loading meanwhile; once started,
        announce what it serves and supervise it. A failed start raises (ending the node,
        as a failed start did before the node dialled)."""
        await backend.start()
        self._started.add(index)
        if await self.refresh_models():
            self._log_models()
            await self.announce_models()
        await self._supervise(backend)

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
        while self.in_flight:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()

    async def refresh_models(self, list_models: bool = True) -> bool:
        """Check every backend's health and (with ``list_models``) re-read its models.

        Only healthy backends' models are served, so a sick backend's models
        stop receiving traffic at the next announcement. A backend still loading
        (started in the background, or unhealthy while it says it is loading) has its
        models announced as loading instead. Returns True if the announced model table
        (ready or loading) changed. One refresh at a time (the health loop and a
        backend that finished starting may both ask).
        """
        async with self._refresh_lock:
            return await self._refresh(list_models)

    async def _refresh(self, list_models: bool) -> bool:
        table: dict[str, tuple[Backend, ModelInfo]] = {}
        loading: dict[str, ModelInfo] = {}
        healthy_any = False
        for index, backend in enumerate(self.backends):
            try:
                if index not in self._started and announces_loading(backend):
                    raise _NotStarted  # started in the background, not done yet
                if not await backend.health():
                    raise RuntimeError(health_problem(backend))
                if list_models or index not in self._listed:
                    self._listed[index] = await backend.models()
            except Exception as exc:  # a sick backend only loses its models
                pending = loading_models(backend)
                if pending:
                    if index not in self._was_loading:
                        log.info("backend %s is loading %s", backend.type_name,
                                 ", ".join(info.id for info in pending))
                    self._was_loading.add(index)
                    for info in pending:
                        loading.setdefault(info.id, info)
                    continue
                self._was_loading.discard(index)
                if self._backend_ok.get(index, True) and not isinstance(exc, _NotStarted):
                    log.warning("backend %s unavailable: %s", backend.type_name, exc)
                self._backend_ok[index] = False
                continue
            if not self._backend_ok.get(index, True):
                log.info("backend %s is healthy again", backend.type_name)
            self._was_loading.discard(index)
            self._backend_ok[index] = True
            healthy_any = True
            for info in self._listed[index]:
                table.setdefault(info.id, (backend, info))
        for model in table:
            loading.pop(model, None)  # served by another backend already
        self.healthy = healthy_any or bool(loading)
        changed = (loading != self.loading or {k: v[1] for k, v in table.items()}
                   != {k: v[1] for k, v in self.models.items()})
        self.models = table
        self.loading = loading
        for model, info in [*((m, v[1]) for m, v in table.items()), *loading.items()]:
            if model not in self._slots:
                self._slots[model] = trio.Semaphore(max(1, info.max_concurrency))
        return changed

    def slots(self) -> int:
        """Concurrent requests the node's models advertise, over all of them (loading
        ones included: they are served on the same sessions once ready)."""
        return (sum(info.max_concurrency for _, info in self.models.values())
                + sum(info.max_concurrency for info in self.loading.values()))

    def models_wire(self, accepted: frozenset[str] | None = None) -> list[dict[str, Any]]:
        """The MODELS frame payload: the ready models, then those loading; with
        ``accepted`` (a session's :meth:`Dialer.accepted`), cut to the endpoint names
        that peer understands (:func:`~tooti.protocol.schemas.announceable`)."""
        wire = ([info.to_wire() for _, info in self.models.values()]
                + [info.to_wire() for info in self.loading.values()])
        return wire if accepted is None else announceable(wire, accepted)

    async def _announce(self, session: TunnelSession) -> None:
        """Send MODELS on ``session``: what its peer's WELCOME says it understands."""
        accepted = self.dialer.accepted(session)
        await session.send_control(lambda conn: conn.send_models(self.models_wire(accepted)))

    def _log_models(self) -> None:
        loading = f" (loading: {', '.join(sorted(self.loading))})" if self.loading else ""
        log.info("models changed: %s%s", ", ".join(sorted(self.models)) or "none", loading)

    async def _watch_backends(self) -> None:
        """Health every ``health_interval``, models every ``poll_interval``; announce changes."""
        next_listing = clock.now() + self.poll_interval
        while True:
            await trio.sleep(min(self.health_interval, self.poll_interval))
            list_models = clock.now() >= next_listing
            if list_models:
                next_listing = clock.now() + self.poll_interval
            if await self.refresh_models(list_models):
                self._log_models()
                await self.announce_models()

    async def announce_models(self) -> None:
        """Send the current model table to every connected peer."""
        for session in list(self.sessions):
            try:
                await self._announce(session)
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
        """A new session is open: announce our models on it (only the endpoints its
        peer understands: a gateway or relay older than the pass-through endpoints
        would ban a node naming one)."""
        await self._announce(session)

    # ------------------------------------------------------------ reload (SIGHUP)

    def backends_settled(self) -> bool:
        """True when no backend is still starting in the background (a reload of the
        backends waits for that)."""
        return self._starting <= self._started

    async def replace_backends(self, backends: list[Backend],
                               poll_interval: float | None = None) -> None:
        """SIGHUP: serve new streams from ``backends`` from now on.

        A backend object in both the old list and ``backends`` is kept as it is (started,
        its models listed, its slots); one only in ``backends`` must be started already
        (the reload started it, and a failed start refused the reload) and is supervised
        here from now on; one only in the old list leaves the model table at once, and
        is closed once the streams it serves have finished. The models are then read
        again and announced to every peer, so gateways list the change within a round
        trip. Call only while :meth:`backends_settled` and the node runs.
        """
        nursery = self._nursery
        if nursery is None:
            raise RuntimeError("the node is not running")
        sizes = {model: info.max_concurrency for model, (_, info) in self.models.items()}
        async with self._refresh_lock:  # no health round sees half the swap
            old = self.backends
            where = {id(backend): index for index, backend in enumerate(old)}
            moved = {where[id(b)]: index for index, b in enumerate(backends) if id(b) in where}
            fresh = {index for index, b in enumerate(backends) if id(b) not in where}
            self._listed = {moved[i]: v for i, v in self._listed.items() if i in moved}
            self._backend_ok = {moved[i]: v for i, v in self._backend_ok.items() if i in moved}
            self._started = {moved[i] for i in self._started if i in moved} | fresh
            self._starting = {moved[i] for i in self._starting if i in moved} | fresh
            self._was_loading = {moved[i] for i in self._was_loading if i in moved}
            kept = {id(backend) for backend in backends}
            removed = [backend for backend in old if id(backend) not in kept]
            self.backends = backends
            if poll_interval is not None:
                self.poll_interval = poll_interval
            self.models = {model: entry for model, entry in self.models.items()
                           if id(entry[0]) in kept}
        for index in sorted(fresh):
            nursery.start_soon(self._supervise, backends[index])
        for backend in removed:
            nursery.start_soon(self._retire, backend)
        await self.refresh_models()
        for model, (_, info) in self.models.items():  # a new max_concurrency, when idle
            slots, size = self._slots.get(model), sizes.get(model)
            if (slots is not None and size is not None and size != info.max_concurrency
                    and slots.value == max(1, size) and not slots.statistics().tasks_waiting):
                self._slots[model] = trio.Semaphore(max(1, info.max_concurrency))
        self._log_models()
        await self.announce_models()

    def _stream_done(self, backend: Backend) -> None:
        left = self._streams_of.get(id(backend), 0) - 1
        if left > 0:
            self._streams_of[id(backend)] = left
        else:
            self._streams_of.pop(id(backend), None)
            if self._stream_ended is not None:
                self._stream_ended.set()
                self._stream_ended = None

    async def _supervise(self, backend: Backend) -> None:
        """Run a backend (started with the node or added by a reload) until a reload
        removes it: :meth:`_retire` cancels its ``run`` before closing it, so no task of
        a removed backend is left behind."""
        with trio.CancelScope() as scope:
            self._run_scopes[id(backend)] = scope
            try:
                await backend.run()
            finally:
                self._run_scopes.pop(id(backend), None)

    async def _retire(self, backend: Backend) -> None:
        """Close a backend a reload removed, once no stream it serves is in flight (or
        at once when the node stops)."""
        try:
            while self._streams_of.get(id(backend), 0):
                if self._stream_ended is None:
                    self._stream_ended = trio.Event()
                await self._stream_ended.wait()
        finally:
            scope = self._run_scopes.pop(id(backend), None)
            if scope is not None:
                scope.cancel()
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                try:
                    await backend.close()
                except Exception as exc:  # it serves nothing any more: log and go on
                    log.warning("closing the removed backend %s failed: %s",
                                backend.type_name, exc)
                else:
                    log.info("backend %s removed: closed after its last stream",
                             backend.type_name)

    # ------------------------------------------------------------ serving

    async def _serve_stream(self, stream: InboundStream) -> None:
        meta = stream.meta
        endpoint, model = meta.get("endpoint"), meta.get("model")
        if not isinstance(endpoint, str) or not isinstance(model, str):
            await stream.end(end_error(400, "bad_open", "OPEN needs endpoint and model strings"))
            return
        entry = self.models.get(model)
        if entry is None and model in self.loading:  # a gateway that predates the state
            await stream.end(end_error(503, "model_loading",
                                       f"node {self.id} is still loading {model}"))
            return
        if entry is None or endpoint not in entry[1].endpoints:
            await stream.end(end_error(503, "model_not_served",
                                       f"node {self.id} does not serve {model} on /{endpoint}"))
            return
        backend, _info = entry
        # Counted from here: a reload removing this backend while the body is still read
        # closes it only after this stream (see _retire).
        self._streams_of[id(backend)] = self._streams_of.get(id(backend), 0) + 1
        try:
            await self._serve_on(stream, backend, endpoint, model)
        finally:
            self._stream_done(backend)

    async def _serve_on(self, stream: InboundStream, backend: Backend, endpoint: str,
                        model: str) -> None:
        """Serve an opened stream on ``backend``, counted in its streams in flight."""
        passthrough = endpoint in PASSTHROUGH_ENDPOINTS
        if endpoint in UPLOAD_ENDPOINTS:  # streamed to the backend, never read whole
            body, request = b"", {}
        else:
            try:
                body = await stream.read_body(MAX_REQUEST_BYTES)
                request = _decoder.decode(body)
            except (ValueError, msgspec.DecodeError) as exc:
                await stream.end(end_error(400, "bad_body", str(exc)))
                return
            if not isinstance(request, dict):
                await stream.end(end_error(400, "bad_body",
                                           "request body must be a JSON object"))
                return
        streaming = request.get("stream") is True and not passthrough
        strip = False
        if streaming:
            options = request.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                request["stream_options"] = {**(options or {}), "include_usage": True}
                body = _encoder.encode(request)
                strip = True
        self.in_flight += 1
        try:
            slots = self._slots[model]
            try:
                slots.acquire_nowait()  # the usual case: no yield before the request
            except trio.WouldBlock:
                self.queued += 1
                try:
                    await slots.acquire()
                finally:
                    self.queued -= 1
            try:
                if passthrough:
                    await self._call_passthrough(stream, backend, endpoint, model, body,
                                                 request)
                else:
                    await self._call_backend(stream, backend, endpoint, body, request, strip)
            finally:
                self._slots[model].release()
        finally:
            self.in_flight -= 1
            if self.in_flight == 0 and self._idle is not None:
                self._idle.set()
                self._idle = None

    async def _call_passthrough(
        self, stream: InboundStream, backend: Backend, endpoint: str, model: str,
        body: bytes, request: dict[str, Any],
    ) -> None:
        """Serve a pass-through endpoint: the answer relayed as the backend sends it,
        usage as :mod:`tooti.node.passthrough` reads it."""
        meter: PassThroughMeter | None = None
        try:
            async with open_answer(backend, stream, endpoint, model, body,
                                   request) as response:
                meter = PassThroughMeter(response)
                await stream.respond(response.status, {"content-type": response.content_type})
                async for chunk in response.chunks:
                    if chunk:
                        meter.feed(chunk)
                        await stream.send(chunk)
        except BackendError as exc:
            await stream.end({**(meter.report() if meter else {}),
                              **end_error(exc.status, exc.code, exc.message,
                                          retryable=exc.retryable and meter is None)})
            return
        except TunnelLost:
            raise
        except Exception as exc:
            log.warning("backend %s failed on /%s: %r", backend.type_name, endpoint, exc)
            await stream.end({**(meter.report() if meter else {}),
                              **end_error(502, "backend_failed",
                                          f"backend failed: {type(exc).__name__}")})
            return
        await stream.end(meter.report())

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
                # An answer that says when it is about to wait for its server (the lean
                # client's) lets this task hold its frames and write them itself then:
                # no wake-up of the tunnel's writer task per request or per token.
                chunks = response.chunks
                head = {"content-type": response.content_type}
                send: Callable[[bytes], Awaitable[None]]
                if isinstance(stream, InboundStream) and hasattr(chunks, "before_wait"):
                    chunks.before_wait = stream.flush_nowait
                    await stream.respond(response.status, head, hold=True)
                    send = partial(stream.send, hold=True)
                else:
                    await stream.respond(response.status, head)
                    send = stream.send
                first = True
                async for chunk in chunks:
                    out = meter.feed(chunk)
                    if out:
                        if first:
                            first = False
                            self._ttft_ms = 0.8 * self._ttft_ms + 0.2 * (
                                (clock.now() - started) * 1000)
                        await send(out)
                tail = meter.finish()
                if tail:
                    await send(tail)
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
