"""Join tokens minted per account and node ownership: a node joining with an account's
token is bound to that account (``node_owners``), the legacy static token to ``admin``;
several tokens are valid at once, a revoked one admits no new tunnel within 2 s and its
tunnels are closed; a group's token puts its nodes in the group. Real gateway, real
nodes over WebSocket on loopback, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from tests.conftest import Network, simulated
from tooti.accounts.database import Database
from tooti.accounts.join_directory import JoinTokenDirectory
from tooti.accounts.records import ADMIN_ACCOUNT
from tooti.accounts.service import AccountService
from tooti.gateway.app import Gateway
from tooti.mesh.station import Station
from tooti.settings import GatewaySettings, TunnelSettings
from tooti.transport.websocket import SUBPROTOCOL

LEGACY_TOKEN = "legacy-join-token"

Start = Callable[..., Awaitable[tuple[Network, JoinTokenDirectory]]]


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
async def service(database: Database) -> AccountService:
    accounts = AccountService(database)
    await accounts.ensure_admin()
    return accounts


@pytest.fixture
async def start(nursery: trio.Nursery, database: Database) -> AsyncIterator[Start]:
    """Starts a gateway on ``database`` whose station admits the minted join tokens."""
    gateways: list[Gateway] = []

    async def run(**settings: Any) -> tuple[Network, JoinTokenDirectory]:
        tunnel = TunnelSettings(heartbeat_interval=0.5)
        gateway_settings = GatewaySettings(listen="127.0.0.1:0", first_byte_timeout=10,
                                           **settings)
        directory = JoinTokenDirectory(database)
        station = Station(gateway_settings, tunnel, join_directory=directory)
        gateway = Gateway(gateway_settings, tunnel, station=station, database=database)
        urls = await nursery.start(gateway.serve)
        gateways.append(gateway)
        return Network(nursery, gateway, urls[0], tunnel), directory

    yield run
    for gateway in gateways:
        gateway.shutdown()


def owner_row(database: Database, node_id: str) -> tuple[Any, ...] | None:
    return database.read_sync(lambda tx: tx.one(
        "SELECT account_id, group_id, token_id FROM node_owners WHERE node_id = ?",
        (node_id,)))


async def dial(url: str, token: str) -> int:
    """Open a tunnel upgrade with ``token``: 101 if admitted, else the refusal status."""
    try:
        async with open_websocket_url(url, subprotocols=[SUBPROTOCOL],
                                      extra_headers=[(b"authorization",
                                                      f"Bearer {token}".encode())]):
            return 101
    except ConnectionRejected as refused:
        return int(refused.status_code or 0)


async def test_a_node_joining_with_an_operators_token_is_bound_to_that_account(
    service: AccountService, start: Start, database: Database,
) -> None:
    operator = await service.create_account("ops", role="operator")
    secret, token = await service.create_join_token(operator.id, name="rack-1")
    network, directory = await start()
    await network.add_node([simulated()], node_id="gpu-1", join_token=secret)
    peer = network.gateway.registry.peers["gpu-1"]
    assert (peer.owner, peer.token_id, peer.group) == (operator.id, token.id, "")
    assert directory.owner_of("gpu-1") == operator.id
    await directory.flush()
    assert owner_row(database, "gpu-1") == (operator.id, "", token.id)
    async with network.client() as http:  # loopback, no admin key: the admin API answers
        listed = (await http.get("/admin/v1/peers")).json()["data"]
    assert [(p["id"], p["owner"], p["token"]) for p in listed] == [
        ("gpu-1", operator.id, "rack-1")]


async def test_the_legacy_join_token_binds_its_nodes_to_admin(
    service: AccountService, start: Start, database: Database,
) -> None:
    """The static token and a minted one are valid side by side; each node is bound to
    the account of the token it presented."""
    operator = await service.create_account("ops", role="operator")
    secret, _ = await service.create_join_token(operator.id)
    network, directory = await start(join_token=LEGACY_TOKEN)
    await network.add_node([simulated()], node_id="old", join_token=LEGACY_TOKEN)
    await network.add_node([simulated()], node_id="new", join_token=secret)
    await directory.flush()
    assert owner_row(database, "old") == (ADMIN_ACCOUNT, "", "")
    assert owner_row(database, "new")[0] == operator.id  # type: ignore[index]
    assert directory.owner_of("old") == ADMIN_ACCOUNT
    assert directory.owner_of("never-joined") == ADMIN_ACCOUNT
    assert await dial(network.tunnel_url, "made-up") == 403


async def test_a_revoked_token_admits_no_new_tunnel_within_two_seconds(
    service: AccountService, start: Start, database: Database,
) -> None:
    operator = await service.create_account("ops", role="operator")
    first, first_info = await service.create_join_token(operator.id, name="a")
    second, _ = await service.create_join_token(operator.id, name="b")
    network, directory = await start()
    registry = network.gateway.registry
    await network.add_node([simulated()], node_id="n-a", join_token=first)
    await network.add_node([simulated()], node_id="n-b", join_token=second)
    assert {registry.peers["n-a"].token, registry.peers["n-b"].token} == {"a", "b"}

    await service.revoke_join_token(first_info.id, account_id=operator.id)
    with trio.fail_after(2):
        await directory.wait_current()
        # Its live tunnel is closed too (the node's redials are refused).
        await registry.wait_until(lambda: "n-a" not in registry.peers)
    assert directory.lookup(bytes(32)) is None
    assert await dial(network.tunnel_url, first) == 403
    assert await dial(network.tunnel_url, second) == 101
    assert "n-b" in registry.peers
    await directory.flush()
    assert owner_row(database, "n-a")[0] == operator.id  # type: ignore[index]


async def test_the_tokens_of_a_suspended_account_admit_no_one(
    service: AccountService, start: Start,
) -> None:
    operator = await service.create_account("ops", role="operator")
    network, directory = await start()
    auth = network.gateway.station.admission.auth
    assert not auth.open_to_network  # no token yet: loopback peers only
    secret, _ = await service.create_join_token(operator.id)
    await service.create_join_token(ADMIN_ACCOUNT)  # keeps tokens required below
    with trio.fail_after(2):
        await directory.wait_current()  # minted after start: visible at the next poll
    assert len(directory) == 2 and auth.open_to_network
    assert await dial(network.tunnel_url, secret) == 101
    await service.set_status(operator.id, "suspended")
    with trio.fail_after(2):
        await directory.wait_current()
    assert await dial(network.tunnel_url, secret) == 403


async def test_a_groups_token_puts_its_node_in_the_group(
    service: AccountService, start: Start, database: Database,
) -> None:
    """The group's node serves only the group's members: a request without the group's
    key does not reach it, a member's key does (and still reaches public nodes)."""
    operator = await service.create_account("ops", role="operator")
    group = await service.create_group(operator.id, "lab")
    group_secret, group_token = await service.create_join_token(operator.id, group="lab")
    public_secret, _ = await service.create_join_token(operator.id)
    member = await service.create_account("friend")
    invite, _ = await service.create_invite("lab", operator.id)
    await service.redeem_invite(invite, member.id)
    key, _ = await service.create_key(member.id, group="lab")
    outsider_key, _ = await service.create_key(member.id)

    network, directory = await start()
    await network.add_node([simulated(models=["lab-model"])], node_id="lab-1",
                           join_token=group_secret)
    await network.add_node([simulated(models=["pub-model"])], node_id="pub-1",
                           join_token=public_secret)
    peer = network.gateway.registry.peers["lab-1"]
    assert (peer.group, peer.owner, peer.token_id) == ("lab", operator.id, group_token.id)
    await directory.flush()
    assert owner_row(database, "lab-1") == (operator.id, group.id, group_token.id)

    async with network.client() as http:
        for headers in ({}, {"authorization": f"Bearer {outsider_key}"}):
            response = await http.post("/v1/chat/completions", json=chat("lab-model"),
                                       headers=headers)
            assert response.status_code in (404, 503), response.text
        member_headers = {"authorization": f"Bearer {key}"}
        response = await http.post("/v1/chat/completions", json=chat("lab-model"),
                                   headers=member_headers)
        assert response.status_code == 200, response.text
        assert response.headers["x-tooti-node"] == "lab-1"
        response = await http.post("/v1/chat/completions", json=chat("pub-model"),
                                   headers=member_headers)
        assert response.headers["x-tooti-node"] == "pub-1"


