"""The pass-through endpoints end to end over real sockets: the official ``openai``
client (or httpx) → gateway → WebSocket tunnel → node → simulated backend.

Rerank, transcription (a multipart upload streamed, not held), speech (binary audio
streamed back), images, and native responses through the seam the translated route
uses; routing by the endpoints each node announces, refusals, and a node older than
the ``endpoints`` member."""

from __future__ import annotations

import hashlib
import io
import logging
import struct
import time
import tracemalloc
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgspec
import openai
import pytest
import trio

from tests import test_relay
from tests.backend_fixtures import answer_lifespan, serve_asgi
from tests.conftest import Network
from tests.log_capture import watching
from tests.processes import open_cluster
from tests.test_relay import RunningRelay, start_node, until
from tooti.backends.base import BackendError, BackendResponse, ModelInfo
from tooti.backends.ollama import OllamaBackend
from tooti.backends.openai import OpenAIBackend
from tooti.backends.simulated import SimulatedBackend
from tooti.backends.simulated_passthrough import AUDIO_MAGIC, TINY_PNG_B64
from tooti.gateway.access_log import AccessRecord
from tooti.gateway.passthrough import forward_native, serves_natively
from tooti.gateway.relayed_answer import media_type
from tooti.mesh.events import BusEvent
from tooti.mesh.http import read_body
from tooti.protocol.errors import ProtocolError
from tooti.protocol.multipart import FormFields
from tooti.protocol.schemas import ALL_ENDPOINTS, ENDPOINTS, ModelEntry, model_entries
from tooti.settings import BackendSettings

MODEL = "tooti-sim"


def sim(endpoints: list[str] | None = None, **options: Any) -> SimulatedBackend:
    """A simulated backend announcing ``endpoints`` (None: all of them)."""
    return SimulatedBackend(BackendSettings(type="simulated", endpoints=endpoints or [],
                                            options=options))


def client_for(network: Network) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=network.url + "/v1", api_key="unused",
                              max_retries=0)


