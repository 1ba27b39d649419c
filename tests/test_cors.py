"""CORS over real HTTP requests: off by default (other sites' pages refused, the
gateway's own served), preflights answered without auth, allowed origins' answers
(errors too) carrying the headers, other origins refused before anything runs,
``Vary`` and ``nosniff``, the admin API left out, SIGHUP switching it."""

from __future__ import annotations

import json
from typing import Any

import httpx
import msgspec
import pytest

from tests.conftest import Network
from tooti.gateway.app import Gateway
from tooti.gateway.cors import same_origin
from tooti.mesh.events import BusEvent
from tooti.settings import CorsSettings

APP = "https://app.example"
PREFLIGHT = {"origin": APP, "access-control-request-method": "POST",
             "access-control-request-headers": "authorization, content-type, x-stainless-os"}
CHAT = {"model": "tooti-sim", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2}


def with_cors(network: Network, *origins: str, auth: str = "") -> None:
    gateway = network.gateway
    changes: dict[str, Any] = {"cors": CorsSettings(allow_origins=list(origins), max_age=90)}
    if auth:
        changes["auth"] = auth
    gateway.reload(msgspec.structs.replace(gateway.settings, **changes))


class Events:
    """Counts the requests that reached the proxy (``request.received``)."""

    def __init__(self, gateway: Gateway) -> None:
        self.received = 0
        gateway.registry.bus.listeners.append(self._note)

    def _note(self, event: BusEvent) -> None:
        self.received += event.kind == "request.received"


def cors_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("access-control-")}


async def test_off_by_default(network: Network) -> None:
    """No ``allow_origins``: no CORS header ever, another site's page is refused (as
    Ollama refuses origins outside OLLAMA_ORIGINS), the gateway's own origin and clients
    without an ``Origin`` are served."""
    await network.add_node()
    events = Events(network.gateway)
    async with network.client() as http:
        preflight = await http.options("/v1/chat/completions", headers=PREFLIGHT)
        answer = await http.post("/v1/chat/completions", json=CHAT, headers={"origin": APP})
        own = await http.post("/v1/chat/completions", json=CHAT,
                              headers={"origin": network.url})
        proxied = await http.post("/v1/chat/completions", json=CHAT, headers={
            "origin": "https://gateway.example", "sec-fetch-site": "same-origin"})
        plain = await http.post("/v1/chat/completions", json=CHAT)
    assert preflight.status_code == 403 and not cors_headers(preflight)
    assert answer.status_code == 403 and not cors_headers(answer)
    assert answer.json()["error"]["code"] == "origin_not_allowed"
    for response in (own, proxied, plain):
        assert response.status_code == 200 and not cors_headers(response)
        assert "vary" not in response.headers
    assert events.received == 3  # the refused requests never reached the proxy


async def test_a_simple_request_from_a_disallowed_origin_never_runs(
        network: Network) -> None:
    """The reviewer's case: a page's ``text/plain`` POST to ``/api/chat`` (no preflight)
    is refused 403 before it reaches a node, CORS configured or not."""
    await network.add_node()
    events = Events(network.gateway)
    body = json.dumps({"model": "tooti-sim", "stream": False,
                       "messages": [{"role": "user", "content": "hi"}]})
    simple = {"origin": "https://evil.example", "content-type": "text/plain"}
    async with network.client() as http:
        closed = await http.post("/api/chat", content=body, headers=simple)
        with_cors(network, APP)
        listed = await http.post("/api/chat", content=body, headers=simple)
        allowed = await http.post("/api/chat", content=body,
                                  headers={**simple, "origin": APP})
    for refused in (closed, listed):
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["type"] == "permission_error"
    assert listed.headers["vary"] == "origin"
    assert allowed.status_code == 200 and allowed.json()["done"] is True
    assert events.received == 1


def test_same_origin() -> None:
    assert same_origin(b"http://127.0.0.1:8080", b"127.0.0.1:8080")
    assert same_origin(b"https://Gateway.Example", b"gateway.example:443")
    assert same_origin(b"http://gateway.example:80", b"gateway.example")
    assert not same_origin(b"http://gateway.example:8080", b"gateway.example")
    assert not same_origin(b"https://gateway.example.evil", b"gateway.example")
    assert not same_origin(b"null", b"gateway.example")
    assert not same_origin(b"http://gateway.example", None)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/models/some/model",
                                  "/api/chat"])
