"""API-key auth at the gateway: the modes, every refusal's status, error object and
headers, group routing and what each caller may see, the reservation ``max_cost``, and
the key cache's revocation across gateways, over a real gateway and node on loopback
and both databases (SQLite and PostgreSQL)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import openai
import pytest
import trio

from tests.conftest import Network, simulated
from tooti import clock
from tooti.accounts import credentials
from tooti.accounts.database import Database, Tx
from tooti.accounts.directory import KeyDirectory
from tooti.accounts.money import cost_micros, price_micros
from tooti.accounts.records import AccountInfo
from tooti.accounts.service import AccountService
from tooti.backends.simulated import SimulatedBackend
from tooti.billing.base import RequestContext, Usage
from tooti.config import ConfigError
from tooti.gateway.app import Gateway
from tooti.gateway.auth import is_loopback_listen, presented_key, resolve_mode
from tooti.protocol.usage import limits_for
from tooti.runner import check_auth
from tooti.settings import (
    BackendSettings,
    GatewaySettings,
    GroupSettings,
    Settings,
    TunnelSettings,
)

ADMIN_KEY = "admin-master-key"
EU_TOKEN = "eu-join-token"


def chat(model: str = "tooti-sim", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3, **extra}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


class Spy:
    """A billing plugin that records what it is asked to authorize."""

    def __init__(self) -> None:
        self.authorized: list[RequestContext] = []

    async def run(self) -> None:
        await trio.sleep_forever()

    async def authorize(self, ctx: RequestContext) -> None:
        self.authorized.append(ctx)

    async def settle(self, ctx: RequestContext, usage: Usage) -> None:
        pass

    async def refund(self, ctx: RequestContext, reason: str) -> None:
        pass

    async def close(self) -> None:
        pass


async def start(nursery: trio.Nursery, database: Database | None, *, billing: Any = None,
                **settings: Any) -> Network:
    tunnel = TunnelSettings(heartbeat_interval=0.5)
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0", first_byte_timeout=10,
                                      **settings),
                      tunnel, billing=billing, database=database)
    urls = await nursery.start(gateway.serve)
    return Network(nursery, gateway, urls[0], tunnel)


@pytest.fixture
async def service(database: Database) -> AccountService:
    svc = AccountService(database)
    await svc.ensure_admin()
    return svc


@pytest.fixture
async def alice(service: AccountService) -> AccountInfo:
    return await service.create_account("alice")


@pytest.fixture
async def keyed(nursery: trio.Nursery, database: Database) -> AsyncIterator[Network]:
    """A ``keys`` gateway on the database with one node serving ``tooti-sim`` and
    ``other``."""
    network = await start(nursery, database, auth="keys", admin_key=ADMIN_KEY)
    await network.add_node([simulated(models=["tooti-sim", "other"])])
    yield network
    network.gateway.shutdown()


async def polled(directory: KeyDirectory) -> None:
    """Wait for two polls of the change counter (so one started after now)."""
    await directory.wait_polled()
    await directory.wait_polled()


def assert_401(response: httpx.Response, secret: str = "") -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key"
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    if secret:
        assert secret not in response.text and secret[9:] not in response.text


# ------------------------------------------------------------ refusals

async def test_a_missing_key_is_401(keyed: Network) -> None:
    async with keyed.client() as http:
        assert_401(await http.post("/v1/chat/completions", json=chat()))
        assert_401(await http.get("/v1/models"))


def forged(fill: str = "A") -> str:
    """A key of the right shape and checksum that no account has."""
    body = credentials.API_KEY + fill * credentials.RANDOM_CHARS
    return body + credentials.checksum(body.encode()).decode()


async def test_a_wrong_key_is_401_and_never_echoed(keyed: Network) -> None:
    made_up = forged()
    async with keyed.client() as http:
        assert_401(await http.post("/v1/chat/completions", json=chat(), headers=bearer(made_up)),
                   made_up)
        assert_401(await http.post("/v1/chat/completions", json=chat(),
                                   headers=bearer("totally-made-up")), "totally-made-up")
    # the made-up key was looked up once; asking again is answered from memory
    keys = keyed.gateway.keys
    assert keys is not None and keys.lookups == 1
    async with keyed.client() as http:
        assert_401(await http.post("/v1/chat/completions", json=chat(), headers=bearer(made_up)))
    assert keys.lookups == 1


async def test_a_valid_key_is_served_by_either_header(
        keyed: Network, service: AccountService, alice: AccountInfo) -> None:
    secret, _info = await service.create_key(alice.id)
    async with keyed.client() as http:
        assert (await http.post("/v1/chat/completions", json=chat(),
                                headers=bearer(secret))).status_code == 200
        assert (await http.post("/v1/chat/completions", json=chat(),
                                headers={"x-api-key": secret})).status_code == 200


async def test_an_expired_key_is_401(keyed: Network, service: AccountService,
                                     alice: AccountInfo, monkeypatch: pytest.MonkeyPatch
                                     ) -> None:
    expires = clock.wall() + 3600
    secret, _info = await service.create_key(alice.id, expires_at=expires)
    async with keyed.client() as http:
        assert (await http.post("/v1/chat/completions", json=chat(),
                                headers=bearer(secret))).status_code == 200
        # an hour later: the cached key has expired, with no change in the database
        monkeypatch.setattr(clock, "wall", lambda: expires + 1)
        assert_401(await http.post("/v1/chat/completions", json=chat(), headers=bearer(secret)),
                   secret)


async def test_a_revoked_key_and_a_suspended_account_are_401(
        keyed: Network, service: AccountService, alice: AccountInfo) -> None:
    keys = keyed.gateway.keys
    assert keys is not None
    revoked, info = await service.create_key(alice.id)
    other, _ = await service.create_key(alice.id)
    async with keyed.client() as http:
        for secret in (revoked, other):
            assert (await http.post("/v1/chat/completions", json=chat(),
                                    headers=bearer(secret))).status_code == 200
        await service.revoke_key(info.id)
        with trio.fail_after(2):
            await polled(keys)
        assert_401(await http.post("/v1/chat/completions", json=chat(),
                                   headers=bearer(revoked)), revoked)
        assert (await http.post("/v1/chat/completions", json=chat(),
                                headers=bearer(other))).status_code == 200
        await service.set_status(alice.id, "suspended")
        with trio.fail_after(2):
            await polled(keys)
        assert_401(await http.post("/v1/chat/completions", json=chat(),
                                   headers=bearer(other)), other)


async def test_a_model_the_key_may_not_use_is_403_and_not_listed(
        keyed: Network, service: AccountService, alice: AccountInfo) -> None:
    secret, _ = await service.create_key(alice.id, models=["other"])
    async with keyed.client() as http:
        refused = await http.post("/v1/chat/completions", json=chat("tooti-sim"),
                                  headers=bearer(secret))
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "model_not_allowed"
        assert refused.json()["error"]["type"] == "permission_error"
        assert (await http.post("/v1/chat/completions", json=chat("other"),
                                headers=bearer(secret))).status_code == 200
        listed = (await http.get("/v1/models", headers=bearer(secret))).json()["data"]
        assert [m["id"] for m in listed] == ["other"]
        everything = (await http.get("/v1/models", headers=bearer(ADMIN_KEY))).json()["data"]
        assert sorted(m["id"] for m in everything) == ["other", "tooti-sim"]


async def test_the_admin_key_is_the_admin_account(keyed: Network) -> None:
    received: list[dict[str, Any]] = []
    keyed.gateway.registry.bus.listeners.append(
        lambda event: received.append(event.data) if event.kind == "request.received" else None)
    async with keyed.client() as http:
        assert (await http.post("/v1/chat/completions", json=chat(),
                                headers=bearer(ADMIN_KEY))).status_code == 200
        me = await http.get("/v1/me", headers=bearer(ADMIN_KEY))
    assert received[-1]["account"] == "admin"
    assert me.status_code == 200, me.text


# ------------------------------------------------------------ modes

async def test_open_mode_serves_anonymous_and_still_recognises_keys(
        nursery: trio.Nursery, database: Database, service: AccountService,
        alice: AccountInfo) -> None:
    spy = Spy()
    network = await start(nursery, database, billing=[spy])  # loopback, auth "": open
    await network.add_node([simulated()])
    assert network.gateway.auth.mode == "open"
    secret, info = await service.create_key(alice.id)
    async with network.client() as http:
        assert (await http.post("/v1/chat/completions", json=chat())).status_code == 200
        assert (await http.post("/v1/chat/completions", json=chat(),
                                headers=bearer("made-up"))).status_code == 200
        assert (await http.post("/v1/chat/completions", json=chat(),
                                headers=bearer(secret))).status_code == 200
        me = await http.get("/v1/me")  # anonymous has no account
    assert [c.account_id for c in spy.authorized] == ["", "", alice.id]
    assert spy.authorized[2].key_id == info.id
    assert spy.authorized[0].max_cost == 0  # nobody to charge
    assert me.status_code == 401
    network.gateway.shutdown()


def test_auth_unset_beyond_loopback_refuses_to_start() -> None:
    settings = Settings(gateway=GatewaySettings(listen="0.0.0.0:0"))
    with pytest.raises(ConfigError, match=r'gateway\.auth = "keys"') as refused:
        check_auth(settings)
    assert refused.value.key == "gateway.auth"
    with pytest.raises(ConfigError):
        Gateway(settings.gateway, TunnelSettings())
    check_auth(Settings(gateway=GatewaySettings(listen="127.0.0.1:0")))  # loopback: open
    check_auth(Settings(gateway=GatewaySettings(listen="0.0.0.0:0", auth="keys")))
    check_auth(Settings(roles=["node"], gateway=GatewaySettings(listen="0.0.0.0:0")))


def test_explicit_open_beyond_loopback_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tooti.gateway"):
        assert resolve_mode(GatewaySettings(listen="0.0.0.0:0", auth="open")) == "open"
    assert any("anyone" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tooti.gateway"):
        assert resolve_mode(GatewaySettings(listen="127.0.0.1:0", auth="open")) == "open"
    assert not caplog.records


def test_loopback_listens() -> None:
    assert is_loopback_listen("127.0.0.1:8080") and is_loopback_listen("[::1]:80")
    assert is_loopback_listen("localhost:1")
    assert not is_loopback_listen("0.0.0.0:8080") and not is_loopback_listen("[::]:80")
    assert not is_loopback_listen("example.net:80")


def test_presented_key_prefers_the_bearer() -> None:
    scope = {"headers": [(b"x-api-key", b"xk"), (b"authorization", b"Bearer bk")]}
    assert presented_key(scope) == b"bk"
    assert presented_key({"headers": [(b"x-api-key", b" xk ")]}) == b"xk"
    assert presented_key({"headers": [(b"authorization", b"Basic abc")]}) == b""


# ------------------------------------------------------------ groups

async def test_group_keys_route_to_the_group_then_public_and_reveal_nothing(
        nursery: trio.Nursery, database: Database, service: AccountService,
        alice: AccountInfo) -> None:
    """A database group ``eu`` whose nodes join with the (static) group token: its
    members' keys reach its nodes and, if it allows, the public ones; a key of no group
    cannot tell its models from models that do not exist."""
    network = await start(nursery, database, auth="keys", join_token="base",
                          groups={"eu": GroupSettings(join_token=EU_TOKEN)})
    await network.add_node([simulated(models=["shared", "public-only"])], node_id="plain",
                           join_token="base")
    await network.add_node([simulated(models=["shared", "eu-only"])], node_id="eu-1",
                           join_token=EU_TOKEN)
    operator = await service.create_account("op", role="operator")
    await service.create_group(operator.id, "eu", public_nodes=True)
    await service.create_group(operator.id, "closed", public_nodes=False)
    member, _ = await service.create_key(operator.id, group="eu")
    closed, _ = await service.create_key(operator.id, group="closed")
    outsider, _ = await service.create_key(alice.id)
    async with network.client() as http:
        async def ask(key: str, model: str) -> httpx.Response:
            return await http.post("/v1/chat/completions", json=chat(model),
                                   headers=bearer(key))

        served = await ask(member, "shared")
        assert served.status_code == 200 and served.headers["x-tooti-node"] == "eu-1"
        assert (await ask(member, "eu-only")).headers["x-tooti-node"] == "eu-1"
        assert (await ask(member, "public-only")).headers["x-tooti-node"] == "plain"
        assert (await ask(outsider, "shared")).headers["x-tooti-node"] == "plain"
        hidden, unknown = await ask(outsider, "eu-only"), await ask(outsider, "no-such")
        assert hidden.status_code == unknown.status_code == 404
        assert (hidden.json()["error"]["message"].replace("eu-only", "X")
                == unknown.json()["error"]["message"].replace("no-such", "X"))
        assert (await ask(closed, "public-only")).status_code == 404  # no public fallback
        models = {key: sorted(m["id"] for m in (await http.get(
            "/v1/models", headers=bearer(key))).json()["data"])
            for key in (member, outsider, closed)}
    assert models[member] == ["eu-only", "public-only", "shared"]
    assert models[outsider] == ["public-only", "shared"]
    assert models[closed] == []
    network.gateway.shutdown()


# ------------------------------------------------------------ reservation

async def test_max_cost_is_the_bound_at_the_highest_price(
        nursery: trio.Nursery, database: Database, service: AccountService,
        alice: AccountInfo) -> None:
    spy = Spy()
    network = await start(nursery, database, billing=[spy], auth="keys",
                          reserve_completion_tokens=100)

    def priced(price_in: float, price_out: float) -> SimulatedBackend:
        return SimulatedBackend(BackendSettings(type="simulated", models=["m"],
                                                price_input=price_in, price_output=price_out))

    await network.add_node([priced(2.0, 3.0)], node_id="cheap")
    await network.add_node([priced(1.0, 10.0)], node_id="dear")
    secret, _ = await service.create_key(alice.id)
    async with network.client() as http:
        for body in (chat("m", max_tokens=7), {k: v for k, v in chat("m").items()
                                                if k != "max_tokens"}):
            raw = msgspec.json.encode(body)
            assert (await http.post("/v1/chat/completions", content=raw, headers={
                **bearer(secret), "content-type": "application/json"})).status_code == 200
    limits = limits_for("chat/completions", chat("m"), len(msgspec.json.encode(chat("m"))),
                        4096, 16_384)
    with_cap, without = spy.authorized
    assert with_cap.account_id == alice.id
    assert with_cap.max_cost == cost_micros(limits.prompt, 7, price_micros(2.0),
                                            price_micros(10.0))
    prompt_without = limits.prompt - len(b',"max_tokens":3')
    assert without.max_cost == cost_micros(prompt_without, 100, price_micros(2.0),
                                           price_micros(10.0))
    network.gateway.shutdown()


# ------------------------------------------------------------ across gateways

async def test_a_key_revoked_on_one_gateway_is_refused_by_another_within_2s(
        database_url: str) -> None:
    first, second = Database(database_url), Database(database_url)
    try:
        service = AccountService(first)
        await service.ensure_admin()
        account = await service.create_account("bob")
        secret, info = await service.create_key(account.id)
        other = KeyDirectory(second)  # another gateway's cache, on its own connection
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other.run)
            assert (await other.verify(secret.encode())) is not None
            looked_up = other.lookups  # 1, or 2 if the first poll's refresh overlapped it
            await service.revoke_key(info.id)
            with trio.fail_after(2):
                while await other.verify(secret.encode()) is not None:
                    await other.wait_polled()
            nursery.cancel_scope.cancel()
        assert other.lookups == looked_up  # refused from its refreshed cache
    finally:
        first.close()
        second.close()


async def test_keys_of_the_wrong_shape_or_checksum_cost_no_lookup(
        database: Database, service: AccountService, alice: AccountInfo) -> None:
    """Only a key of the exact shape with a right checksum reaches the database."""
    directory = KeyDirectory(database)
    secret, _ = await service.create_key(alice.id)
    assert len(secret) == credentials.API_KEY_LENGTH and credentials.is_api_key(
        secret.encode())
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")  # a typo in the checksum
    typo = secret[:20] + ("x" if secret[20] != "x" else "y") + secret[21:]
    for wrong in (flipped, typo, secret[:-6], secret + "A", "sk-tooti-" + "A" * 49,
                  "sk-tooti-" + "A" * 43, "sk-tooti-" + "!" * 49, "totally-made-up", ""):
        assert await directory.verify(wrong.encode()) is None, wrong
    assert directory.lookups == 0
    assert await directory.verify(forged().encode()) is None  # shaped right: asked once
    assert directory.lookups == 1
    assert await directory.verify(secret.encode()) is not None
    assert directory.lookups == 2


async def test_a_miss_is_remembered_across_changes(
        nursery: trio.Nursery, database: Database, service: AccountService,
        alice: AccountInfo) -> None:
    """A digest the database did not know cannot become a key (a key's secret exists
    only once its row is committed), so changes do not make a flood of unknown keys
    cost its lookups again."""
    directory = KeyDirectory(database, negative_ttl=1e9)
    nursery.start_soon(directory.run)
    await directory.wait_polled()
    unknown = [forged(fill) for fill in "ABCDEFGH"]
    for secret in unknown:
        assert await directory.verify(secret.encode()) is None
    assert directory.lookups == len(unknown)
    await service.create_key(alice.id)  # a change: every gateway refreshes
    with trio.fail_after(2):
        await polled(directory)
    for secret in unknown:
        assert await directory.verify(secret.encode()) is None
    assert directory.lookups == len(unknown)
    created, _ = await service.create_key(alice.id)  # and a new key works at once
    assert await directory.verify(created.encode()) is not None


class Gated:
    """A database whose next read, once armed, returns its rows only when released (a
    lookup whose read was taken before a change committed, but answers after)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.armed = False
        self.reading = trio.Event()
        self.release = trio.Event()

    async def read(self, fn: Any) -> Any:
        rows = await self.db.read(fn)
        if self.armed:
            self.armed = False
            self.reading.set()
            await self.release.wait()
        return rows