def wav_bytes(frames: int = 800) -> bytes:
    """A short mono 8 kHz WAV (a ramp), made here."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"".join(struct.pack("<h", (i * 37) % 30000) for i in range(frames)))
    return out.getvalue()


RERANK = {"model": MODEL, "query": "which is a fruit?",
          "documents": ["a carrot", "an apple", "a stone"], "top_n": 2}


async def test_rerank_goes_only_to_nodes_that_announce_it(network: Network) -> None:
    await network.add_node([sim(list(ENDPOINTS))], node_id="chat-only")
    await network.add_node([sim(["chat/completions", "rerank"], fail_rate=1.0,
                                fail_status=503)], node_id="rerank-broken")
    await network.add_node([sim(["rerank"])], node_id="rerank-ok")
    served_by = set()
    async with network.client() as http:
        for _ in range(6):
            response = await http.post("/v1/rerank", json=RERANK)
            assert response.status_code == 200, response.text
            served_by.add(response.headers["x-tooti-node"])
            body = response.json()
            assert [r["index"] for r in body["results"]] and len(body["results"]) == 2
            scores = [r["relevance_score"] for r in body["results"]]
            assert scores == sorted(scores, reverse=True)
            assert body["usage"]["prompt_tokens"] > 0
    # failover stayed among the nodes announcing rerank: the broken one failed over to
    # the good one, the chat-only node was never asked
    assert served_by == {"rerank-ok"}
    routed = network.gateway.registry.peers
    assert routed["chat-only"].models[MODEL].endpoints == ENDPOINTS


async def test_endpoint_not_served_is_404_naming_model_and_endpoint(network: Network
                                                                  ) -> None:
    await network.add_node([sim(list(ENDPOINTS))])
    async with network.client() as http:
        refused = await http.post("/v1/rerank", json=RERANK)
        speech = await http.post("/v1/audio/speech",
                                 json={"model": MODEL, "input": "hi", "voice": "alloy"})
        unknown = await http.post("/v1/rerank", json={**RERANK, "model": "nope"})
        chat = await http.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2})
    assert refused.status_code == 404 and speech.status_code == 404
    error = refused.json()["error"]
    assert error["code"] == "endpoint_not_served"
    assert MODEL in error["message"] and "/v1/rerank" in error["message"]
    assert "/v1/audio/speech" in speech.json()["error"]["message"]
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert chat.status_code == 200


async def test_transcription_upload_reaches_the_backend_byte_for_byte(network: Network
                                                                      ) -> None:
    await network.add_node([sim(list(ENDPOINTS))], node_id="no-audio")
    await network.add_node([sim()], node_id="audio")
    audio = wav_bytes()
    result = await client_for(network).audio.transcriptions.create(
        model=MODEL, file=("clip.wav", audio, "audio/wav"))
    assert result.text == (f"simulated transcription of clip.wav: {len(audio)} bytes, "
                           f"sha256 {hashlib.sha256(audio).hexdigest()}")


async def test_speech_streams_binary_audio_with_its_content_type(network: Network) -> None:
    await network.add_node([sim()])
    client = client_for(network)
    async with client.audio.speech.with_streaming_response.create(
            model=MODEL, voice="alloy", input="hello from tooti",
            response_format="wav") as response:
        assert response.headers["content-type"] == "audio/wav"
        pieces = [piece async for piece in response.iter_bytes()]
    audio = b"".join(pieces)
    assert audio == AUDIO_MAGIC + b"hello from tooti"


async def test_images_generate_with_usage(network: Network) -> None:
    await network.add_node([sim()])
    images = await client_for(network).images.generate(model=MODEL, prompt="a red dot",
                                                       n=2)
    assert images.data is not None and len(images.data) == 2
    assert images.data[0].b64_json == TINY_PNG_B64
    assert images.usage is not None and images.usage.input_tokens == 3


async def test_usage_of_passthrough_answers_is_recorded(network: Network) -> None:
    await network.add_node([sim()])
    finished: list[dict[str, Any]] = []
    both = trio.Event()

    def listen(event: BusEvent) -> None:
        if event.kind == "request.finished":
            finished.append(event.data)
            if len(finished) == 2:
                both.set()

    network.gateway.registry.bus.listeners.append(listen)
    async with network.client() as http:
        assert (await http.post("/v1/rerank", json=RERANK)).status_code == 200
        speech = await http.post("/v1/audio/speech",
                                 json={"model": MODEL, "input": "x", "voice": "alloy"})
        assert speech.status_code == 200
    with trio.fail_after(5):
        await both.wait()
    rerank, audio = finished
    assert rerank["status"] == "ok" and rerank["prompt_tokens"] == 10
    assert rerank["completion_tokens"] == 0 and rerank["estimated"] is False
    # no usage in an audio answer: recorded with zero tokens, not an estimate
    assert audio["status"] == "ok" and audio["node"] == "node-a"
    assert (audio["prompt_tokens"], audio["completion_tokens"]) == (0, 0)
    assert audio["estimated"] is False


async def _form(boundary: bytes, size: int, digest: Any) -> AsyncIterator[bytes]:
    """A multipart form with ``model`` first and a ``size``-byte file, generated piece
    by piece (``digest`` sees the file's bytes)."""
    yield (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
           + MODEL.encode() + b"\r\n--" + boundary
           + b'\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n'
           b"Content-Type: audio/wav\r\n\r\n")
    piece = bytes(range(256)) * 256  # 64 KiB
    sent = 0
    while sent < size:
        chunk = piece[:size - sent]
        digest.update(chunk)
        sent += len(chunk)
        yield chunk
    yield b"\r\n--" + boundary + b"--\r\n"


async def test_20_mib_upload_streams_through_without_being_held(network: Network) -> None:
    size = 20 * 1024 * 1024
    await network.add_node([sim()])
    boundary = b"tooti-test-boundary"
    head = len(b"".join([piece async for piece in _form(boundary, 0, hashlib.sha256())]))
    digest = hashlib.sha256()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        async with network.client() as http:
            response = await http.post(
                "/v1/audio/transcriptions", content=_form(boundary, size, digest),
                headers={"content-type": "multipart/form-data; boundary=tooti-test-boundary",
                         "content-length": str(head + size)})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 200, response.text
    simulated = response.json()["x_tooti_simulated"]
    assert simulated["file_bytes"] == size and simulated["sha256"] == digest.hexdigest()
    # gateway, node, backend and this client share the process: together they never
    # held more than a few MiB of the 20 MiB upload at once
    assert peak < 8 * 1024 * 1024, f"peak traced memory {peak / 2**20:.1f} MiB"


async def test_upload_limits_and_form_checks(network: Network) -> None:
    await network.add_node([sim()])
    network.gateway.settings.max_upload_bytes = 1000
    async with network.client() as http:
        too_big = await http.post("/v1/audio/transcriptions", files={
            "file": ("a.wav", b"x" * 2000)}, data={"model": MODEL})
        no_model = await http.post("/v1/audio/transcriptions",
                                   files={"file": ("a.wav", b"x" * 10)})
        not_form = await http.post("/v1/audio/transcriptions", json={"model": MODEL})
        chunked = await http.post(  # no content-length: counted as it streams
            "/v1/audio/transcriptions", content=_form(b"b", 5000, hashlib.sha256()),
            headers={"content-type": "multipart/form-data; boundary=b"})
    assert too_big.status_code == 413
    assert chunked.status_code == 413, chunked.text
    assert chunked.json()["error"]["code"] == "request_too_large"
    assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"
    assert not_form.status_code == 400


async def test_node_older_than_endpoints_serves_the_usual_three(
        network: Network, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = ModelInfo.to_wire

    def old_wire(self: ModelInfo) -> dict[str, Any]:
        wire = plain(self)
        del wire["endpoints"]  # what a node before the pass-through endpoints sends
        return wire

    monkeypatch.setattr(ModelInfo, "to_wire", old_wire)
    await network.add_node([sim()])  # would announce every endpoint, sends none
    assert network.gateway.registry.peers["node-a"].models[MODEL].endpoints == ENDPOINTS
    async with network.client() as http:
        chat = await http.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2})
        rerank = await http.post("/v1/rerank", json=RERANK)
    assert chat.status_code == 200
    assert rerank.status_code == 404
    assert rerank.json()["error"]["code"] == "endpoint_not_served"