async def test_preflight_is_answered_without_auth(network: Network, path: str) -> None:
    with_cors(network, APP, auth="keys")  # every /v1 request needs a key now
    async with network.client() as http:
        preflight = await http.options(path, headers=PREFLIGHT)
        unauthorized = await http.get("/v1/models", headers={"origin": APP})
    assert preflight.status_code == 204, preflight.text
    assert preflight.content == b""
    assert cors_headers(preflight) == {
        "access-control-allow-origin": APP,
        "access-control-allow-methods": "GET, POST, OPTIONS",
        "access-control-allow-headers": "authorization, content-type, x-stainless-os",
        "access-control-max-age": "90",
    }
    assert preflight.headers["vary"] == "origin, access-control-request-headers"
    assert preflight.headers["x-request-id"]
    # The real request still needs its key; the refusal is readable by the page.
    assert unauthorized.status_code == 401
    assert unauthorized.headers["access-control-allow-origin"] == APP


async def test_allowed_origin_answers_carry_the_headers(network: Network) -> None:
    with_cors(network, "https://other.example", APP)
    await network.add_node()
    async with network.client() as http:
        answer = await http.post("/v1/chat/completions", json=CHAT, headers={"origin": APP})
        async with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True},
                               headers={"origin": APP}) as streamed:
            lines = [line async for line in streamed.aiter_lines() if line]
        missing = await http.get("/v1/models/nope", headers={"origin": APP})
        listed = await http.get("/v1/models", headers={"origin": APP})
    for response in (answer, streamed, missing, listed):
        assert response.headers["access-control-allow-origin"] == APP
        exposed = response.headers["access-control-expose-headers"]
        assert "x-request-id" in exposed and "x-ratelimit-remaining-requests" in exposed
        assert "request-id" in exposed.split(", ")
        assert response.headers["vary"] == "origin"
        assert response.headers["x-content-type-options"] == "nosniff"
    assert answer.status_code == 200 and lines[-1] == "data: [DONE]"
    assert missing.status_code == 404


async def test_disallowed_origin_is_refused_without_cors_headers(network: Network) -> None:
    with_cors(network, APP)
    async with network.client() as http:
        preflight = await http.options("/v1/chat/completions",
                                       headers={**PREFLIGHT, "origin": "https://evil.example"})
        answer = await http.get("/v1/models", headers={"origin": "https://evil.example"})
        no_origin = await http.get("/v1/models")
        admin = await http.options("/admin/v1/peers", headers=PREFLIGHT)
    for refused in (preflight, answer):
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "origin_not_allowed"
    for response in (preflight, answer, no_origin, admin):
        assert not cors_headers(response), response.headers
    # Listed origins: every API answer varies by Origin, one without too.
    for response in (preflight, answer, no_origin):
        assert response.headers["vary"] == "origin"
    assert "vary" not in admin.headers
    assert no_origin.status_code == 200


async def test_every_answer_is_nosniff(network: Network) -> None:
    """Pass-through answers (a node's media type) and every other answer of the gateway
    say ``X-Content-Type-Options: nosniff``, CORS configured or not."""
    await network.add_node()
    async with network.client() as http:
        answers = [
            await http.post("/v1/rerank", json={"model": "tooti-sim", "query": "q",
                                                "documents": ["a", "b"]}),
            await http.post("/v1/audio/speech", json={"model": "tooti-sim",
                                                      "input": "hi", "voice": "x"}),
            await http.get("/v1/models"), await http.get("/v1/models/nope"),
            await http.get("/api/tags"), await http.get("/healthz"),
            await http.get("/admin/v1/peers"), await http.get("/"),
        ]
    assert [r.status_code for r in answers[:3]] == [200, 200, 200]
    for response in answers:
        assert response.headers["x-content-type-options"] == "nosniff", response.url


async def test_any_origin(network: Network) -> None:
    with_cors(network, "*")
    async with network.client() as http:
        preflight = await http.options("/v1/embeddings", headers={
            "origin": "http://localhost:3000", "access-control-request-method": "POST"})
        answer = await http.get("/v1/models", headers={"origin": "http://localhost:3000"})
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "authorization" in preflight.headers["access-control-allow-headers"]
    assert preflight.headers["vary"] == "access-control-request-headers"
    assert answer.headers["access-control-allow-origin"] == "*"
    assert "vary" not in answer.headers


async def test_reload_turns_it_off(network: Network) -> None:
    with_cors(network, APP)
    with_cors(network)
    async with network.client() as http:
        answer = await http.get("/v1/models", headers={"origin": APP})
    assert answer.status_code == 403 and not cors_headers(answer)
