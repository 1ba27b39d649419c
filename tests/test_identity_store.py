"""Persistent identity bindings: a chosen node name stays bound to its first key across
gateway restarts; admins list and forget bindings; a bad store file fails at startup."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from tests.conftest import Network
from tests.test_e2e_lifecycle import raw_handshake
from tooti import runner
from tooti.gateway.app import Gateway
from tooti.identity import Identity, derive_id
from tooti.mesh.identity_store import FILENAME, IdentityStore, IdentityStoreError
from tooti.mesh.registry import Registry
from tooti.protocol.connection import ProtocolError
from tooti.settings import GatewaySettings, Settings, TunnelSettings
from tooti.transport.websocket import SUBPROTOCOL

ADMIN = {"authorization": "Bearer adm"}


async def start_gateway(nursery: trio.Nursery, data_dir: Path, **settings: Any) -> Network:
    """A gateway on a free loopback port, keeping identity bindings in ``data_dir``."""
    tunnel = TunnelSettings(heartbeat_interval=0.5)
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0", **settings), tunnel,
                      identities=IdentityStore.in_data_dir(data_dir))
    urls = await nursery.start(gateway.serve)
    return Network(nursery, gateway, urls[0], tunnel)


async def handshake_reply(network: Network, peer_id: str, identity: Identity) -> bytes:
    """Handshake by hand as ``peer_id`` and return the gateway's next frame."""
    async with open_websocket_url(network.tunnel_url, subprotocols=[SUBPROTOCOL]) as ws:
        await raw_handshake(ws, peer_id, identity)
        message = await ws.get_message()
        assert isinstance(message, bytes)
        return message


# -- the store -------------------------------------------------------------


def test_store_binds_once_and_persists(tmp_path: Path) -> None:
    path = tmp_path / "state" / FILENAME  # the directory is created
    store = IdentityStore(path)
    first, second = Identity.generate().public_key, Identity.generate().public_key
    assert store.get("gpu-7") is None
    assert store.bind("gpu-7", first) == first
    assert store.bind("gpu-7", second) == first  # the first key keeps the name
    reopened = IdentityStore(path)
    assert reopened.get("gpu-7") == first and reopened.load() == {"gpu-7": first}
    [binding] = reopened.bindings()
    assert binding.name == "gpu-7" and binding.public_key == first and binding.bound_at > 0
    assert reopened.forget("gpu-7") and not reopened.forget("gpu-7")
    assert IdentityStore(path).get("gpu-7") is None
    db = sqlite3.connect(path)
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    db.close()


def test_registry_binds_through_the_store(tmp_path: Path) -> None:
    store = IdentityStore(tmp_path / FILENAME)
    owner, other = Identity.generate(), Identity.generate()
    Registry(identities=store).bind_identity("gpu-7", owner.public_key)
    Registry(identities=store).bind_identity(owner.id, owner.public_key)  # derived: no row
    assert store.load() == {"gpu-7": owner.public_key}
    restarted = Registry(identities=IdentityStore(tmp_path / FILENAME))
    assert restarted.identities == {"gpu-7": owner.public_key}
    with pytest.raises(ProtocolError) as refused:
        restarted.bind_identity("gpu-7", other.public_key)
    assert refused.value.code == "identity_mismatch"
    restarted.bind_identity("gpu-7", owner.public_key)