def test_endpoint_names_from_a_peer_are_typed_and_bounded() -> None:
    entry = msgspec.convert({"id": "m"}, ModelEntry)
    assert entry.endpoints == list(ENDPOINTS)
    assert msgspec.convert({"id": "m", "endpoints": []}, ModelEntry).endpoints == list(
        ENDPOINTS)
    # a newer node's endpoint is dropped, not refused; the known ones stay
    newer = msgspec.convert({"id": "m", "endpoints": ["rerank", "video/generations"]},
                            ModelEntry)
    assert newer.endpoints == ["rerank"]
    assert set(ALL_ENDPOINTS) >= set(newer.endpoints)
    for bad in (["x"] * 17, ["a" * 65], [5], ["bad\nname"], "rerank"):
        with pytest.raises(ProtocolError):
            model_entries([{"id": "m", "endpoints": bad}], 8)


async def test_native_responses_seam(network: Network) -> None:
    await network.add_node([sim(list(ENDPOINTS))], node_id="translated-only")
    gateway = network.gateway
    caller = await gateway.auth.identify({"type": "http", "headers": [],
                                          "client": ("127.0.0.1", 1)})
    assert not serves_natively(gateway, caller, MODEL)
    await network.add_node([sim(["chat/completions", "responses"])], node_id="native")
    assert serves_natively(gateway, caller, MODEL)
    assert not serves_natively(gateway, caller, "nope")


async def test_native_responses_forwarded_raw_through_the_seam(network: Network) -> None:
    """What the translated /v1/responses route does when a node serves it natively:
    the raw body goes to that node untouched and its answer comes back as it is."""
    gateway = network.gateway

    async def route(scope: Any, receive: Any, send: Any, request_id: str,
                    headers: Any) -> None:
        caller = await gateway.auth.identify(scope)
        raw = await read_body(scope, receive, 1 << 20)
        await forward_native(gateway, scope, receive, send, request_id, headers, caller,
                             raw)

    gateway.station.mount("/test-native/", route)
    await network.add_node([sim(list(ENDPOINTS))], node_id="translated-only")
    await network.add_node([sim(["responses"])], node_id="native")
    async with network.client() as http:
        for _ in range(4):
            answer = await http.post("/test-native/responses", json={
                "model": MODEL, "input": "say hi", "instructions": "be brief"})
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-tooti-node"] == "native"
            body = answer.json()
            assert body["object"] == "response" and body["status"] == "completed"
            assert body["usage"]["input_tokens"] == 4