async def test_a_binding_moves_only_for_the_key_that_proved_the_node(
    service: AccountService, database: Database,
) -> None:
    """Same id, same key: the newest join's account owns it. Same id, another key (a
    different machine claiming a known node id): the row keeps its owner."""
    first = await service.create_account("first", role="operator")
    second = await service.create_account("second", role="operator")
    thief = await service.create_account("thief", role="operator")
    directory = JoinTokenDirectory(database)
    directory.bind_owner("gpu", first.id, public_key=b"k" * 32)
    await directory.flush()
    directory.bind_owner("gpu", second.id, public_key=b"k" * 32)
    await directory.flush()
    assert owner_row(database, "gpu")[0] == second.id  # type: ignore[index]
    directory.bind_owner("gpu", thief.id, public_key=b"x" * 32)
    await directory.flush()
    assert owner_row(database, "gpu")[0] == second.id  # type: ignore[index]
    assert directory.owner_of("gpu") == thief.id  # what this gateway admitted


async def test_the_owner_queue_is_bounded(service: AccountService, database: Database
                                         ) -> None:
    directory = JoinTokenDirectory(database, max_pending=2)
    for i in range(5):
        directory.bind_owner(f"n{i}", ADMIN_ACCOUNT, public_key=bytes([i]) * 32)
    assert directory.dropped == 3
    await directory.flush()
    assert database.read_sync(lambda tx: tx.value("SELECT COUNT(*) FROM node_owners")) == 2


async def test_a_node_behind_a_relay_belongs_to_the_relays_owner(
    service: AccountService, start: Start, database: Database,
) -> None:
    from tests.test_relay import start_node, start_relay

    operator = await service.create_account("relayer", role="operator")
    secret, token = await service.create_join_token(operator.id)
    network, directory = await start()
    relay = await start_relay(network, "relay-1", join_token=secret)
    await start_node(network, "behind", [relay.tunnel_url])
    peer = network.gateway.registry.peers["behind"]
    assert (peer.via, peer.owner, peer.token_id) == ("relay-1", operator.id, token.id)
    await directory.flush()
    assert owner_row(database, "behind") == (operator.id, "", token.id)
    assert owner_row(database, "relay-1") is None  # a relay serves nothing itself