async def test_a_lookup_overlapping_a_refresh_does_not_cache_a_stale_key(
        database: Database, service: AccountService, alice: AccountInfo) -> None:
    """A key revoked while a lookup of it was reading is not cached as active."""
    secret, info = await service.create_key(alice.id)
    gated = Gated(database)
    directory = KeyDirectory(database)
    directory.db = gated  # type: ignore[assignment]
    gated.armed = True
    answers: list[Any] = []

    async def verify() -> None:
        answers.append(await directory.verify(secret.encode()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(verify)
        await gated.reading.wait()  # the lookup read the key while still active
        await service.revoke_key(info.id)
        await directory.refresh()  # what the poll does when the counter moves
        gated.release.set()
    assert answers == [None]
    assert await directory.verify(secret.encode()) is None  # not cached as active
    assert directory.lookups == 2  # it read again, and cached the revoked key inactive


async def test_the_generated_key_and_the_stored_digest_use_one_hash(
        database: Database, service: AccountService, alice: AccountInfo) -> None:
    secret, info = await service.create_key(alice.id)

    def stored(tx: Tx) -> Any:
        return tx.value("SELECT hash FROM api_keys WHERE id = ?", (info.id,))

    assert database.read_sync(stored) == credentials.digest(secret) == hashlib.sha256(
        secret.encode()).hexdigest()
    assert credentials.digest_bytes(secret).hex() == credentials.digest(secret)


# ------------------------------------------------------------ the official client

async def test_the_openai_client_against_a_keys_gateway(
        keyed: Network, service: AccountService, alice: AccountInfo) -> None:
    secret, _ = await service.create_key(alice.id)

    def client(key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(api_key=key, base_url=keyed.url + "/v1", max_retries=0)

    async with client(secret) as good:
        answer = await good.chat.completions.create(
            model="tooti-sim", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert answer.choices[0].message.content
    async with client("sk-tooti-" + "B" * 43) as bad:
        with pytest.raises(openai.AuthenticationError) as refused:
            await bad.chat.completions.create(
                model="tooti-sim", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.status_code == 401
    assert refused.value.code == "invalid_api_key"