class RecordingServer:
    """An OpenAI-compatible server serving only the pass-through routes: it hashes each
    request body as it streams in (never keeping it) and answers like a real server."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[str, int, str]] = {}
        """Path → (content type, body size, body SHA-256)."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        digest, size, more = hashlib.sha256(), 0, True
        while more:
            message = await receive()
            digest.update(message.get("body", b""))
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        kind = dict(scope["headers"]).get(b"content-type", b"").decode()
        self.seen[scope["path"]] = (kind, size, digest.hexdigest())
        if scope["path"] == "/v1/audio/speech":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"audio/mpeg")]})
            for piece in (b"ID3", b"\x00\x01" * 1000, b"end"):
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        answers = {
            "/v1/audio/transcriptions": {"text": "hello"},
            "/v1/rerank": {"results": [{"index": 0, "relevance_score": 0.9}],
                           "usage": {"prompt_tokens": 7, "total_tokens": 7}},
            "/v1/models": {"object": "list", "data": [{"id": "remote", "object": "model"}]},
        }
        body = msgspec.json.encode(answers.get(scope["path"], {"error": "no"}))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


async def test_openai_backend_passes_uploads_and_audio_through_byte_for_byte(
        network: Network, nursery: trio.Nursery) -> None:
    server = RecordingServer()
    url = await serve_asgi(nursery, server)
    backend = OpenAIBackend(BackendSettings(
        type="openai", url=url + "/v1", models=["remote"],
        endpoints=["rerank", "audio/transcriptions", "audio/speech"]))
    await network.add_node([backend])
    assert set(network.gateway.registry.peers["node-a"].models["remote"].endpoints) == {
        "rerank", "audio/transcriptions", "audio/speech"}
    client = client_for(network)
    audio = wav_bytes(4000)
    text = await client.audio.transcriptions.create(model="remote",
                                                    file=("a.wav", audio, "audio/wav"))
    assert text.text == "hello"
    kind, size, _ = server.seen["/v1/audio/transcriptions"]
    assert kind.startswith("multipart/form-data; boundary=") and size > len(audio)
    async with client.audio.speech.with_streaming_response.create(
            model="remote", voice="alloy", input="hi") as speech:
        assert speech.headers["content-type"] == "audio/mpeg"
        got = b"".join([piece async for piece in speech.iter_bytes()])
    assert got == b"ID3" + b"\x00\x01" * 1000 + b"end"
    async with network.client() as http:
        raw = msgspec.json.encode({"model": "remote", "query": "q", "documents": ["d"]})
        rerank = await http.post("/v1/rerank", content=raw,
                                 headers={"content-type": "application/json"})
        chat = await http.post("/v1/chat/completions", json={
            "model": "remote", "messages": [{"role": "user", "content": "x"}]})
    assert rerank.status_code == 200 and rerank.json()["usage"]["prompt_tokens"] == 7
    # the body reached the server byte for byte
    assert server.seen["/v1/rerank"][1:] == (len(raw), hashlib.sha256(raw).hexdigest())
    # this server was configured without chat: the gateway does not route chat to it
    assert chat.status_code == 404 and "/v1/chat/completions" not in server.seen


def test_backends_refuse_endpoints_they_cannot_serve() -> None:
    with pytest.raises(ValueError, match="unknown endpoints"):
        OpenAIBackend(BackendSettings(type="openai", url="http://x/v1",
                                      endpoints=["video/generations"]))
    with pytest.raises(ValueError, match="cannot serve"):
        OllamaBackend(BackendSettings(type="ollama", url="http://x",
                                      endpoints=["rerank"]))
    embed_only = OllamaBackend(BackendSettings(type="ollama", url="http://x",
                                               endpoints=["embeddings"]))
    assert embed_only.endpoints == ("embeddings",)
    assert OpenAIBackend(BackendSettings(type="openai", url="http://x/v1")).endpoints == (
        ENDPOINTS)


