"""Peer ids, labels and model ids are printable text: a HELLO (or a relay's ROUTES entry)
with a control character in the peer id or a label is refused, so no peer can write its
own lines into the gateway's log; bidirectional controls (U+202E, ...) are refused too,
so no name can show as another in a list, the TUI or a log."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import trio

from tests.conftest import Network
from tests.hostile.peers import hostile_peer, relayed_route
from tests.hostile.test_peer_values import GOOD
from tooti.identity import Identity, b64
from tooti.protocol.connection import Connection, GoAwayReceived, Side
from tooti.protocol.frames import FrameType
from tooti.protocol.schemas import ModelEntry
from tooti.transport.websocket import SUBPROTOCOL, connect

FORGED_LINE = "\n2099-01-01 WARNING tooti.gateway: admin key rotated"

BAD_HELLOS: dict[str, tuple[str, dict[str, str]]] = {
    "newline in peer id": ("node-x" + FORGED_LINE, {}),
    "escape in peer id": ("node-\x1b[31mx", {}),
    "newline in a label value": ("node-x", {"region": "eu" + FORGED_LINE}),
    "newline in a label key": ("node-x", {"region\nx": "eu"}),
    "C1 control in a label": ("node-x", {"region": "eu\x85"}),
    "right-to-left override in peer id": ("node-\u202eexe.txt", {}),
    "bidi isolate in a label": ("node-x", {"region": "eu\u2067x"}),
}


@pytest.mark.parametrize("peer_id,labels", list(BAD_HELLOS.values()), ids=list(BAD_HELLOS))
async def test_a_hello_with_control_characters_is_refused(
        network: Network, peer_id: str, labels: dict[str, str]) -> None:
    with trio.fail_after(10):
        transport = await connect(network.tunnel_url, subprotocol=SUBPROTOCOL,
                                  max_message=1 << 20)
    try:
        conn = Connection(Side.DIALER)
        await transport.send(conn.send_hello(
            peer_id, "node", "test", labels,
            extra={"public_key": b64(Identity.generate().public_key)}))
        with trio.fail_after(5):
            answer = conn.receive_message(await transport.receive())
    finally:
        await transport.aclose()
    assert isinstance(answer, GoAwayReceived), answer
    assert answer.code == "bad_hello"
    assert peer_id not in network.gateway.registry.peers


async def test_a_routes_entry_with_control_characters_is_skipped(network: Network) -> None:
    registry = network.gateway.registry
    async with hostile_peer(network.tunnel_url, role="relay") as relay:
        good, bad = Identity.generate(), Identity.generate()
        entry: dict[str, Any] = relayed_route(bad, relay.id, [GOOD])
        entry["labels"] = {"region": "eu" + FORGED_LINE}
        await relay.send_json(FrameType.ROUTES,
                              {"nodes": [entry, relayed_route(good, relay.id, [GOOD])]})
        with trio.fail_after(5):
            await registry.wait_until(lambda: good.id in registry.peers)
        assert bad.id not in registry.peers


@pytest.mark.parametrize("model", ["evil\u202etxt.exe", "a\u2066b", "x\u200fy"])
def test_a_model_id_with_bidirectional_controls_is_refused(model: str) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"id": model}, ModelEntry)
    assert msgspec.convert({"id": "ñandú/llama-3:8b"}, ModelEntry).id == "ñandú/llama-3:8b"
