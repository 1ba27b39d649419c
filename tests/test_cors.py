"""CORS over real HTTP requests: off by default, preflights answered without auth,
allowed origins' answers (errors too) carrying the headers, others getting none, the
admin API left out, SIGHUP switching it."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec
import pytest

from tests.conftest import Network
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


def cors_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("access-control-")}


async def test_off_by_default(network: Network) -> None:
    assert network.gateway.station.cors is None
    await network.add_node()
    async with network.client() as http:
        preflight = await http.options("/v1/chat/completions", headers=PREFLIGHT)
        answer = await http.post("/v1/chat/completions", json=CHAT, headers={"origin": APP})
    assert preflight.status_code != 204 and not cors_headers(preflight)
    assert answer.status_code == 200 and not cors_headers(answer)


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
    assert preflight.headers["vary"] == "origin"
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
    assert answer.status_code == 200 and lines[-1] == "data: [DONE]"
    assert missing.status_code == 404


async def test_disallowed_origin_gets_no_cors_headers(network: Network) -> None:
    with_cors(network, APP)
    async with network.client() as http:
        preflight = await http.options("/v1/chat/completions",
                                       headers={**PREFLIGHT, "origin": "https://evil.example"})
        answer = await http.get("/v1/models", headers={"origin": "https://evil.example"})
        no_origin = await http.get("/v1/models")
        admin = await http.options("/admin/v1/peers", headers=PREFLIGHT)
    assert preflight.status_code == 403
    assert preflight.json()["error"]["code"] == "origin_not_allowed"
    for response in (preflight, answer, no_origin, admin):
        assert not cors_headers(response), response.headers
    assert answer.status_code == 200


async def test_any_origin(network: Network) -> None:
    with_cors(network, "*")
    async with network.client() as http:
        preflight = await http.options("/v1/embeddings", headers={
            "origin": "http://localhost:3000", "access-control-request-method": "POST"})
        answer = await http.get("/v1/models", headers={"origin": "http://localhost:3000"})
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "authorization" in preflight.headers["access-control-allow-headers"]
    assert answer.headers["access-control-allow-origin"] == "*"
    assert "vary" not in answer.headers


async def test_reload_turns_it_off(network: Network) -> None:
    with_cors(network, APP)
    with_cors(network)
    async with network.client() as http:
        answer = await http.get("/v1/models", headers={"origin": APP})
    assert network.gateway.station.cors is None
    assert not cors_headers(answer)