async def test_chat_endpoints_route_by_endpoint_too(network: Network) -> None:
    await network.add_node([sim(["embeddings"])], node_id="embed-only")
    await network.add_node([sim(["chat/completions"])], node_id="chat-only")
    async with network.client() as http:
        for _ in range(4):
            chat = await http.post("/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2})
            assert chat.headers["x-tooti-node"] == "chat-only"
            embed = await http.post("/v1/embeddings", json={"model": MODEL, "input": "x"})
            assert embed.headers["x-tooti-node"] == "embed-only"
        completions = await http.post("/v1/completions", json={"model": MODEL,
                                                               "prompt": "x"})
    assert completions.status_code == 404
    assert completions.json()["error"]["code"] == "endpoint_not_served"


class WatchedUploads(SimulatedBackend):
    """The simulated backend, telling when an upload reached it and when its call ended
    (normally or cancelled)."""

    def __init__(self) -> None:
        super().__init__(BackendSettings(type="simulated"))
        self.started, self.ended = trio.Event(), trio.Event()

    def open_upload(self, endpoint: str, upload: Any) -> Any:
        inner = super().open_upload

        @asynccontextmanager
        async def watched() -> AsyncIterator[Any]:
            source = upload.chunks

            async def chunks() -> AsyncIterator[bytes]:
                async for chunk in source:
                    self.started.set()
                    yield chunk

            upload.chunks = chunks()
            try:
                async with inner(endpoint, upload) as response:
                    yield response
            finally:
                self.ended.set()

        return watched()


async def test_client_leaving_mid_upload_cancels_the_backend_call(network: Network) -> None:
    backend = WatchedUploads()
    node = await network.add_node([backend])
    finished = Finished(network)
    never = trio.Event()

    async def half_a_form() -> AsyncIterator[bytes]:
        async for piece in _form(b"b", 1 << 20, hashlib.sha256()):
            yield piece
            if len(piece) == 65536:
                break
        await never.wait()  # the rest never comes: the client gives up

    async with network.client() as http, trio.open_nursery() as inner:
        inner.start_soon(lambda: http.post(
            "/v1/audio/transcriptions", content=half_a_form(),
            headers={"content-type": "multipart/form-data; boundary=b"}))
        with trio.fail_after(10):
            await backend.started.wait()
        inner.cancel_scope.cancel()
    with trio.fail_after(5):
        await backend.ended.wait()
        await node.wait_idle()
    registry = network.gateway.registry
    with trio.fail_after(5):
        await registry.wait_until(lambda: registry.peers["node-a"].total_in_flight() == 0)
    seen = await finished.wait(1)
    # recorded as cancelled, with no node having served it: nothing to bill
    assert seen[0]["status"] == "cancelled" and seen[0]["node"] is None
    assert seen[0]["completion_tokens"] == 0


relay = test_relay.relay
"""The relay tests' fixture: a relay in front of the network's gateway, connected upstream."""


async def test_upload_and_speech_through_a_relay(network: Network, relay: RunningRelay
                                                 ) -> None:
    await start_node(network, "behind", [relay.tunnel_url], [sim()])
    await until(network.gateway.registry,
                lambda: bool(network.gateway.registry.serving_endpoint(
                    MODEL, "audio/transcriptions", "")))
    audio = wav_bytes(200_000)  # 400 KB: many DATA frames through two hops
    client = client_for(network)
    result = await client.audio.transcriptions.create(model=MODEL,
                                                      file=("r.wav", audio, "audio/wav"))
    assert f"{len(audio)} bytes, sha256 {hashlib.sha256(audio).hexdigest()}" in result.text
    speech = await client.audio.speech.create(model=MODEL, voice="alloy", input="relayed")
    assert speech.content == AUDIO_MAGIC + b"relayed"


async def test_bad_passthrough_bodies_are_400(network: Network) -> None:
    await network.add_node([sim()])
    deep = b'{"model": "tooti-sim", "query": "q", "documents": ' + b"[" * 200 + b"]" * 200 + b"}"
    async with network.client() as http:
        answers = [await http.post("/v1/rerank", content=body,
                                   headers={"content-type": "application/json"})
                   for body in (b"{not json", b"[1]", b'{"query": "q"}',
                                b'{"model": "a\\nb"}', deep)]
        get = await http.get("/v1/rerank")
    assert [a.status_code for a in answers] == [400] * 5
    assert answers[-1].json()["error"]["code"] == "invalid_json"
    assert get.status_code == 405


def peak_rss(pid: int) -> int:
    """A process's peak resident set (``VmHWM``), in bytes."""
    for line in open(f"/proc/{pid}/status").read().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def test_20_mib_upload_grows_neither_process_rss(tmp_path: Any) -> None:
    """A gateway and a node in processes of their own: a 20 MiB upload through them
    raises neither one's peak RSS by more than a few MiB."""
    size = 20 * 1024 * 1024
    async with open_cluster(tmp_path) as cluster:
        gateway = await cluster.start_gateway()
        node = await cluster.start_node("n1")
        boundary = b"rss-boundary"
        headers = {"content-type": "multipart/form-data; boundary=rss-boundary"}
        async with httpx.AsyncClient(base_url=cluster.url, timeout=60) as http:
            warm = await http.post("/v1/audio/transcriptions", headers=headers,
                                   content=_form(boundary, 1 << 20, hashlib.sha256()))
            assert warm.status_code == 200, warm.text
            before = peak_rss(gateway.pid), peak_rss(node.pid)
            digest = hashlib.sha256()
            big = await http.post("/v1/audio/transcriptions", headers=headers,
                                  content=_form(boundary, size, digest))
        after = peak_rss(gateway.pid), peak_rss(node.pid)
    assert big.status_code == 200, big.text
    assert big.json()["x_tooti_simulated"]["sha256"] == digest.hexdigest()
    growth = [(a - b) / 2**20 for a, b in zip(after, before, strict=True)]
    print(f"peak RSS growth for a 20 MiB upload: gateway {growth[0]:.1f} MiB, "
          f"node {growth[1]:.1f} MiB")
    assert max(growth) < 6, growth


class BrokenSpeech(SimulatedBackend):
    """Speech that breaks after its first bytes, as a lost upstream would."""

    def __init__(self) -> None:
        super().__init__(BackendSettings(type="simulated"))

    @asynccontextmanager
    async def open(self, endpoint: str, body: bytes, request: dict[str, Any]
                   ) -> AsyncIterator[BackendResponse]:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"RIFF" + b"\x00" * 70_000  # more than one piece: some reaches the client
            yield b"more"
            raise BackendError("upstream lost", code="backend_stream_error")

        yield BackendResponse(200, "audio/wav", chunks())


async def test_speech_broken_mid_answer_is_cut_not_completed(network: Network) -> None:
    await network.add_node([BrokenSpeech()])
    finished = trio.Event()
    seen: dict[str, Any] = {}

    def listen(event: BusEvent) -> None:
        if event.kind == "request.finished":
            seen.update(event.data)
            finished.set()

    network.gateway.registry.bus.listeners.append(listen)
    got = b""
    async with network.client() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            async with http.stream("POST", "/v1/audio/speech", json={
                    "model": MODEL, "input": "x", "voice": "alloy"}) as response:
                assert response.status_code == 200
                async for piece in response.aiter_bytes():
                    got += piece
    with trio.fail_after(5):
        await finished.wait()
    assert not got.endswith(b"more")  # the held last piece never left
    assert seen["status"] == "failed_midstream"


# -- the one proxy path: aliases, preferences, bounds, uploads (review of issue 15) ----

def form(*parts: tuple[str, bytes, str | None], boundary: bytes = b"b") -> bytes:
    """A multipart form of ``(name, value, filename)`` parts, in order."""
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename else "")
        out += (b"--" + boundary + b"\r\nContent-Disposition: " + disposition.encode()
                + b"\r\n\r\n" + value + b"\r\n")
    return out + b"--" + boundary + b"--\r\n"


