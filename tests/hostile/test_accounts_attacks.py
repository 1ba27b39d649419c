"""An attacker at the accounts surface: the admin accounts API (``/admin/v1/…``) and
self-service (``/v1/me…``) of a real ``keys`` gateway on loopback, with the credits
plugin and a node, on both databases (SQLite and PostgreSQL).

Every refusal must be the OpenAI error object with the right status: never a 500, a
traceback, a hang, or a secret (API key, admin key, invite, credit code, join token) in
an answer or in a log line. Covered here: malformed, huge, deeply nested, unknown-field
and wrong-type bodies on every route; ids with path tricks (``../``, ``%2F``, NUL,
unicode, 10 KB); a user's key at admin routes and at other accounts' keys, groups,
invites and earnings; an operator minting a join token or invite for another's group;
invite and credit codes redeemed concurrently, twice, after expiry, or as a bare prefix;
a flood of 10,000 wrong keys against the key directory's lookup counter; odd
``Authorization`` / ``x-api-key`` forms and their precedence; amounts as floats, bools,
negatives, huge numbers and strings; an enormous ``max_tokens`` at the highest price a
node may advertise; and a key limited to some models probing for others.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import Network, simulated
from tests.hostile.client import assert_error_object, exchange, request_bytes
from tooti import clock
from tooti.accounts.credentials import API_KEY, generate, is_api_key
from tooti.accounts.database import Database, Tx
from tooti.accounts.directory import MAX_LOOKUPS, KeyDirectory
from tooti.accounts.journal import FEES, account_book, earnings_book, post
from tooti.accounts.records import AccountInfo
from tooti.accounts.service import MAX_SELF_SERVICE_KEYS, AccountService
from tooti.backends.simulated import SimulatedBackend
from tooti.billing.base import BillingSetup
from tooti.billing.credits import Credits
from tooti.gateway.app import Gateway
from tooti.protocol.schemas import MAX_PRICE
from tooti.settings import BackendSettings, GatewaySettings, TunnelSettings

ADMIN_KEY = "adm-h10-7c1e9a2b4d6f"
CHAT = {"model": "tooti-sim", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3}


class Env:
    """A ``keys`` gateway with a database, the credits plugin and one node."""

    def __init__(self, network: Network, service: AccountService) -> None:
        self.network = network
        self.service = service
        self.url = network.url
        keys = network.gateway.keys
        assert keys is not None
        self.keys: KeyDirectory = keys

    def client(self, key: str | None = ADMIN_KEY, **options: Any) -> httpx.AsyncClient:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=20, **options)


@pytest.fixture
async def env(nursery: trio.Nursery, database: Database, tmp_path: Path
              ) -> AsyncIterator[Env]:
    service = AccountService(database)
    await service.ensure_admin()
    credits = Credits(BillingSetup(tmp_path, {}, database=database, gateway_id="gw-h10"))
    tunnel = TunnelSettings(heartbeat_interval=0.5)
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0", admin_key=ADMIN_KEY,
                                      auth="keys", first_byte_timeout=10),
                      tunnel, billing=[credits], database=database)
    urls = await nursery.start(gateway.serve)
    network = Network(nursery, gateway, urls[0], tunnel)
    await network.add_node([simulated(models=["tooti-sim", "other"])])
    yield Env(network, service)
    gateway.shutdown()


def assert_error(response: httpx.Response, status: int | tuple[int, ...],
                 code: str | None = None) -> dict[str, Any]:
    """``response`` is an OpenAI error object with ``status`` (never a 500)."""
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in response.text
    if code is not None:
        assert error["code"] == code, error
    return error


async def user(env: Env, name: str, role: str = "user", credit: int = 0
               ) -> tuple[AccountInfo, str]:
    """A new account and a key of it (with ``credit`` micro-units)."""
    account = await env.service.create_account(name, role)
    if credit:
        await env.service.top_up(account.id, credit, idem_key=f"seed:{name}")
    secret, _key = await env.service.create_key(account.id, "main")
    return account, secret


# ------------------------------------------------------------ bodies

ADMIN_BODY_ROUTES = [
    ("POST", "/admin/v1/accounts"), ("PATCH", "/admin/v1/accounts/admin"),
    ("POST", "/admin/v1/keys"), ("POST", "/admin/v1/groups"),
    ("POST", "/admin/v1/invites"), ("POST", "/admin/v1/invites/redeem"),
    ("POST", "/admin/v1/join-tokens"), ("POST", "/admin/v1/credits/top-up"),
    ("POST", "/admin/v1/credits/codes"), ("POST", "/admin/v1/credits/redeem"),
    ("POST", "/admin/v1/earnings/payouts"),
]
ME_BODY_ROUTES = [
    ("POST", "/v1/me/keys"), ("POST", "/v1/me/redeem"), ("POST", "/v1/me/groups"),
    ("POST", "/v1/me/groups/g/invites"), ("POST", "/v1/me/join-tokens"),
]
BAD_BODIES: list[tuple[str, bytes]] = [
    ("not json", b"{not json"),
    ("a list", b"[1, 2, 3]"),
    ("a string", b'"hello"'),
    ("null", b"null"),
    ("a number", b"1e999"),
    ("deeply nested", b"[" * 30_000 + b"]" * 30_000),
    ("deep object", b'{"name": ' + b'{"a": ' * 5_000 + b"1" + b"}" * 5_000 + b"}"),
    ("unknown field", b'{"name": "x", "role": "user", "account": "admin", "code": "x", '
                      b'"owner": "admin", "group": "g", "amount": "1", "is_admin": true}'),
    ("wrong types", b'{"name": 1, "role": ["admin"], "account": {}, "code": 7, '
                    b'"group": false, "status": 3, "max_uses": "9", "amount": 5}'),
    ("NUL in strings", b'{"name": "a\\u0000b", "account": "\\u0000", "code": "\\u0000", '
                       b'"group": "\\u0000", "owner": "\\u0000"}'),
    ("invalid utf-8", b'{"name": "\xff\xfe"}'),
    ("lone surrogate", b'{"name": "\\ud800"}'),
]


async def test_malformed_bodies_on_every_route_are_400_objects(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    operator, secret = await user(env, "op", "operator")
    before = [a.id for a in await env.service.list_accounts()]
    async with env.client() as admin, env.client(secret) as own:
        for http, routes in ((admin, ADMIN_BODY_ROUTES), (own, ME_BODY_ROUTES)):
            for method, path in routes:
                for label, raw in BAD_BODIES:
                    response = await http.request(method, path, content=raw, headers={
                        "content-type": "application/json"})
                    assert response.status_code != 500, (path, label, response.text)
                    assert_error(response, (400, 403, 404))
                # Over MAX_BODY (64 KiB): 413, read no further, and the connection is
                # closed saying so (the client's next request goes on a new one).
                huge = b'{"name": "' + b"a" * (1 << 20) + b'"}'
                too_large = await http.request(method, path, content=huge)
                assert_error(too_large, 413)
                assert too_large.headers["connection"] == "close"
    assert [a.id for a in await env.service.list_accounts()] == before
    assert "Traceback" not in caplog.text and operator.id


NUL = "a\u0000b"
NUL_BODIES: list[tuple[str, dict[str, Any]]] = [
    ("/admin/v1/accounts", {"name": NUL}),
    ("/admin/v1/keys", {"account": NUL}),
    ("/admin/v1/keys", {"account": "alice", "name": NUL}),
    ("/admin/v1/keys", {"account": "alice", "group": NUL}),
    ("/admin/v1/keys", {"account": "alice", "models": [NUL]}),
    ("/admin/v1/groups", {"name": NUL, "owner": "op"}),
    ("/admin/v1/groups", {"name": "g", "owner": NUL}),
    ("/admin/v1/invites", {"group": NUL}),
    ("/admin/v1/invites/redeem", {"code": "ti-tooti-" + NUL, "account": "alice"}),
    ("/admin/v1/join-tokens", {"account": "op", "name": NUL}),
    ("/admin/v1/join-tokens", {"account": "op", "group": NUL}),
    ("/admin/v1/credits/top-up", {"account": "alice", "amount": "1", "idem_key": NUL}),
    ("/admin/v1/credits/top-up", {"account": "alice", "amount": "1", "memo": NUL}),
    ("/admin/v1/credits/redeem", {"code": "tc-tooti-" + NUL, "account": "alice"}),
    ("/admin/v1/earnings/payouts", {"account": "op", "amount": "1", "idem_key": NUL}),
    ("/v1/me/keys", {"name": NUL}),
    ("/v1/me/keys", {"group": NUL}),
    ("/v1/me/keys", {"models": [NUL]}),
    ("/v1/me/redeem", {"code": "ti-tooti-" + NUL}),
    ("/v1/me/redeem", {"code": "tc-tooti-" + NUL}),
    ("/v1/me/groups", {"name": NUL}),
    (f"/v1/me/groups/{NUL}/invites", {}),
    ("/v1/me/join-tokens", {"name": NUL}),
    ("/v1/me/join-tokens", {"group": NUL}),
]


async def test_nul_and_control_characters_are_refused_not_500(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """PostgreSQL cannot store a NUL in text: it must be a 400 (or 404) at entry, on
    SQLite alike, never an internal error."""
    caplog.set_level(logging.DEBUG)
    await user(env, "alice")
    _op, op_key = await user(env, "op", "operator")
    async with env.client() as admin, env.client(op_key) as own:
        for path, body in NUL_BODIES:
            http = own if path.startswith("/v1/") else admin
            response = await http.post(path.replace("\x00", "%00"), json=body)
            assert response.status_code != 500, (path, body, response.text)
            assert_error(response, (400, 404))
        for path in ("/admin/v1/keys?account=a%00", "/admin/v1/groups?account=%00",
                     "/admin/v1/invites?group=%00", "/admin/v1/join-tokens?account=%00",
                     "/admin/v1/earnings?account=%00", "/admin/v1/accounts/a%00b",
                     "/admin/v1/groups/%00", "/admin/v1/groups/%00/members",
                     "/v1/me/keys/%00"):
            http = own if path.startswith("/v1/") else admin
            for method in ("GET", "DELETE", "PATCH"):
                response = await http.request(method, path, json={})
                assert response.status_code != 500, (method, path, response.text)
                if response.status_code != 405:
                    assert_error(response, (400, 404))
    names = [a.name for a in await env.service.list_accounts()]
    assert names == ["admin", "alice", "op"]
    assert "internal error" not in caplog.text.lower()


async def test_every_field_type_fault_names_its_field(env: Env) -> None:
    async with env.client() as admin:
        for body, param in (
            ({"name": "x", "role": "root"}, "role"),
            ({"name": "n" * 65}, "name"),
            ({"name": True}, "name"),
        ):
            error = assert_error(await admin.post("/admin/v1/accounts", json=body), 400)
            assert error["param"] == param, error
        error = assert_error(await admin.patch("/admin/v1/accounts/admin", json={
            "limits": {"rpm": -1}}), 400)
        assert error["param"] == "limits.rpm"
        error = assert_error(await admin.post("/admin/v1/keys", json={
            "account": "admin", "models": ["m"] * 257}), 400)
        assert error["param"] == "models"


# ------------------------------------------------------------ path tricks

TRICKY_IDS = [
    "..", "../accounts", "..%2F..%2Fpeers", "%2F", "a%2Fb", "%00", "a%00b", "%0d%0aX-Evil: 1",
    "%E2%80%AE", "\u202e", "\u00e9t\u00e9", "\U0001f600", "%ff", "%25", "'; DROP TABLE--",
    "x" * 10_000,
]
ID_ROUTES = [
    ("GET", "/admin/v1/accounts/{}"), ("PATCH", "/admin/v1/accounts/{}"),
    ("DELETE", "/admin/v1/keys/{}"), ("GET", "/admin/v1/groups/{}"),
    ("GET", "/admin/v1/groups/{}/members"), ("DELETE", "/admin/v1/groups/{}/members/{}"),
    ("DELETE", "/admin/v1/invites/{}"), ("DELETE", "/admin/v1/join-tokens/{}"),
]


async def test_ids_with_path_tricks_are_404_never_500(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    _account, secret = await user(env, "alice")
    async with env.client() as admin, env.client(secret) as own:
        for ident in TRICKY_IDS:
            for method, pattern in ID_ROUTES:
                path = pattern.replace("{}", ident)
                response = await admin.request(method, path, json={})
                assert response.status_code != 500, (path[:80], response.text)
                if ident.startswith("..") and response.status_code == 200:
                    continue  # the client resolved the dot segment to a real route
                assert_error(response, (400, 404, 405, 414, 431))
            for method, pattern in (("DELETE", "/v1/me/keys/{}"),
                                    ("POST", "/v1/me/groups/{}/invites")):
                response = await own.request(method, pattern.replace("{}", ident), json={})
                assert response.status_code != 500, (ident[:80], response.text)
                assert_error(response, (400, 403, 404, 405, 414, 431))
            for query in ("account", "group"):
                for route in ("/admin/v1/keys", "/admin/v1/groups", "/admin/v1/invites",
                              "/admin/v1/join-tokens", "/admin/v1/earnings"):
                    response = await admin.get(f"{route}?{query}={ident}")
                    assert response.status_code != 500, (route, ident[:80], response.text)
                    if response.status_code != 200:
                        assert_error(response, (400, 404, 414, 431))
    # Dot segments sent as they are (no client resolving them): not a route.
    for target in ("/admin/v1/accounts/../keys", "/admin/v1/keys/../../v1/me",
                   "/admin/v1/accounts/%2e%2e", "/admin/v1/accounts/..%2f..%2fpeers"):
        answer = await exchange(env.url, request_bytes("GET", target, headers=[
            ("host", "127.0.0.1"), ("authorization", f"Bearer {ADMIN_KEY}")]))
        assert_error_object(answer, 404)
    # Still healthy, nothing deleted: the admin account is there, alice's key works.
    async with env.client() as admin, env.client(secret) as own:
        assert (await admin.get("/admin/v1/accounts/admin")).status_code == 200
        assert (await own.get("/v1/me")).status_code == 200
    assert "Traceback" not in caplog.text


# ------------------------------------------------------------ crossing accounts

async def test_a_user_key_reaches_nothing_of_anyone_else(env: Env) -> None:
    alice, alice_key = await user(env, "alice")
    bob, bob_key = await user(env, "bob", "operator")
    group = await env.service.create_group(bob.id, "bobs")
    _code, invite = await env.service.create_invite("bobs", bob.id)
    bob_keys = await env.service.list_keys(bob.id)
    async with env.client(alice_key) as http:
        # Every admin route: 401 (an API key is not the admin key).
        for method, path in (("GET", "/admin/v1/accounts"), ("GET", "/admin/v1/keys"),
                             ("POST", "/admin/v1/credits/top-up"),
                             ("GET", "/admin/v1/earnings"), ("GET", "/admin/v1/ledger/check")):
            assert_error(await http.request(method, path, json={
                "account": alice.id, "amount": "100"}), 401, "invalid_admin_key")
        # Bob's key id: 404 exactly like an unknown id; bob's key still works.
        for key in bob_keys:
            gone = assert_error(await http.delete(f"/v1/me/keys/{key.id}"), 404)
            unknown = assert_error(await http.delete("/v1/me/keys/key_nope"), 404)
            assert gone["code"] == unknown["code"]
            assert key.id not in gone["message"] or "key_nope" in unknown["message"]
        # A key in bob's group: 403; an invite to it or a join token for it: 403 (user).
        assert_error(await http.post("/v1/me/keys", json={"group": "bobs"}), 403)
        assert_error(await http.post("/v1/me/groups/bobs/invites", json={}), 403)
        assert_error(await http.post("/v1/me/join-tokens", json={"group": "bobs"}), 403)
        assert_error(await http.get("/v1/me/earnings"), 403)
        # /v1/me shows alice only.
        me = (await http.get("/v1/me")).json()
        assert me["id"] == alice.id and me["groups"] == []
        assert bob.id not in (await http.get("/v1/me/keys")).text
    async with env.client(bob_key) as http:
        assert (await http.get("/v1/me")).status_code == 200
    assert (await env.service.get_group(group.id)).members == 1
    assert [i.uses for i in await env.service.list_invites("bobs")] == [invite.uses]


async def test_an_operator_sees_only_its_own_earnings(env: Env, database: Database) -> None:
    a, a_key = await user(env, "op-a", "operator")
    b, _b_key = await user(env, "op-b", "operator")
    payer, _ = await user(env, "payer", credit=1_000_000)
    record_earning(database, payer.id, b.id, "req_b", 5_000, 500)
    async with env.client(a_key) as http:
        for query in ("", f"?account={b.id}", "?account=admin", f"?owner={b.id}"):
            response = await http.get("/v1/me/earnings" + query)
            assert response.status_code == 200, response.text
            report = response.json()
            assert report["account_id"] == a.id
            assert all(row.get("owner_id", a.id) == a.id
                       for row in report["report"]["operators"] + report["report"]["nodes"])
        assert_error(await http.get("/v1/me/earnings?since=NaN"), 400)
        assert "req_b" not in response.text and b.id not in response.text
    async with env.client() as admin:  # the admin sees b's earning: the check above bites
        assert b.id in (await admin.get("/admin/v1/earnings")).text


def record_earning(database: Database, payer: str, owner: str, request_id: str,
                   charged: int, fee: int) -> None:
    """What the credits plugin writes when a request settles (a usage row and the entry
    paying the node's owner)."""

    def write(tx: Tx) -> None:
        tx.run("INSERT INTO usage (request_id, ts, account_id, key_id, model, node_id, "
               "owner_id, endpoint, stream, prompt_tokens, completion_tokens, estimated, "
               "price_input, price_output, cost, charged, earned, fee, status, latency_ms) "
               "VALUES (?, ?, ?, 'k', 'm', 'node-b', ?, 'chat/completions', 0, 10, 20, 0, "
               "1, 1, ?, ?, ?, ?, 'ok', 1.0)",
               (request_id, clock.wall(), payer, owner, charged, charged, charged - fee, fee))
        post(tx, f"settle:{request_id}", "settle",
             [(account_book(payer), -charged), (earnings_book(owner), charged - fee),
              (FEES, fee)], request_id=request_id)

    database.write_sync(write)


async def test_an_operator_cannot_mint_for_another_operators_group(env: Env) -> None:
    _a, a_key = await user(env, "op-a", "operator")
    b, _b_key = await user(env, "op-b", "operator")
    group = await env.service.create_group(b.id, "b-private", public_nodes=False)
    async with env.client(a_key) as http:
        for ident in (group.name, group.id):
            assert_error(await http.post("/v1/me/join-tokens",
                                         json={"group": ident, "name": "sneak"}), 403)
            assert_error(await http.post(f"/v1/me/groups/{ident}/invites",
                                         json={"max_uses": 1000}), 403)
        # Taking the name is a conflict, not a takeover.
        assert_error(await http.post("/v1/me/groups", json={"name": "b-private"}), 409)
        # Its own public token works.
        minted = await http.post("/v1/me/join-tokens", json={"name": "mine"})
        assert minted.status_code == 201, minted.text
    # A minted join token is neither the admin key nor an API key.
    async with env.client(minted.json()["token"]) as http:
        assert_error(await http.get("/admin/v1/accounts"), 401, "invalid_admin_key")
        assert_error(await http.get("/v1/models"), 401, "invalid_api_key")
        assert_error(await http.get("/v1/me"), 401, "invalid_api_key")
    assert await env.service.list_join_tokens(b.id) == []
    assert await env.service.list_invites(group.id) == []


async def test_self_service_keys_are_capped_even_when_made_at_once(
        env: Env, database_url: str) -> None:
    alice, key = await user(env, "alice")
    for i in range(MAX_SELF_SERVICE_KEYS - 6):  # with "main": 5 short of the cap
        await env.service.create_key(alice.id, f"k{i}")
    statuses: list[int] = []

    async def make(http: httpx.AsyncClient) -> None:
        response = await http.post("/v1/me/keys", json={"name": "burst"})
        if response.status_code != 201:
            assert_error(response, 409, "too_many_keys")
        statuses.append(response.status_code)

    burst = 30
    async with env.client(key) as http, trio.open_nursery() as nursery:
        for _ in range(burst):
            nursery.start_soon(make, http)
    made = statuses.count(201)
    active = len([k for k in await env.service.list_keys(alice.id) if k.revoked_at is None])
    assert active == MAX_SELF_SERVICE_KEYS - 5 + made
    if not database_url.startswith("postgresql"):
        assert made == 5  # one writer: the count is exact
    else:  # the documented bound: concurrent creations pass the cap by at most their number
        assert 5 <= made <= 5 + burst
    async with env.client(key) as http:  # once over, every further one is refused
        assert_error(await http.post("/v1/me/keys", json={}), 409, "too_many_keys")


# ------------------------------------------------------------ invite and credit codes

async def redeem_at_once(env: Env, keys: list[str], code: str) -> list[int]:
    """Every key redeems ``code`` at the same time; the statuses they got (a refusal
    must be 410 ``used_up``)."""
    statuses: list[int] = []

    async def redeem(secret: str) -> None:
        async with env.client(secret) as http:
            response = await http.post("/v1/me/redeem", json={"code": code})
            if response.status_code != 200:
                assert_error(response, 410, "used_up")
            statuses.append(response.status_code)

    async with trio.open_nursery() as nursery:
        for secret in keys:
            nursery.start_soon(redeem, secret)
    return statuses


async def test_invite_codes_race_repeat_expire_and_prefixes(env: Env, database: Database
                                                           ) -> None:
    owner, _ = await user(env, "owner", "operator")
    await env.service.create_group(owner.id, "club")
    code, invite = await env.service.create_invite("club", owner.id, max_uses=3)
    members = [await user(env, f"m{i}") for i in range(12)]
    statuses = await redeem_at_once(env, [secret for _account, secret in members], code)
    assert statuses.count(200) == 3
    assert [i.uses for i in await env.service.list_invites("club")] == [3]

    # Twice by one member: idempotent, no extra use (and still 200, not a 500).
    first, first_key = await user(env, "twice")
    code2, invite2 = await env.service.create_invite("club", owner.id, max_uses=2)
    async with env.client(first_key) as http:
        for _ in range(3):
            assert (await http.post("/v1/me/redeem", json={"code": code2})).status_code == 200
        # A prefix alone, the visible prefix, a near miss: 404 / 400, never 500.
        for probe in ("ti-tooti-", invite2.prefix, code2[:-1], code2 + "x",
                      "ti-tooti-" + "0" * 5000, "tc-tooti-", " " + code2[:12] + " "):
            response = await http.post("/v1/me/redeem", json={"code": probe})
            assert_error(response, (400, 404))
            assert code2 not in response.text
    assert [i.uses for i in await env.service.list_invites("club") if i.id == invite2.id] == [1]
    assert first.id

    # Revoked: 410 revoked, for a new member and (no use left to take) idempotently.
    code4, invite4 = await env.service.create_invite("club", owner.id, max_uses=5)
    await env.service.revoke_invite(invite4.id)
    _other, other_key = await user(env, "other")
    async with env.client(other_key) as http:
        assert_error(await http.post("/v1/me/redeem", json={"code": code4}), 410, "revoked")
        assert (await http.get("/v1/me")).json()["groups"] == []

    # Expired: 410 expired (the row's expiry moved into the past).
    code3, invite3 = await env.service.create_invite("club", owner.id, max_uses=5,
                                                     expires_at=clock.wall() + 3600)

    def expire(tx: Tx) -> None:
        tx.run("UPDATE invites SET expires_at = ? WHERE id = ?", (clock.wall() - 1, invite3.id))

    await database.write(expire)
    _late, late_key = await user(env, "late")
    async with env.client(late_key) as http:
        assert_error(await http.post("/v1/me/redeem", json={"code": code3}), 410, "expired")
        me = (await http.get("/v1/me")).json()
        assert me["groups"] == []
    assert invite.id


async def test_credit_codes_race_repeat_expire_and_prefixes(env: Env, database: Database
                                                           ) -> None:
    code, info = await env.service.create_credit_code(5_000_000, "admin")
    redeemers = [await user(env, f"r{i}") for i in range(10)]
    results = await redeem_at_once(env, [secret for _account, secret in redeemers], code)
    assert results.count(200) == 1
    balances = [(await env.service.get_account(a.id)).balance for a, _ in redeemers]
    assert sorted(balances) == [0] * 9 + [5_000_000]
    # Again by the winner: 410, balance unchanged.
    winner = next(s for (a, s), b in zip(redeemers, balances, strict=True) if b)
    async with env.client(winner) as http:
        assert_error(await http.post("/v1/me/redeem", json={"code": code}), 410, "used_up")
        for probe in ("tc-tooti-", info.prefix, code[:-2], code.upper(), ""):
            response = await http.post("/v1/me/redeem", json={"code": probe})
            assert_error(response, (400, 404))
    # Through the admin route too, twice: the second is 410.
    code2, info2 = await env.service.create_credit_code(1_000_000, "admin")
    async with env.client() as admin:
        ok = await admin.post("/admin/v1/credits/redeem", json={"code": code2,
                                                                "account": "r0"})
        assert ok.status_code == 200, ok.text
        assert_error(await admin.post("/admin/v1/credits/redeem",
                                      json={"code": code2, "account": "r1"}), 410, "used_up")
    # Expired: 410 and no credit.
    code3, info3 = await env.service.create_credit_code(
        1_000_000, "admin", expires_at=clock.wall() + 3600)

    def expire(tx: Tx) -> None:
        tx.run("UPDATE credit_codes SET expires_at = ? WHERE id = ?",
               (clock.wall() - 1, info3.id))

    await database.write(expire)
    r2 = redeemers[2][0]
    async with env.client(redeemers[2][1]) as http:
        assert_error(await http.post("/v1/me/redeem", json={"code": code3}), 410, "expired")
    assert (await env.service.get_account(r2.id)).balance == balances[2]
    assert info2.id and info.id


# ------------------------------------------------------------ a flood of wrong keys

def forged() -> str:
    """A secret of an API key's exact shape whose checksum is wrong."""
    secret = generate(API_KEY)
    return secret[:-1] + ("A" if secret[-1] != "A" else "B")


class CountingDatabase:
    """A database that counts the reads running at once (the rest passes through)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.running = 0
        self.most = 0

    async def read(self, fn: Any) -> Any:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            return await self.db.read(fn)
        finally:
            self.running -= 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


async def test_a_flood_of_wrong_keys_costs_the_database_little(env: Env) -> None:
    keys = env.keys
    assert len(forged()) == len(generate(API_KEY)) and not is_api_key(forged().encode())
    # Few connections, reused (new connections from one address are rate limited).
    async with env.client(None, limits=httpx.Limits(max_connections=8)) as http:
        base = keys.lookups
        # 1,500 requests with keys that cannot be ours (another prefix, too long, a wrong
        # checksum): no lookup at all.
        shapes = [f"sk-other-{i}" for i in range(500)] + [
            "sk-tooti-" + "a" * 300 + str(i) for i in range(500)] + [
            forged() for _ in range(500)]
        for chunk in range(0, len(shapes), 500):
            async with trio.open_nursery() as nursery:
                for secret in shapes[chunk:chunk + 500]:
                    nursery.start_soon(_refused, http, secret)
        assert keys.lookups == base
        # 500 requests with one well-formed unknown key: one lookup per negative-cache
        # lifetime (NEGATIVE_TTL, 2 s), not one per request.
        wrong = generate(API_KEY)
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(500):
                nursery.start_soon(_refused, http, wrong)
        elapsed = trio.current_time() - started
        assert 1 <= keys.lookups - base <= 1 + elapsed / keys.negative_ttl
    # Straight at the directory: 10,000 distinct forged keys cost nothing; 1,000
    # distinct well-formed unknown keys cost one lookup each (a digest is only known by
    # asking), at most MAX_LOOKUPS at once (plus the change poller's read).
    counting = CountingDatabase(keys.db)
    keys.db = counting  # type: ignore[assignment]
    before = keys.lookups
    async with trio.open_nursery() as nursery:
        for _ in range(10_000):
            nursery.start_soon(_unknown, keys, forged().encode())
    assert keys.lookups == before
    async with trio.open_nursery() as nursery:
        for _ in range(1_000):
            nursery.start_soon(_unknown, keys, generate(API_KEY).encode())
    assert keys.lookups - before == 1_000
    assert counting.most <= MAX_LOOKUPS + 1


async def _refused(http: httpx.AsyncClient, secret: str) -> None:
    response = await http.get("/v1/models", headers={"authorization": f"Bearer {secret}"})
    assert response.status_code == 401
    assert secret not in response.text


async def _unknown(keys: KeyDirectory, secret: bytes) -> None:
    assert await keys.verify(secret) is None


# ------------------------------------------------------------ header forms

async def test_authorization_and_x_api_key_forms_and_precedence(env: Env) -> None:
    _alice, key = await user(env, "alice")

    async def status(*headers: tuple[str, str]) -> int:
        """GET /v1/models with exactly these headers, written by hand on a new socket."""
        answer = await exchange(env.url, request_bytes(
            "GET", "/v1/models", headers=[("host", "127.0.0.1"), *headers]))
        if answer.status != 200:
            error = assert_error_object(answer, 401)
            assert error["code"] == "invalid_api_key", error
            assert answer.headers["www-authenticate"] == "Bearer"
            assert key.encode() not in answer.body
        return answer.status

    assert await status(("authorization", f"Bearer {key}")) == 200
    assert await status(("authorization", f"bearer {key}")) == 200
    assert await status(("Authorization", f"BEARER   {key}  ")) == 200
    assert await status(("x-api-key", key)) == 200
    assert await status(("X-Api-Key", f" {key} ")) == 200
    # "Bearer" without a key, or another scheme: the x-api-key is used.
    assert await status(("authorization", "Bearer"), ("x-api-key", key)) == 200
    assert await status(("authorization", "Bearer  "), ("x-api-key", key)) == 200
    assert await status(("authorization", f"Basic {key}"), ("x-api-key", key)) == 200
    # A bearer key wins over x-api-key: a wrong bearer is 401 even with a right one.
    assert await status(("authorization", "Bearer sk-tooti-wrong"), ("x-api-key", key)) == 401
    # Two Authorization headers: the first one counts.
    assert await status(("authorization", f"Bearer {key}"),
                        ("authorization", "Bearer sk-tooti-wrong")) == 200
    assert await status(("authorization", "Bearer sk-tooti-wrong"),
                        ("authorization", f"Bearer {key}")) == 401
    # Odd forms are not keys: a tab, the bare scheme, no scheme, a byte past the key,
    # an empty x-api-key, the key twice.
    assert await status(("authorization", f"Bearer\t{key}")) == 401
    assert await status(("authorization", "Bearer")) == 401
    assert await status(("authorization", key)) == 401
    assert await status(("authorization", f"Bearer {key}\u00e9")) == 401
    assert await status(("authorization", f"Bearer {key} {key}")) == 401
    assert await status(("x-api-key", "")) == 401
    assert await status(("authorization", "Bearer " + "A" * 6000)) == 401


# ------------------------------------------------------------ amounts

BAD_AMOUNTS: list[dict[str, Any]] = [
    {"amount": 1.5}, {"amount": 10}, {"amount": True}, {"amount": "-5"}, {"amount": "1e9"},
    {"amount": "NaN"}, {"amount": "Infinity"}, {"amount": "0"}, {"amount": "0.0000001"},
    {"amount": "1" * 40}, {"amount": "10000000000"}, {"amount": "1,5"}, {"amount": "٣"},
    {"amount": ""}, {"amount": None},
    {"amount_micros": 1.5}, {"amount_micros": 1e6}, {"amount_micros": True},
    {"amount_micros": -1}, {"amount_micros": 0}, {"amount_micros": 10**15 + 1},
    {"amount_micros": 10**30}, {"amount_micros": "1000"},
    {"amount": "1", "amount_micros": 1_000_000}, {},
]


async def test_bad_amounts_are_400_and_move_nothing(env: Env) -> None:
    alice, _key = await user(env, "alice", credit=1_000_000)
    async with env.client() as admin:
        for amount in BAD_AMOUNTS:
            for path, extra in (("/admin/v1/credits/top-up", {"account": alice.id}),
                                ("/admin/v1/credits/codes", {}),
                                ("/admin/v1/earnings/payouts", {"account": alice.id})):
                response = await admin.post(path, json={**extra, **amount})
                assert_error(response, 400)
        for body in ({"account": alice.id, "budget_day": "-1"},
                     {"account": alice.id, "budget_day_micros": 2.5},
                     {"account": alice.id, "budget_month": "NaN"},
                     {"account": alice.id, "rpm": 1e3}, {"account": alice.id, "rpm": -1},
                     {"account": alice.id, "tpm": 10**16},
                     {"account": alice.id, "expires_in": 0},
                     {"account": alice.id, "expires_in": 1.5},
                     {"account": alice.id, "expires_at": 1e308},
                     {"account": alice.id, "expires_at": -1},
                     {"account": alice.id, "expires_at": "tomorrow"},
                     {"account": alice.id, "expires_at": True}):
            assert_error(await admin.post("/admin/v1/keys", json=body), 400)
        for raw in (b'{"account": "alice", "amount_micros": 1e400}',
                    b'{"account": "alice", "amount_micros": NaN}',
                    b'{"account": "alice", "amount_micros": 99999999999999999999999999}'):
            assert_error(await admin.post("/admin/v1/credits/top-up", content=raw), 400)
        for raw in (b'{"account": "alice", "expires_at": 1e400}',
                    b'{"account": "alice", "expires_at": -1e400}'):
            assert_error(await admin.post("/admin/v1/keys", content=raw), 400)
        for raw in (b'{"expires_at": 1e400}', b'{"max_uses": 1e400}'):
            assert_error(await admin.post("/admin/v1/invites", content=raw), 400)
        for since in ("NaN", "inf", "-inf", "1e400", "9999-99-99", "x" * 5000):
            assert_error(await admin.get(f"/admin/v1/earnings?since={since}"), 400)
        # An idempotency key reused for another account or amount moves nothing.
        first = await admin.post("/admin/v1/credits/top-up", json={
            "account": alice.id, "amount": "2", "idem_key": "once"})
        assert first.status_code == 200, first.text
        for body in ({"account": "admin", "amount": "2"}, {"account": alice.id, "amount": "3"}):
            assert_error(await admin.post("/admin/v1/credits/top-up", json={
                **body, "idem_key": "once"}), 409, "idempotency_conflict")
        again = await admin.post("/admin/v1/credits/top-up", json={
            "account": alice.id, "amount": "2", "idem_key": "once"})
        assert again.json()["balance_micros"] == 3_000_000
    assert (await env.service.get_account(alice.id)).balance == 3_000_000
    assert await env.service.list_credit_codes() == []
    assert len(await env.service.list_keys(alice.id)) == 1


# ------------------------------------------------------------ reservations

async def test_an_enormous_max_tokens_at_the_highest_price_is_402(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    dear = SimulatedBackend(BackendSettings(type="simulated", models=["dear"],
                                            price_input=MAX_PRICE, price_output=MAX_PRICE))
    await env.network.add_node([dear], node_id="dear-node")
    alice, key = await user(env, "alice", credit=10_000_000)
    limited_key, _limited = await env.service.create_key(
        alice.id, "budgeted", limits=_budget(5_000_000))
    async with env.client(key) as http, env.client(limited_key) as budgeted:
        for max_tokens in (2**31, 2**53, 2**63 - 1, 2**64, 10**30):
            body = {**CHAT, "model": "dear", "max_tokens": max_tokens}
            response = await http.post("/v1/chat/completions", json=body)
            assert_error(response, (400, 402))
            response = await budgeted.post("/v1/chat/completions", json=body)
            assert_error(response, (400, 402, 429))
            # At price zero the bound costs nothing: served (or refused as bad input).
            free = await http.post("/v1/chat/completions", json={**body, "model": "tooti-sim"})
            assert free.status_code == 200 or assert_error(free, 400)
            for n in (2**31, 2**62):
                response = await http.post("/v1/chat/completions", json={
                    **CHAT, "model": "dear", "max_tokens": 2**31, "n": n})
                assert_error(response, (400, 402))
        # A modest request is still served, and the ledger balances.
        assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
    async with env.client() as admin:
        check = (await admin.get("/admin/v1/ledger/check")).json()
    assert check["ok"], check
    # Every refusal came before any node was used: nothing was charged at all.
    assert (await env.service.get_account(alice.id)).balance == 10_000_000
    assert "Traceback" not in caplog.text


def _budget(day: int) -> Any:
    from tooti.accounts.records import Limits
    return Limits(budget_day=day)


# ------------------------------------------------------------ model probing

async def test_a_key_limited_to_models_learns_nothing_of_others(env: Env) -> None:
    alice = await env.service.create_account("alice")
    await env.service.top_up(alice.id, 10_000_000, idem_key="seed")
    secret, _ = await env.service.create_key(alice.id, "narrow", models=("tooti-sim",))
    async with env.client(secret) as http:
        existing = assert_error(await http.post("/v1/chat/completions", json={
            **CHAT, "model": "other"}), 403, "model_not_allowed")
        missing = assert_error(await http.post("/v1/chat/completions", json={
            **CHAT, "model": "no-such-model"}), 403, "model_not_allowed")
        assert existing["message"].replace("other", "X") == \
            missing["message"].replace("no-such-model", "X")
        # Through fallbacks too: an allowed model with another one behind it.
        fallback = await http.post("/v1/chat/completions", json={
            **CHAT, "models": ["tooti-sim", "other"]})
        assert_error(fallback, 403, "model_not_allowed")
        listed = (await http.get("/v1/models")).json()
        assert [m["id"] for m in listed["data"]] == ["tooti-sim"]
        assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200


# ------------------------------------------------------------ secrets

async def test_no_secret_in_answers_or_logs(env: Env, caplog: pytest.LogCaptureFixture
                                            ) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    secrets: list[str] = [ADMIN_KEY]
    op, op_key = await user(env, "op", "operator", credit=3_000_000)
    secrets.append(op_key)
    async with env.client(op_key) as http:
        made = await http.post("/v1/me/keys", json={"name": "second"})
        second = made.json()["key"]
        secrets.append(second)
        group = await http.post("/v1/me/groups", json={"name": "club"})
        assert group.status_code == 201
        invite = (await http.post("/v1/me/groups/club/invites", json={"max_uses": 2})).json()
        secrets.append(invite["code"])
        token = (await http.post("/v1/me/join-tokens", json={"group": "club"})).json()
        secrets.append(token["token"])
        seen += [(await http.get("/v1/me")).text, (await http.get("/v1/me/keys")).text]
        seen.append((await http.post("/v1/chat/completions", json=CHAT)).text)
        # Refusals that carry a secret in the request.
        for wrong in (second + "x", invite["code"] + "x", token["token"]):
            seen.append((await http.post("/v1/me/redeem", json={"code": wrong})).text)
    async with env.client() as admin:
        code = (await admin.post("/admin/v1/credits/codes", json={"amount": "1"})).json()
        secrets.append(code["code"])
        for path in ("/admin/v1/accounts", "/admin/v1/keys", "/admin/v1/groups",
                     "/admin/v1/invites?group=club", "/admin/v1/join-tokens",
                     "/admin/v1/credits/codes", "/admin/v1/earnings",
                     "/admin/v1/earnings/export", "/admin/v1/ledger/check",
                     "/admin/v1/requests", "/metrics"):
            response = await admin.get(path)
            assert response.status_code == 200, (path, response.text)
            seen.append(response.text)
        seen.append((await admin.post("/admin/v1/keys", json={
            "account": op.id, "name": "k"}, headers={"x-api-key": second})).text)
    for wrong_admin in (ADMIN_KEY + "x", op_key):
        async with env.client(wrong_admin) as http:
            seen.append((await http.get("/admin/v1/accounts")).text)
    text = "\n".join(seen) + caplog.text
    for secret in secrets:
        tail = secret[-20:]
        where = text.find(tail)
        assert where < 0, (secret[:12], repr(text[max(0, where - 300):where + 40]))
