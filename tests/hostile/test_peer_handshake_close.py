"""A tunnel refused during its handshake (no HELLO in time, say) is closed by the
gateway even if the peer never answers the WebSocket close: before, the gateway waited
for that answer without end, and the connection kept its per-address handshake and
connection slots for as long as the attacker liked."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tests.conftest import Network
from tests.hostile.client import connect, read_to_eof, request_bytes
from tooti.mesh import peer_session

UPGRADE = [("host", "127.0.0.1"), ("upgrade", "websocket"), ("connection", "Upgrade"),
           ("sec-websocket-version", "13"), ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
           ("sec-websocket-protocol", "tooti.v1")]


async def test_a_peer_that_never_answers_the_close_is_cut_off(
        network: Network, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peer_session, "HANDSHAKE_TIMEOUT", 0.2)
    stream = await connect(network.url)
    async with stream:
        await stream.send_all(request_bytes("GET", "/tooti/v1/tunnel", headers=UPGRADE))
        with trio.fail_after(5):  # upgraded, sends no HELLO, never answers the close
            received = await read_to_eof(stream)
    assert received.startswith(b"HTTP/1.1 101")
    assert b"handshake_timeout" in received  # the GOAWAY, then the close, then EOF
    await trio.testing.wait_all_tasks_blocked()
    assert network.gateway.station.admission.handshakes.unfinished("127.0.0.1") == 0