FORM_TYPE = {"content-type": "multipart/form-data; boundary=b"}


class Finished:
    """The ``request.finished`` events a gateway publishes from now on."""

    def __init__(self, network: Network) -> None:
        self.seen: list[dict[str, Any]] = []
        self._changed = trio.Event()
        network.gateway.registry.bus.listeners.append(self._listen)

    def _listen(self, event: BusEvent) -> None:
        if event.kind == "request.finished":
            self.seen.append(event.data)
            self._changed.set()
            self._changed = trio.Event()

    async def wait(self, count: int) -> list[dict[str, Any]]:
        """The events, once ``count`` have come."""
        with trio.fail_after(10):
            while len(self.seen) < count:
                await self._changed.wait()
        return self.seen


async def test_aliases_reach_passthrough_endpoints(network: Network) -> None:
    gateway = network.gateway
    gateway.reload(msgspec.structs.replace(gateway.settings, aliases={
        "ranker": MODEL, "whisper-1": MODEL, "tts-1": MODEL}))
    await network.add_node([sim()])
    async with network.client() as http:
        rerank = await http.post("/v1/rerank", json={**RERANK, "model": "ranker"})
        speech = await http.post("/v1/audio/speech",
                                 json={"model": "tts-1", "input": "hi", "voice": "alloy"})
        audio = wav_bytes(100)
        text = await http.post("/v1/audio/transcriptions", headers=FORM_TYPE, content=form(
            ("model", b"whisper-1", None), ("file", audio, "a.wav")))
    for answer in (rerank, speech, text):
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-tooti-model"] == MODEL
    assert speech.content == AUDIO_MAGIC + b"hi"
    # the node got its own id in the form's model field (the simulated backend refuses
    # a model it does not serve), and the file byte for byte
    assert hashlib.sha256(audio).hexdigest() in text.json()["text"]


