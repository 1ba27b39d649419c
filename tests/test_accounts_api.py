"""The accounts admin API (``/admin/v1/accounts``, keys, groups, invites, join tokens,
credits, earnings, ledger) and self-service (``/v1/me``) on a real gateway on loopback,
with a real database of each kind (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio

from tooti import clock
from tooti.accounts.database import Database, Tx
from tooti.accounts.journal import FEES, account_book, earnings_book, post
from tooti.accounts.service import AccountService
from tooti.gateway.app import Gateway
from tooti.settings import GatewaySettings, GroupSettings, TunnelSettings

KEY = "adm-accounts-secret"
ADMIN = {"authorization": f"Bearer {KEY}"}


class Env:
    """A running gateway with an accounts database, and an admin client to it."""

    def __init__(self, gateway: Gateway, url: str, service: AccountService) -> None:
        self.gateway = gateway
        self.url = url
        self.service = service

    def client(self, key: str | None = KEY) -> httpx.AsyncClient:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=10)


async def start(nursery: trio.Nursery, database: Database, auth: str = "keys",
                **settings: Any) -> Env:
    service = AccountService(database)
    await service.ensure_admin()
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0", admin_key=KEY, auth=auth,
                                      **settings),
                      TunnelSettings(), database=database)
    urls = await nursery.start(gateway.serve)
    return Env(gateway, urls[0], service)


@pytest.fixture
async def env(nursery: trio.Nursery, database: Database) -> AsyncIterator[Env]:
    running = await start(nursery, database)
    yield running
    running.gateway.shutdown()


def assert_error(response: httpx.Response, status: int, code: str | None = None,
                 param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


async def make_account(http: httpx.AsyncClient, name: str, role: str = "user"
                       ) -> dict[str, Any]:
    response = await http.post("/admin/v1/accounts", json={"name": name, "role": role})
    assert response.status_code == 201, response.text
    account: dict[str, Any] = response.json()
    return account


async def make_key(http: httpx.AsyncClient, account: str, **body: Any) -> dict[str, Any]:
    response = await http.post("/admin/v1/keys", json={"account": account, **body})
    assert response.status_code == 201, response.text
    key: dict[str, Any] = response.json()
    return key


# ------------------------------------------------------------ the admin key

ROUTES = [
    ("POST", "/admin/v1/accounts"), ("GET", "/admin/v1/accounts"),
    ("GET", "/admin/v1/accounts/admin"), ("PATCH", "/admin/v1/accounts/admin"),
    ("POST", "/admin/v1/keys"), ("GET", "/admin/v1/keys"), ("DELETE", "/admin/v1/keys/x"),
    ("POST", "/admin/v1/groups"), ("GET", "/admin/v1/groups"),
    ("GET", "/admin/v1/groups/g/members"), ("DELETE", "/admin/v1/groups/g/members/a"),
    ("POST", "/admin/v1/invites"), ("GET", "/admin/v1/invites"),
    ("DELETE", "/admin/v1/invites/x"), ("POST", "/admin/v1/invites/redeem"),
    ("POST", "/admin/v1/join-tokens"), ("GET", "/admin/v1/join-tokens"),
    ("DELETE", "/admin/v1/join-tokens/x"), ("POST", "/admin/v1/credits/top-up"),
    ("POST", "/admin/v1/credits/codes"), ("GET", "/admin/v1/credits/codes"),
    ("POST", "/admin/v1/credits/redeem"), ("GET", "/admin/v1/earnings"),
    ("GET", "/admin/v1/earnings/export"), ("POST", "/admin/v1/earnings/payouts"),
    ("GET", "/admin/v1/ledger/check"),
]


async def test_every_route_needs_the_admin_key(env: Env) -> None:
    _secret, user_key = await env.service.create_key("admin", "k")
    async with env.client(None) as anonymous, env.client("wrong") as wrong, \
            env.client(_secret) as api_key:
        for method, path in ROUTES:
            for http in (anonymous, wrong, api_key):  # an API key is not the admin key
                response = await http.request(method, path, json={})
                assert_error(response, 401, "invalid_admin_key")
                assert response.headers["www-authenticate"] == "Bearer"
    # Nothing was created by the refused requests.
    assert [a.name for a in await env.service.list_accounts()] == ["admin"]
    assert user_key.revoked_at is None


async def test_unknown_route_and_wrong_method(env: Env) -> None:
    async with env.client() as http:
        assert_error(await http.get("/admin/v1/accounts/a/b"), 404, "not_found")
        assert_error(await http.put("/admin/v1/accounts"), 405, "method_not_allowed")
        assert_error(await http.delete("/admin/v1/ledger/check"), 405, "method_not_allowed")
        # The admin API's own routes still answer beside the accounts ones.
        assert (await http.get("/admin/v1/peers")).status_code == 200


# ------------------------------------------------------------ accounts

async def test_accounts_create_list_show_patch(env: Env) -> None:
    async with env.client() as http:
        alice = await make_account(http, "alice", "operator")
        assert alice["name"] == "alice" and alice["role"] == "operator"
        assert alice["status"] == "active"
        assert (alice["balance_micros"], alice["balance"]) == (0, "0")
        assert (alice["held_micros"], alice["held"]) == (0, "0")  # no lease holds any
        assert alice["id"].startswith("acct_")

        assert_error(await http.post("/admin/v1/accounts", json={"name": "alice"}), 409)
        assert_error(await http.post("/admin/v1/accounts", json={"name": "b", "role": "god"}),
                     400, param="role")
        assert_error(await http.post("/admin/v1/accounts",
                                     json={"name": "b", "nickname": "x"}), 400,
                     param="nickname")
        assert_error(await http.post("/admin/v1/accounts", json={}), 400, param="name")
        assert_error(await http.post("/admin/v1/accounts", content=b"{not json"), 400,
                     "invalid_json")
        assert_error(await http.post("/admin/v1/accounts", json=["alice"]), 400)
        too_big = {"name": "x" * (70 * 1024)}
        assert_error(await http.post("/admin/v1/accounts", json=too_big), 413)

        listed = (await http.get("/admin/v1/accounts")).json()
        assert listed["object"] == "list"
        assert {a["name"] for a in listed["data"]} == {"admin", "alice"}
        by_id = (await http.get(f"/admin/v1/accounts/{alice['id']}")).json()
        by_name = (await http.get("/admin/v1/accounts/alice")).json()
        assert by_id == by_name == alice
        assert_error(await http.get("/admin/v1/accounts/nobody"), 404, "not_found")

        suspended = await http.patch("/admin/v1/accounts/alice", json={"status": "suspended"})
        assert suspended.status_code == 200 and suspended.json()["status"] == "suspended"
        limited = await http.patch("/admin/v1/accounts/alice",
                                   json={"status": "active", "limits": {"rpm": 60, "tpm": 1000}})
        assert limited.json()["status"] == "active"
        assert limited.json()["limits"]["rpm"] == 60
        assert limited.json()["limits"]["tpm"] == 1000
        assert limited.json()["limits"]["concurrency"] is None
        assert_error(await http.patch("/admin/v1/accounts/alice",
                                      json={"limits": {"rpm": "many"}}), 400,
                     param="limits.rpm")
        assert_error(await http.patch("/admin/v1/accounts/alice",
                                      json={"limits": {"budget_day": 5}}), 400,
                     param="limits.budget_day")
        assert_error(await http.patch("/admin/v1/accounts/alice", json={"status": "gone"}),
                     400, param="status")
        assert_error(await http.patch("/admin/v1/accounts/nobody", json={}), 404)
    stored = await env.service.get_account(alice["id"])
    assert stored.limits.rpm == 60 and stored.status == "active"


# ------------------------------------------------------------ keys

async def test_key_secret_shown_once_then_revoked(env: Env) -> None:
    async with env.client() as http:
        await make_account(http, "bob")
        key = await make_key(http, "bob", name="laptop", models=["m1"], rpm=5,
                             budget_day="1.5", expires_in=3600)
        secret = key["key"]
        assert secret.startswith("sk-tooti-") and secret.startswith(key["prefix"])
        assert key["limits"]["rpm"] == 5
        assert (key["limits"]["budget_day_micros"], key["limits"]["budget_day"]) == (
            1_500_000, "1.5")
        assert key["models"] == ["m1"] and key["expires_at"] is not None

        listed = await http.get("/admin/v1/keys", params={"account": "bob"})
        assert [k["id"] for k in listed.json()["data"]] == [key["id"]]
        everything = await http.get("/admin/v1/keys")
        for response in (listed, everything):
            assert secret not in response.text and secret[len(key["prefix"]):] not in \
                response.text
            assert all("key" not in k for k in response.json()["data"])

        # The key works against /v1 (keys mode) until it is revoked.
        async with env.client(secret) as user:
            assert (await user.get("/v1/me")).json()["name"] == "bob"
            revoked = await http.delete(f"/admin/v1/keys/{key['id']}")
            assert revoked.status_code == 200 and revoked.json()["revoked"] is True
            keys = env.gateway.keys
            assert keys is not None
            with trio.fail_after(2):  # the directory's poller sees it within 2 s
                while (await user.get("/v1/me")).status_code != 401:
                    await keys.wait_polled()
        assert (await env.service.list_keys())[-1].revoked_at is not None

        assert_error(await http.delete("/admin/v1/keys/key_nope"), 404, "not_found")
        assert_error(await http.post("/admin/v1/keys", json={"account": "nobody"}), 404)
        assert_error(await http.post("/admin/v1/keys", json={}), 400, param="account")
        assert_error(await http.post("/admin/v1/keys", json={"account": "bob", "rpm": 1.5}),
                     400, param="rpm")
        assert_error(await http.post("/admin/v1/keys", json={
            "account": "bob", "expires_in": 60, "expires_at": 9e9}), 400, param="expires_at")
        assert_error(await http.post("/admin/v1/keys", json={
            "account": "bob", "budget_month": "lots"}), 400, param="budget_month")
        assert_error(await http.post("/admin/v1/keys", json={
            "account": "bob", "group": "not-mine"}), 403)
        assert_error(await http.get("/admin/v1/keys", params={"account": "nobody"}), 404)


# ------------------------------------------------------------ groups, invites, join tokens

async def test_groups_invites_and_join_tokens(env: Env) -> None:
    async with env.client() as http:
        await make_account(http, "op", "operator")
        carol = await make_account(http, "carol")
        group = await http.post("/admin/v1/groups", json={"name": "lab", "owner": "op",
                                                          "public_nodes": False})
        assert group.status_code == 201, group.text
        assert group.json()["public_nodes"] is False
        assert_error(await http.post("/admin/v1/groups", json={"name": "x", "owner": "carol"}),
                     403)
        assert_error(await http.post("/admin/v1/groups", json={"name": "x", "owner": "ghost"}),
                     404)
        assert_error(await http.post("/admin/v1/groups", json={"name": "x", "owner": "op",
                                                               "public_nodes": "no"}),
                     400, param="public_nodes")
        assert (await http.get("/admin/v1/groups/lab")).json()["name"] == "lab"
        assert_error(await http.get("/admin/v1/groups/nope"), 404)
        assert [g["name"] for g in (await http.get("/admin/v1/groups")).json()["data"]] == [
            "lab"]

        invite = await http.post("/admin/v1/invites", json={"group": "lab", "max_uses": 2,
                                                             "expires_in": 600})
        assert invite.status_code == 201, invite.text
        code = invite.json()["code"]
        assert code.startswith("ti-tooti-")
        listed = await http.get("/admin/v1/invites", params={"group": "lab"})
        assert [i["id"] for i in listed.json()["data"]] == [invite.json()["id"]]
        assert code not in listed.text
        assert_error(await http.get("/admin/v1/invites"), 400, param="group")
        assert_error(await http.get("/admin/v1/invites", params={"group": "nope"}), 404)
        assert_error(await http.post("/admin/v1/invites", json={"group": "lab",
                                                                "max_uses": 0}),
                     400, param="max_uses")

        redeemed = await http.post("/admin/v1/invites/redeem",
                                   json={"code": code, "account": "carol"})
        assert redeemed.status_code == 200, redeemed.text
        assert redeemed.json()["group"]["name"] == "lab"
        members = (await http.get("/admin/v1/groups/lab/members")).json()["data"]
        assert {m["name"] for m in members} == {"op", "carol"}
        assert_error(await http.post("/admin/v1/invites/redeem",
                                     json={"code": "ti-tooti-forged", "account": "carol"}),
                     404)

        removed = await http.delete(f"/admin/v1/groups/lab/members/{carol['id']}")
        assert removed.status_code == 200
        members = (await http.get("/admin/v1/groups/lab/members")).json()["data"]
        assert [m["name"] for m in members] == ["op"]
        assert_error(await http.delete("/admin/v1/groups/lab/members/carol"), 404)

        assert (await http.delete(f"/admin/v1/invites/{invite.json()['id']}")).status_code \
            == 200
        assert_error(await http.post("/admin/v1/invites/redeem",
                                     json={"code": code, "account": "carol"}), 410)
        assert_error(await http.delete("/admin/v1/invites/inv_nope"), 404)

        token = await http.post("/admin/v1/join-tokens", json={"account": "op",
                                                               "group": "lab", "name": "gpu"})
        assert token.status_code == 201, token.text
        secret = token.json()["token"]
        assert secret.startswith("tj-tooti-") and token.json()["group"] == "lab"
        tokens = await http.get("/admin/v1/join-tokens", params={"account": "op"})
        assert [t["id"] for t in tokens.json()["data"]] == [token.json()["id"]]
        assert secret not in tokens.text
        assert_error(await http.post("/admin/v1/join-tokens", json={"account": "carol"}), 403)
        assert (await http.delete(f"/admin/v1/join-tokens/{token.json()['id']}")
                ).json()["revoked"] is True
        assert (await env.service.list_join_tokens())[0].revoked_at is not None
        assert_error(await http.delete("/admin/v1/join-tokens/jt_nope"), 404)


# ------------------------------------------------------------ credits, earnings, ledger

async def test_credits_top_up_codes_and_ledger(env: Env) -> None:
    async with env.client() as http:
        dave = await make_account(http, "dave")
        top = await http.post("/admin/v1/credits/top-up",
                              json={"account": "dave", "amount": "12.5", "idem_key": "t1"})
        assert top.status_code == 200, top.text
        assert (top.json()["balance_micros"], top.json()["balance"]) == (12_500_000, "12.5")
        again = await http.post("/admin/v1/credits/top-up",
                                json={"account": "dave", "amount": "12.5", "idem_key": "t1"})
        assert again.json()["balance_micros"] == 12_500_000  # the retry moved nothing
        micros = await http.post("/admin/v1/credits/top-up",
                                 json={"account": dave["id"], "amount_micros": 7})
        assert micros.json()["balance_micros"] == 12_500_007
        assert micros.json()["idem_key"]  # generated, so the caller could retry it

        for body, param in (
                ({"account": "dave"}, "amount"),
                ({"account": "dave", "amount": "1", "amount_micros": 1}, "amount"),
                ({"account": "dave", "amount": "1.1234567"}, "amount"),
                ({"account": "dave", "amount": "0"}, "amount"),
                ({"account": "dave", "amount": "-3"}, "amount"),
                ({"account": "dave", "amount": 5}, "amount"),
                ({"account": "dave", "amount_micros": 1.5}, "amount_micros"),
                ({"account": "dave", "amount_micros": True}, "amount_micros"),
                ({"account": "dave", "amount_micros": 0}, "amount_micros"),
                ({"account": "dave", "amount_micros": 10**16}, "amount_micros"),
                ({"amount": "1"}, "account")):
            assert_error(await http.post("/admin/v1/credits/top-up", json=body), 400,
                         param=param)
        assert_error(await http.post("/admin/v1/credits/top-up",
                                     json={"account": "nobody", "amount": "1"}), 404)

        code = await http.post("/admin/v1/credits/codes", json={"amount": "2.25"})
        assert code.status_code == 201, code.text
        secret = code.json()["code"]
        assert secret.startswith("tc-tooti-")
        assert code.json()["amount_micros"] == 2_250_000
        codes = await http.get("/admin/v1/credits/codes")
        assert [c["id"] for c in codes.json()["data"]] == [code.json()["id"]]
        assert secret not in codes.text
        redeemed = await http.post("/admin/v1/credits/redeem",
                                   json={"code": secret, "account": "dave"})
        assert redeemed.json()["balance_micros"] == 14_750_007
        assert_error(await http.post("/admin/v1/credits/redeem",
                                     json={"code": secret, "account": "dave"}), 410)
        assert_error(await http.post("/admin/v1/credits/redeem",
                                     json={"code": "tc-tooti-forged", "account": "dave"}), 404)

        check = await http.get("/admin/v1/ledger/check")
        assert check.status_code == 200, check.text
        body = check.json()
        assert body["ok"] is True and body["violations"] == []
        assert body["summary"]["issued_micros"] == 14_750_007
        assert body["summary"]["issued"] == "14.750007"
        assert body["summary"]["balances_micros"] == 14_750_007

        # Nothing earned yet: a payout is refused and moves nothing.
        assert_error(await http.post("/admin/v1/earnings/payouts",
                                     json={"account": "dave", "amount": "1"}), 409)
        assert_error(await http.post("/admin/v1/earnings/payouts",
                                     json={"account": "dave"}), 400, param="amount")
    assert (await env.service.get_account(dave["id"])).balance == 14_750_007


async def test_ledger_check_reports_a_violation(env: Env, database: Database) -> None:
    async with env.client() as http:
        erin = await make_account(http, "erin")
        await http.post("/admin/v1/credits/top-up", json={"account": "erin", "amount": "3"})
        assert (await http.get("/admin/v1/ledger/check")).json()["ok"] is True
        # Money created out of nothing: a book changed without a journal line.
        database.write_sync(lambda tx: tx.run(
            "UPDATE books SET balance = balance + 1 WHERE book = ?",
            (f"account:{erin['id']}",)))
        body = (await http.get("/admin/v1/ledger/check")).json()
    assert body["ok"] is False and body["violations"]


def record_earning(database: Database, payer: str, owner: str, request_id: str,
                   charged: int, fee: int, ts: float) -> None:
    """What the credits plugin writes when a request settles: a usage row and the entry
    moving what it was charged to the node owner's earnings and the gateway's fees."""

    def write(tx: Tx) -> None:
        tx.run("INSERT INTO usage (request_id, ts, account_id, key_id, model, node_id, "
               "owner_id, endpoint, stream, prompt_tokens, completion_tokens, estimated, "
               "price_input, price_output, cost, charged, earned, fee, status, latency_ms) "
               "VALUES (?, ?, ?, 'k', 'm', 'node-1', ?, 'chat/completions', 0, 10, 20, 0, "
               "1, 1, ?, ?, ?, ?, 'ok', 1.0)",
               (request_id, ts, payer, owner, charged, charged, charged - fee, fee))
        post(tx, f"settle:{request_id}", "settle",
             [(account_book(payer), -charged), (earnings_book(owner), charged - fee),
              (FEES, fee)], request_id=request_id)

    database.write_sync(write)


async def test_earnings_report_export_and_payout(env: Env, database: Database) -> None:
    async with env.client() as http:
        op = await make_account(http, "opal", "operator")
        payer = await make_account(http, "payer")
        await http.post("/admin/v1/credits/top-up", json={"account": "payer", "amount": "1"})
        record_earning(database, payer["id"], op["id"], "req_old", 2_000, 200, ts=1_000.0)
        record_earning(database, payer["id"], op["id"], "req_new", 1_000, 100,
                       ts=clock.wall())

        report = await http.get("/admin/v1/earnings", params={"since": "2020-01-01"})
        assert report.status_code == 200, report.text
        [operator] = report.json()["operators"]
        assert operator["owner_id"] == op["id"] and operator["requests"] == 1
        assert (operator["earned_micros"], operator["earned"]) == (900, "0.0009")
        assert operator["fee_micros"] == 100
        [node] = report.json()["nodes"]
        assert node["node_id"] == "node-1" and node["earned_micros"] == 900
        everything = (await http.get("/admin/v1/earnings")).json()
        assert everything["operators"][0]["earned_micros"] == 2_700
        other = (await http.get("/admin/v1/earnings", params={"account": "payer"})).json()
        assert other["operators"] == [] and other["nodes"] == []

        paid = await http.post("/admin/v1/earnings/payouts",
                               json={"account": "opal", "amount_micros": 700,
                                     "idem_key": "p1"})
        assert paid.status_code == 200, paid.text
        assert (paid.json()["earnings_micros"], paid.json()["earnings"]) == (2_000, "0.002")
        retried = await http.post("/admin/v1/earnings/payouts",
                                  json={"account": "opal", "amount_micros": 700,
                                        "idem_key": "p1"})
        assert retried.json()["earnings_micros"] == 2_000  # the retry paid nothing
        assert_error(await http.post("/admin/v1/earnings/payouts",
                                     json={"account": "opal", "amount": "1"}), 409)

        exported = await http.get("/admin/v1/earnings/export", params={"format": "json"})
        [row] = exported.json()["data"]
        assert (row["owner_id"], row["earned"], row["owed"], row["paid"]) == (
            op["id"], 2_700, 2_000, 700)
        csv = await http.get("/admin/v1/earnings/export", params={"format": "csv"})
        assert csv.headers["content-type"].startswith("text/csv")
        header, line = csv.text.strip().splitlines()
        assert header.startswith("owner_id,earned,owed,paid")
        assert line.startswith(f"{op['id']},2700,2000,700")

        assert_error(await http.get("/admin/v1/earnings/export", params={"format": "xml"}),
                     400, param="format")
        assert_error(await http.get("/admin/v1/earnings", params={"since": "last tuesday"}),
                     400, param="since")
        assert_error(await http.get("/admin/v1/earnings", params={"until": "nan"}),
                     400, param="until")
        assert (await http.get("/admin/v1/ledger/check")).json()["ok"] is True


# ------------------------------------------------------------ self-service

async def test_self_service_keys_are_ones_own(env: Env) -> None:
    async with env.client() as http:
        await make_account(http, "frank")
        await make_account(http, "grace")
        frank = (await make_key(http, "frank"))["key"]
        grace_key = await make_key(http, "grace", name="grace-main")
        await http.post("/admin/v1/credits/top-up", json={"account": "frank", "amount": "4"})

    async with env.client(frank) as me:
        info = (await me.get("/v1/me")).json()
        assert info["name"] == "frank" and info["balance_micros"] == 4_000_000
        assert info["balance"] == "4"
        assert info["usage"]["requests"] == 0 and info["usage"]["charged_micros"] == 0
        assert info["groups"] == []

        created = await me.post("/v1/me/keys", json={"name": "second", "tpm": 100})
        assert created.status_code == 201, created.text
        second = created.json()
        assert second["key"].startswith("sk-tooti-") and second["limits"]["tpm"] == 100
        listed = await me.get("/v1/me/keys")
        assert len(listed.json()["data"]) == 2
        assert second["key"] not in listed.text and frank not in listed.text
        assert grace_key["id"] not in listed.text  # only frank's keys

        # Another account's key id looks exactly like an unknown one, and stays active.
        other = await me.delete(f"/v1/me/keys/{grace_key['id']}")
        unknown = await me.delete("/v1/me/keys/key_0000000000000000")
        assert_error(other, 404, "not_found")
        assert_error(unknown, 404, "not_found")
        assert (await env.service.list_keys(grace_key["account_id"]))[0].revoked_at is None

        assert (await me.delete(f"/v1/me/keys/{second['id']}")).status_code == 200
        keys = await env.service.list_keys(info["id"])
        assert [k.revoked_at is not None for k in keys] == [False, True]

        assert_error(await me.post("/v1/me/keys", json={"group": "elsewhere"}), 403)
        assert_error(await me.post("/v1/me/keys", json={"account": "grace"}), 400,
                     param="account")
        assert_error(await me.post("/v1/me/groups", json={"name": "mine"}), 403)
        assert_error(await me.post("/v1/me/join-tokens", json={}), 403)
        assert_error(await me.get("/v1/me/earnings"), 403)
        assert_error(await me.get("/v1/me/nothing"), 404)
        # The admin API is not reachable with an API key.
        assert_error(await me.get("/admin/v1/accounts"), 401, "invalid_admin_key")


async def test_self_service_redeem_and_operator_routes(env: Env) -> None:
    async with env.client() as http:
        await make_account(http, "olga", "operator")
        await make_account(http, "hugo")
        olga = (await make_key(http, "olga"))["key"]
        hugo = (await make_key(http, "hugo"))["key"]
        credit = (await http.post("/admin/v1/credits/codes", json={"amount": "3"})).json()

    async with env.client(olga) as op, env.client(hugo) as user:
        group = await op.post("/v1/me/groups", json={"name": "olgas", "public_nodes": True})
        assert group.status_code == 201, group.text
        invite = await op.post("/v1/me/groups/olgas/invites", json={"max_uses": 1})
        assert invite.status_code == 201, invite.text
        token = await op.post("/v1/me/join-tokens", json={"group": "olgas", "name": "rig"})
        assert token.status_code == 201 and token.json()["token"].startswith("tj-tooti-")
        assert_error(await user.post("/v1/me/groups/olgas/invites", json={}), 403)

        joined = await user.post("/v1/me/redeem", json={"code": invite.json()["code"]})
        assert joined.status_code == 200, joined.text
        assert joined.json()["redeemed"] == "invite"
        assert joined.json()["group"]["name"] == "olgas"
        credited = await user.post("/v1/me/redeem", json={"code": credit["code"]})
        assert credited.json()["redeemed"] == "credit_code"
        assert credited.json()["balance_micros"] == 3_000_000
        assert_error(await user.post("/v1/me/redeem", json={"code": credit["code"]}), 410)
        assert_error(await user.post("/v1/me/redeem", json={"code": "hello"}), 400,
                     param="code")
        assert_error(await user.post("/v1/me/redeem", json={}), 400, param="code")

        me = (await user.get("/v1/me")).json()
        assert [g["name"] for g in me["groups"]] == ["olgas"]
        # A member may now bind a key to the group.
        grouped = await user.post("/v1/me/keys", json={"group": "olgas"})
        assert grouped.status_code == 201 and grouped.json()["group"] == "olgas"

        earned = await op.get("/v1/me/earnings")
        assert earned.status_code == 200, earned.text
        assert earned.json()["earnings_micros"] == 0
        assert earned.json()["report"]["operators"] == []


async def test_me_needs_a_key_on_an_open_gateway(nursery: trio.Nursery,
                                                 database: Database) -> None:
    running = await start(nursery, database, auth="open")
    async with running.client(None) as anonymous, running.client("made-up") as made_up:
        for http in (anonymous, made_up):
            for method, path in (("GET", "/v1/me"), ("GET", "/v1/me/keys"),
                                 ("POST", "/v1/me/redeem")):
                response = await http.request(method, path, json={})
                assert_error(response, 401, "invalid_api_key")
                assert response.headers["www-authenticate"] == "Bearer"
        # The open gateway still serves /v1 anonymously.
        assert (await anonymous.get("/v1/models")).status_code == 200
    running.gateway.shutdown()


# ------------------------------------------------------------ review fixes

STATIC_KEY = "legacy-static-group-key"


async def test_a_static_group_key_is_not_the_admin_account_in_self_service(
        nursery: trio.Nursery, database: Database) -> None:
    """A ``[gateway.groups.*].api_keys`` key routes to its group and nothing more: it
    never acts as the admin account on /v1/me (no keys, tokens, invites minted as it);
    the admin key does."""
    running = await start(nursery, database, groups={
        "private": GroupSettings(join_token="private-join", api_keys=[STATIC_KEY])})
    async with running.client() as http:
        await make_account(http, "owner-op", "operator")
        operator = (await make_key(http, "owner-op"))["key"]
    async with running.client(operator) as op:
        assert (await op.post("/v1/me/groups", json={"name": "opgroup"})).status_code == 201
    async with running.client(STATIC_KEY) as static:
        for method, path, body in (
                ("GET", "/v1/me", None), ("GET", "/v1/me/keys", None),
                ("POST", "/v1/me/keys", {}), ("POST", "/v1/me/join-tokens",
                                              {"group": "opgroup"}),
                ("POST", "/v1/me/groups/opgroup/invites", {}),
                ("POST", "/v1/me/groups", {"name": "taken"}),
                ("POST", "/v1/me/redeem", {"code": "ti-tooti-x"}),
                ("GET", "/v1/me/earnings", None)):
            response = await static.request(method, path, json=body)
            error = assert_error(response, 403, "forbidden")
            assert error["type"] == "permission_error", (path, error)
        # It still reaches /v1 as before (routed to its group).
        assert (await static.get("/v1/models")).status_code == 200
    assert await running.service.list_keys("admin") == []
    assert await running.service.list_join_tokens() == []
    async with running.client(KEY) as admin:  # the master credential is the admin account
        me = await admin.get("/v1/me")
        assert me.status_code == 200 and me.json()["role"] == "admin"
    running.gateway.shutdown()


async def test_a_configured_group_name_cannot_be_taken(nursery: trio.Nursery,
                                                       database: Database) -> None:
    running = await start(nursery, database, groups={
        "private": GroupSettings(join_token="private-join")})
    async with running.client() as http:
        await make_account(http, "taker", "operator")
        taker = (await make_key(http, "taker"))["key"]
        assert_error(await http.post("/admin/v1/groups", json={
            "name": "private", "owner": "taker"}), 409, "conflict")
    async with running.client(taker) as me:
        assert_error(await me.post("/v1/me/groups", json={"name": "private"}), 409,
                     "conflict")
        assert (await me.post("/v1/me/groups", json={"name": "mine"})).status_code == 201
    assert [g.name for g in await running.service.list_groups()] == ["mine"]
    running.gateway.shutdown()


async def test_a_key_made_with_a_key_is_never_more_than_it(env: Env) -> None:
    """Self-service keys inherit the calling key's limits, models and expiry, and may
    only narrow them."""
    expires = clock.wall() + 3600
    async with env.client() as http:
        await make_account(http, "narrow")
        parent = await make_key(http, "narrow", models=["a", "b"], rpm=10, tpm=1000,
                                budget_day="2", expires_at=expires)
    async with env.client(parent["key"]) as me:
        child = await me.post("/v1/me/keys", json={})
        assert child.status_code == 201, child.text
        made = child.json()
        assert made["models"] == ["a", "b"]
        assert made["limits"]["rpm"] == 10 and made["limits"]["tpm"] == 1000
        assert made["limits"]["budget_day_micros"] == 2_000_000
        assert made["limits"]["budget_month_micros"] is None  # the parent has none either
        assert made["expires_at"] == pytest.approx(expires)

        narrower = await me.post("/v1/me/keys", json={
            "models": ["a"], "rpm": 5, "budget_day": "1", "budget_month": "9",
            "expires_in": 60})
        assert narrower.status_code == 201, narrower.text
        assert narrower.json()["models"] == ["a"]
        assert narrower.json()["limits"]["rpm"] == 5
        assert narrower.json()["limits"]["budget_day_micros"] == 1_000_000
        assert narrower.json()["limits"]["budget_month_micros"] == 9_000_000

        for body, param in (({"models": ["a", "c"]}, "models"), ({"rpm": 11}, "rpm"),
                            ({"tpm": 1001}, "tpm"), ({"budget_day": "2.000001"},
                                                     "budget_day"),
                            ({"expires_in": 7200}, "expires_at")):
            error = assert_error(await me.post("/v1/me/keys", json=body), 403, "forbidden",
                                 param)
            assert error["type"] == "permission_error"
    assert len(await env.service.list_keys(parent["account_id"])) == 3


async def test_self_service_keys_per_account_are_capped(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from tooti.admin import self_service
    monkeypatch.setattr(self_service, "MAX_SELF_SERVICE_KEYS", 3)
    async with env.client() as http:
        await make_account(http, "capped")
        first = (await make_key(http, "capped"))["key"]
    async with env.client(first) as me:
        made = [await me.post("/v1/me/keys", json={}) for _ in range(2)]
        assert [r.status_code for r in made] == [201, 201]
        assert_error(await me.post("/v1/me/keys", json={}), 409, "too_many_keys")
        assert (await me.delete(f"/v1/me/keys/{made[0].json()['id']}")).status_code == 200
        assert (await me.post("/v1/me/keys", json={})).status_code == 201


async def test_a_reused_idempotency_key_is_a_409(env: Env) -> None:
    async with env.client() as http:
        await make_account(http, "idem-api")
        await make_account(http, "idem-other")
        body = {"account": "idem-api", "amount": "5", "idem_key": "inv-1"}
        first = await http.post("/admin/v1/credits/top-up", json=body)
        again = await http.post("/admin/v1/credits/top-up", json=body)
        assert first.status_code == again.status_code == 200
        assert again.json()["balance_micros"] == 5_000_000
        assert_error(await http.post("/admin/v1/credits/top-up", json={
            **body, "amount": "6"}), 409, "idempotency_conflict", "idem_key")
        assert_error(await http.post("/admin/v1/credits/top-up", json={
            **body, "account": "idem-other"}), 409, "idempotency_conflict")
        other = (await http.get("/admin/v1/accounts/idem-other")).json()
        assert other["balance_micros"] == 0
