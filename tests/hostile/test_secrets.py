"""No secret leaves the gateway: join tokens, the admin key and client API keys are
absent from every log line (at DEBUG), every admin answer, the metrics, the event
stream, the WELCOME a node receives and every file in the data dir, after a run that
exercises joins, refusals, a protocol violation, served requests and the admin API."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import simulated
from tests.hostile.ledgered import start_ledgered
from tests.hostile.peers import hostile_peer
from tooti.mesh.identity_store import IdentityStore
from tooti.node.node import Node
from tooti.settings import NodeSettings

TOKEN = "jt-default-5e1f0a9b7c"
ROTATED = "jt-spring-8d2c4b6a1e"
ADMIN = "adm-key-3b9e7f1c2d"
API_KEY = "sk-client-0c4a8e2f6b"
SECRETS = (TOKEN, ROTATED, ADMIN, API_KEY)
CHAT = {"model": "tooti-sim", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4}


async def test_no_secret_in_logs_admin_metrics_events_welcome_or_files(
        nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    data_dir = tmp_path / "data"
    network = await start_ledgered(nursery, data_dir, join_token=TOKEN,
                                   join_tokens={"spring": ROTATED}, admin_key=ADMIN)
    network.gateway.registry.identity_store = IdentityStore(data_dir / "identities.sqlite3")
    seen: list[bytes] = []

    # A node joins with the rotated token; another with a chosen name (bound on disk).
    node = Node(NodeSettings(peers=[network.tunnel_url], id="named-node",
                             join_token=ROTATED), network.tunnel, [simulated()], "named-node")
    nursery.start_soon(node.run)
    await network.wait_for_node("named-node")

    # Refused: a wrong token; a violation: a hostile node with a right token.
    async with hostile_peer(network.tunnel_url, token=TOKEN) as peer:
        seen.append(repr(peer.welcome).encode())
        await peer.models([{"id": "m", "price": {"input": -1}}])
        with trio.fail_after(5):
            assert await peer.goaway() is not None
    async with httpx.AsyncClient(timeout=10) as http:
        wrong = await http.get(network.url + "/tooti/v1/tunnel", headers={
            "connection": "upgrade", "upgrade": "websocket", "sec-websocket-version": "13",
            "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
            "sec-websocket-protocol": "tooti.v1", "authorization": f"Bearer {TOKEN}x"})
        assert wrong.status_code == 403
        seen.append(wrong.content)

    admin = {"authorization": f"Bearer {ADMIN}"}
    async with network.client(headers={"authorization": f"Bearer {API_KEY}"}) as http:
        for stream in (False, True):
            answer = await http.post("/v1/chat/completions", json={**CHAT, "stream": stream})
            assert answer.status_code == 200
            seen.append(answer.content)
        refused = await http.get("/admin/v1/peers")  # a client key is not the admin key
        assert refused.status_code == 401
        seen.append(refused.content)
        for path in ("/admin/v1/peers", "/admin/v1/network", "/admin/v1/requests",
                     "/admin/v1/identities", "/metrics", "/v1/models", "/healthz"):
            answer = await http.get(path, headers=admin)
            assert answer.status_code == 200, (path, answer.text)
            seen.append(answer.content)
        async with http.stream("GET", "/admin/v1/events", headers=admin) as events:
            async for line in events.aiter_lines():
                seen.append(line.encode())
                if '"requests"' in line:  # the snapshot, with the recent requests
                    break
    assert b"named-node" in b"".join(seen) and b"spring" in b"".join(seen)

    rows = await network.rows()
    assert len(rows) >= 2
    network.gateway.shutdown()
    await trio.testing.wait_all_tasks_blocked()
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"tooti.sqlite3", "identities.sqlite3"}
    logged = caplog.text.encode()
    assert b"named-node" in logged  # the log did record what happened
    for secret in SECRETS:
        needle = secret.encode()
        assert needle not in logged, secret
        for blob in seen:
            assert needle not in blob, (secret, blob[:200])
        for path in files:
            assert needle not in path.read_bytes(), (secret, path)