async def test_passthrough_honours_provider_preferences_and_fallbacks(network: Network
                                                                      ) -> None:
    await network.add_node([sim()], node_id="n1")
    await network.add_node([sim()], node_id="n2")
    async with network.client() as http:
        for target in ("n1", "n2", "n1", "n2"):
            answer = await http.post("/v1/rerank",
                                     json={**RERANK, "provider": {"only": [target]}})
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-tooti-node"] == target
        fallback = await http.post("/v1/rerank", json={**RERANK, "model": "not-here",
                                                       "models": [MODEL]})
    assert fallback.status_code == 200, fallback.text
    assert fallback.headers["x-tooti-model"] == MODEL


async def test_native_responses_for_an_alias_goes_native(network: Network) -> None:
    gateway = network.gateway
    gateway.reload(msgspec.structs.replace(gateway.settings, aliases={"gpt-x": [MODEL]}))
    await network.add_node([sim()], node_id="native")
    caller = await gateway.auth.identify({"type": "http", "headers": [], "path": "/v1/x",
                                          "method": "POST"})
    assert serves_natively(gateway, caller, "gpt-x")
    assert not serves_natively(gateway, caller, "nothing-of-that-name")


async def test_alias_tier_never_picks_a_node_lacking_the_endpoint(network: Network) -> None:
    gateway = network.gateway
    gateway.reload(msgspec.structs.replace(gateway.settings, aliases={"pair": ["a", "b"]}))
    for node_id, endpoint, model in (("chat-a", "chat/completions", "a"),
                                     ("embed-b", "embeddings", "b")):
        await network.add_node([SimulatedBackend(BackendSettings(
            type="simulated", models=[model], endpoints=[endpoint]))], node_id=node_id)
    async with network.client() as http:
        for _ in range(3):
            answer = await http.post("/v1/embeddings", json={"model": "pair", "input": "x"})
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-tooti-node"] == "embed-b"
    # the chat-only node was never asked, so never counted as failing
    assert gateway.registry.peers["chat-a"].failures == 0


class BigUsage(SimulatedBackend):
    """Answers a transcription with a usage far beyond what its upload could cost."""

    def open_upload(self, endpoint: str, upload: Any) -> Any:
        @asynccontextmanager
        async def answer() -> AsyncIterator[BackendResponse]:
            async for _ in upload.chunks:
                pass

            async def body() -> AsyncIterator[bytes]:
                yield msgspec.json.encode({"text": "x", "usage": {
                    "input_tokens": 5_000_000, "output_tokens": 0}})

            yield BackendResponse(200, "application/json", body())

        return answer()