def test_a_failed_write_keeps_the_binding_in_memory(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The file vanishing after startup costs persistence, not the handshake."""
    store = IdentityStore(tmp_path / "gone" / FILENAME)
    registry = Registry(identities=store)
    shutil.rmtree(tmp_path / "gone")
    owner = Identity.generate()
    registry.bind_identity("gpu-7", owner.public_key)
    assert "bound in memory only" in caplog.text
    with pytest.raises(ProtocolError):
        registry.bind_identity("gpu-7", Identity.generate().public_key)


def test_a_corrupt_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    path.write_bytes(b"this is not a sqlite database, it is garbage " * 200)
    with pytest.raises(IdentityStoreError) as failed:
        IdentityStore(path)
    assert str(path) in str(failed.value) and "not a database" in str(failed.value)
    with pytest.raises(IdentityStoreError):
        Gateway(GatewaySettings(), TunnelSettings(), identities=IdentityStore(path))


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    IdentityStore(path)
    db = sqlite3.connect(path)
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(IdentityStoreError, match="schema version"):
        IdentityStore(path)


def test_a_store_that_cannot_be_created_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the data dir should be")
    with pytest.raises(IdentityStoreError, match="cannot create its directory"):
        IdentityStore.in_data_dir(blocker)
    (tmp_path / "dir" / FILENAME).mkdir(parents=True)  # a directory where the file goes
    with pytest.raises(IdentityStoreError, match="cannot open"):
        IdentityStore.in_data_dir(tmp_path / "dir")


def test_tooti_run_reports_a_corrupt_store_at_startup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / FILENAME).write_bytes(b"garbage" * 1000)
    settings = Settings(roles=["gateway"], data_dir=str(tmp_path))
    settings.gateway.listen = "127.0.0.1:0"
    assert runner.run(settings) == 1
    err = capsys.readouterr().err
    assert err.startswith("tooti: error: identity store ") and "not a database" in err
    assert "Traceback" not in err


# -- a real gateway restart --------------------------------------------------


async def test_a_binding_survives_a_gateway_restart(nursery: trio.Nursery,
                                                    tmp_path: Path) -> None:
    owner, forger = Identity.generate(), Identity.generate()
    first = await start_gateway(nursery, tmp_path)
    await first.add_node(node_id="gpu-7", identity=owner)
    first.kill_node("gpu-7")
    first.gateway.shutdown()

    second = await start_gateway(nursery, tmp_path)  # a new process on the same data dir
    assert second.gateway.registry.identities == {"gpu-7": owner.public_key}
    goaway = await handshake_reply(second, "gpu-7", forger)
    assert goaway[0] == 0x0B and b"identity_mismatch" in goaway
    assert "gpu-7" not in second.gateway.registry.peers
    await second.add_node(node_id="gpu-7", identity=owner)  # the owner is welcome
    sessions = second.gateway.station.admission.sessions
    assert second.gateway.registry.peers["gpu-7"].session in sessions
    second.gateway.shutdown()


# -- admin -------------------------------------------------------------------


async def test_admin_lists_and_forgets_bindings(nursery: trio.Nursery, tmp_path: Path) -> None:
    network = await start_gateway(nursery, tmp_path, admin_key="adm")
    owner, anonymous, newcomer = Identity.generate(), Identity.generate(), Identity.generate()
    await network.add_node(node_id="gpu-7", identity=owner)
    await network.add_node(node_id=anonymous.id, identity=anonymous)  # derived: not bound
    registry = network.gateway.registry
    async with network.client() as http:
        for method, path in (("GET", "/admin/v1/identities"),
                             ("DELETE", "/admin/v1/identities/gpu-7")):
            for headers in ({}, {"authorization": "Bearer wrong"}):
                response = await http.request(method, path, headers=headers)
                assert response.status_code == 401, (method, path, headers)
        assert registry.identities == {"gpu-7": owner.public_key}  # nothing was forgotten

        listed = (await http.get("/admin/v1/identities", headers=ADMIN)).json()
        [entry] = listed["data"]
        assert entry["name"] == "gpu-7" and entry["connected"] is True
        assert entry["fingerprint"] == derive_id(owner.public_key) == owner.id
        assert isinstance(entry["bound_at"], float)
        assert set(entry) == {"name", "fingerprint", "bound_at", "connected"}  # no key

        response = await http.post("/admin/v1/identities", headers=ADMIN)
        assert response.status_code == 405
        response = await http.delete("/admin/v1/identities/nobody", headers=ADMIN)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "identity_not_found"

        response = await http.delete("/admin/v1/identities/gpu-7", headers=ADMIN)
        assert response.status_code == 200 and response.json()["deleted"] is True
        assert (await http.get("/admin/v1/identities", headers=ADMIN)).json()["data"] == []
    assert IdentityStore.in_data_dir(tmp_path).get("gpu-7") is None
    # Forgotten: the next key to prove the name claims it (here and after a restart).
    async with open_websocket_url(network.tunnel_url, subprotocols=[SUBPROTOCOL]) as ws:
        await raw_handshake(ws, "gpu-7", newcomer)
        with trio.fail_after(10):
            await registry.wait_until(
                lambda: registry.identities.get("gpu-7") == newcomer.public_key)
    assert IdentityStore.in_data_dir(tmp_path).get("gpu-7") == newcomer.public_key


async def test_admin_lists_memory_only_bindings(network: Network) -> None:
    """Without a store (tests, embedding) the bindings are listed from memory."""
    owner = Identity.generate()
    await network.add_node(node_id="gpu-7", identity=owner)
    async with network.client() as http:
        listed = (await http.get("/admin/v1/identities")).json()["data"]
        assert listed == [{"name": "gpu-7", "fingerprint": owner.id, "bound_at": None,
                           "connected": True}]
        response = await http.delete("/admin/v1/identities/gpu-7")
    assert response.status_code == 200 and network.gateway.registry.identities == {}