async def test_upload_without_length_is_estimated_small_and_billed_by_its_size(
        network: Network, monkeypatch: pytest.MonkeyPatch) -> None:
    await network.add_node([BigUsage(BackendSettings(type="simulated"))])
    gateway = network.gateway
    estimates: list[int] = []
    admit = gateway.limiter.admit

    async def spy(caller: Any, request_id: str, **kw: Any) -> Any:
        estimates.append(kw["tokens_estimate"])
        return await admit(caller, request_id, **kw)

    monkeypatch.setattr(gateway.limiter, "admit", spy)
    finished = Finished(network)
    body = form(("model", MODEL.encode(), None), ("file", b"x" * 1000, "a.wav"))

    async def chunked() -> AsyncIterator[bytes]:  # no content-length
        yield body

    async with network.client() as http:
        answer = await http.post("/v1/audio/transcriptions", headers=FORM_TYPE,
                                 content=chunked())
    assert answer.status_code == 200, answer.text
    assert estimates == [len(body) // 4]  # not max_upload_bytes // 4
    seen = await finished.wait(1)
    allowance = gateway.settings.prompt_token_allowance
    assert seen[0]["prompt_tokens"] <= len(body) + allowance  # not 5 million


async def test_duplicate_model_field_is_refused(network: Network) -> None:
    await network.add_node([sim()])
    async with network.client() as http:
        after_file = await http.post("/v1/audio/transcriptions", headers=FORM_TYPE,
                                     content=form(("model", MODEL.encode(), None),
                                                  ("file", wav_bytes(50), "a.wav"),
                                                  ("model", b"dearer-model", None)))
        twice = await http.post("/v1/audio/transcriptions", headers=FORM_TYPE,
                                content=form(("model", MODEL.encode(), None),
                                             ("model", b"other", None),
                                             ("file", b"x", "a.wav")))
    for answer in (after_file, twice):
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["param"] == "model" and "more than one 'model'" in error["message"]


async def raw_request(network: Network, head: bytes) -> trio.SocketStream:
    """A raw connection to the gateway, with ``head`` sent."""
    host, port = network.url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(head)
    return stream


def upload_head(length: int) -> bytes:
    return (b"POST /v1/audio/transcriptions HTTP/1.1\r\nhost: x\r\n"
            b"content-type: multipart/form-data; boundary=b\r\n"
            b"content-length: " + str(length).encode() + b"\r\n\r\n")


async def test_client_leaving_during_read_ahead_is_logged_cancelled(network: Network
                                                                    ) -> None:
    await network.add_node([sim()])
    with watching("tooti.access", logging.INFO) as access:
        stream = await raw_request(network, upload_head(10_000)
                                   + b'--b\r\nContent-Disposition: form-data; name="mo')
        await stream.aclose()  # mid read-ahead
        await access.wait_count(1)
    entry = access.records[0].msg
    assert isinstance(entry, AccessRecord)
    fields = entry.log_fields()
    assert (fields["status"], fields["outcome"]) == (499, "cancelled")


async def read_status(stream: trio.SocketStream) -> bytes:
    """The status line of the answer on ``stream``."""
    data = b""
    with trio.fail_after(10):  # a hang guard: the answer comes within body_timeout
        while b"\r\n" not in data:
            piece = await stream.receive_some()
            assert piece, data
            data += piece
    return data.split(b"\r\n", 1)[0]


async def test_slow_uploads_time_out_before_and_after_the_read_ahead(network: Network
                                                                      ) -> None:
    backend = WatchedUploads()
    await network.add_node([backend])
    network.gateway.settings.body_timeout = 0.5
    stalled_in_prefix = await raw_request(network, upload_head(10_000) + b"--b\r\n")
    start = form(("model", MODEL.encode(), None), ("file", b"x" * 100, "a.wav"))[:-10]
    trickled = await raw_request(network, upload_head(10_000) + start)
    with trio.fail_after(10):
        await backend.started.wait()  # past the read-ahead: a node took the upload
    assert (await read_status(stalled_in_prefix)).startswith(b"HTTP/1.1 408")
    assert (await read_status(trickled)).startswith(b"HTTP/1.1 408")
    with trio.fail_after(5):
        await backend.ended.wait()  # the node's call was stopped
    for stream in (stalled_in_prefix, trickled):
        await stream.aclose()


def test_form_fields_scan_each_byte_once() -> None:
    """A 1 MiB form prefix fed 16 bytes at a time: the old rescan of everything read
    took about 18 s here; scanning from where the last search stopped takes well under
    one."""
    prefix = form(("note", b"y" * (1 << 20), None), ("model", MODEL.encode(), None))
    fields = FormFields(b"b")
    started = time.perf_counter()
    for at in range(0, len(prefix), 16):
        fields.feed(prefix[at:at + 16])
    assert fields.value == MODEL
    assert time.perf_counter() - started < 5


async def test_passthrough_answer_bounded_by_max_response_bytes(network: Network) -> None:
    await network.add_node([sim()])
    network.gateway.settings.max_response_bytes = 1000
    network.gateway.proxy_settings.max_response_bytes = 1000
    finished = Finished(network)
    async with network.client() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.post("/v1/audio/speech", json={
                "model": MODEL, "input": "z" * 5000, "voice": "alloy"})
    seen = await finished.wait(1)
    assert seen[0]["status"] == "failed_midstream"


def test_binary_media_types_keep_safe_parameters() -> None:
    assert media_type({"content-type": "audio/pcm; rate=24000; channels=1"}) == (
        b"audio/pcm; rate=24000; channels=1")
    assert media_type({"content-type": "audio/pcm; rate=<script>; x=1"}) == b"audio/pcm"
    assert media_type({"content-type": "image/svg+xml"}).startswith(b"text/plain")
