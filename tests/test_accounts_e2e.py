"""End-to-end proofs of the accounts layer (issue 13): real gateways in this trio run on
loopback sockets, real nodes dialling them over WebSocket, the built-in ``credits``
billing plugin, a real database (PostgreSQL for everything shared between gateways,
both SQLite and PostgreSQL where one gateway is enough).

* Two gateways on one PostgreSQL, 200 concurrent requests under one key whose balance
  covers exactly 50: at most 50 served (exactly 50 here, see
  :func:`test_two_gateways_never_overspend_one_balance`), every refusal a 402
  ``insufficient_quota``, the balance never below zero, the ledger check passing (the
  module and ``tooti ledger check``), the operator's earnings plus the fees equal to what
  the user was charged.
* A key revoked through gateway A's admin API is refused by gateway B within 2 s.
* An rpm limit shared by both gateways holds within its documented bound.
* Invite codes redeemed concurrently through ``/v1/me/redeem`` (exactly ``max_uses``),
  expiry, a private group's nodes reachable only with a member's key.
* Every refusal (401 missing / wrong / expired / revoked, 403, 402, 429) with its status,
  OpenAI error object and headers, through the official ``openai`` client where it
  applies, and a good key's completion, streamed and not.

The crash test (``kill -9`` of a ``tooti run`` process) is in
``tests/test_accounts_crash.py``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from tests.conftest import Network
from tooti import clock
from tooti.accounts import ledger_check
from tooti.accounts.database import Database
from tooti.accounts.join_directory import JoinTokenDirectory
from tooti.accounts.journal import FEES, account_book, balance, earnings_book
from tooti.accounts.records import Limits
from tooti.accounts.service import AccountService
from tooti.backends.simulated import SimulatedBackend
from tooti.billing.base import BillingSetup
from tooti.billing.credits import Credits
from tooti.gateway.app import Gateway
from tooti.gateway.limits import Limiter
from tooti.mesh.station import Station
from tooti.settings import BackendSettings, GatewaySettings, TunnelSettings

ADMIN_KEY = "e2e-admin-key"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
TOKENS = 5
"""Completion tokens of every priced request (``max_tokens`` and the node's length)."""
PRICE_OUT = 1000.0
"""Credits per 1M completion tokens: 1,000 µ per token. Prompts are free, so a request's
reservation (``max_tokens`` at the completion price) equals its cost exactly."""
COST = TOKENS * 1000
"""What each priced request costs, in micro-units (C)."""
FEE_BPS = 1000
"""The gateway's fee: 10 % of what a request is charged."""


def chat(model: str = "tooti-sim", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": TOKENS, **extra}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def backend(models: tuple[str, ...] = ("tooti-sim",), *, price_output: float = PRICE_OUT,
            **options: Any) -> SimulatedBackend:
    """A simulated node backend answering exactly ``TOKENS`` tokens at ``price_output``."""
    return SimulatedBackend(BackendSettings(
        type="simulated", models=list(models), max_concurrency=256,
        price_output=price_output, options={"tokens": TOKENS, **options}))


def assert_error(response: httpx.Response, status: int, code: str, type_: str) -> None:
    """``response`` is ``status`` with the OpenAI error object ``code`` / ``type_``."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert (error["code"], error["type"]) == (code, type_), error
    assert error["message"]


def frozen_wall() -> float:
    """The middle of the current UTC minute: rate windows cut from it never roll over
    during a test, whenever it runs."""
    now = clock.wall()
    return now - now % 60 + 30


@dataclass
class Gw:
    """One gateway of a test: its network (for nodes and clients) and its own database
    connection (as a separate process would have)."""

    network: Network
    db: Database
    credits: Credits
    scopes: list[trio.CancelScope] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.network.url

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30, **kwargs)


async def start_gateway(nursery: trio.Nursery, url: str, data_dir: Path, gateway_id: str, *,
                        lease_credits: str = "1", frozen: float | None = None,
                        **settings: Any) -> Gw:
    """A ``keys`` gateway with the admin key, the ``credits`` billing plugin (fee 10 %),
    minted join tokens admitted, on its own connection to the database at ``url``;
    ``frozen``: a fixed wall clock for its rate limits."""
    db = Database(url)
    tunnel = TunnelSettings(heartbeat_interval=0.5)
    gateway_settings = GatewaySettings(listen="127.0.0.1:0", first_byte_timeout=10,
                                       auth="keys", admin_key=ADMIN_KEY,
                                       gateway_id=gateway_id, **settings)
    station = Station(gateway_settings, tunnel, join_directory=JoinTokenDirectory(db))
    await trio.Path(data_dir).mkdir(parents=True, exist_ok=True)
    credits = Credits(BillingSetup(data_dir, {"fee_bps": FEE_BPS,
                                              "lease_credits": lease_credits},
                                   database=db, gateway_id=gateway_id))
    gateway = Gateway(gateway_settings, tunnel, billing=[credits], station=station,
                      database=db, gateway_id=gateway_id)
    if frozen is not None:
        gateway.limiter = Limiter(db, gateway_id, wall=lambda: frozen)
    urls = await nursery.start(gateway.serve)
    return Gw(Network(nursery, gateway, urls[0], tunnel), db, credits)


@asynccontextmanager
async def gateways(url: str, root: Path, count: int, **options: Any) -> AsyncIterator[list[Gw]]:
    """``count`` gateways (ids ``gw-0``, ``gw-1``, …) sharing the database at ``url``;
    shut down (billing flushed, leases returned) and their connections closed after."""
    started: list[Gw] = []
    try:
        async with trio.open_nursery() as nursery:
            try:
                for index in range(count):
                    started.append(await start_gateway(nursery, url, root / f"gw-{index}",
                                                       f"gw-{index}", **options))
                yield started
            finally:
                for gw in started:
                    for scope in gw.network.scopes.values():
                        scope.cancel()
                    gw.network.gateway.shutdown()
    finally:
        for gw in started:
            gw.db.close()


async def operator_node(gw: Gw, service: AccountService, operator_id: str, node_id: str,
                        *models: str, group: str = "", price_output: float = PRICE_OUT,
                        ) -> None:
    """A node joined to ``gw`` with a join token minted for ``operator_id`` (so it earns
    for that account), serving ``models``."""
    token, _ = await service.create_join_token(operator_id, group=group)
    directory = gw.network.gateway.station.join_directory
    assert directory is not None
    await directory.wait_current()  # else a loopback node would join as admin's
    await gw.network.add_node([backend(models or ("tooti-sim",), price_output=price_output)],
                              node_id=node_id, join_token=token)


async def admin_post(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> Any:
    response = await http.post(path, json=body, headers=ADMIN)
    assert response.status_code in (200, 201), response.text
    return response.json()


async def tooti_cli(*args: str, gateway: str) -> subprocess.CompletedProcess[bytes]:
    """``python -m tooti ARGS --gateway URL`` with the admin key in its environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOOTI_")}
    env["TOOTI_ADMIN_KEY"] = ADMIN_KEY
    return await trio.run_process(
        [sys.executable, "-m", "tooti", *args, "--gateway", gateway], env=env,
        capture_stdout=True, capture_stderr=True, check=False)


@pytest.fixture
def pg_url(postgres_cluster: Any) -> str:
    """A fresh database on the session's PostgreSQL cluster (shared by the gateways)."""
    return str(postgres_cluster.fresh_database())


# ------------------------------------------------------------ two gateways, one balance

async def test_two_gateways_never_overspend_one_balance(pg_url: str, tmp_path: Path) -> None:
    """200 concurrent requests over two gateways, one key, a balance of 50 requests.

    The bound (tooti/accounts/leases.py): reservations never exceed a lease's free credit
    and leases never exceed the balance, so at most 50 are served. Here the reservation of
    a request equals its cost (prompts are free), and the lease size and balance are
    multiples of it: a refused request saw less than one request's credit both in its
    gateway's lease and in the account, and neither grows afterwards, so the credit left
    stranded in the two leases and the account is less than one request each — i.e.
    none. Exactly 50 are served."""
    async with gateways(pg_url, tmp_path, 2, lease_credits="0.05") as (a, b):
        service = AccountService(a.db)
        operator = await service.create_account("op", role="operator")
        await operator_node(a, service, operator.id, "node-a")
        await operator_node(b, service, operator.id, "node-b")
        user = await service.create_account("user")
        async with a.client() as http:
            key = (await admin_post(http, "/admin/v1/keys", {"account": "user"}))["key"]
            await admin_post(http, "/admin/v1/credits/top-up",
                             {"account": "user", "amount_micros": 50 * COST,
                              "idem_key": "e2e-topup"})

        lowest = [50 * COST]
        done = trio.Event()

        async def watch_balance() -> None:  # the account's spendable book, while it runs
            while not done.is_set():
                lowest[0] = min(lowest[0], await a.db.read(
                    lambda tx: balance(tx, account_book(user.id))))
                with trio.move_on_after(0.02):
                    await done.wait()

        responses: list[httpx.Response] = []
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with a.client(limits=limits) as on_a, b.client(limits=limits) as on_b:
            async def ask(http: httpx.AsyncClient) -> None:
                responses.append(await http.post("/v1/chat/completions", json=chat(),
                                                 headers=bearer(key)))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_balance)
                async with trio.open_nursery() as burst:
                    for i in range(200):
                        burst.start_soon(ask, on_a if i % 2 else on_b)
                done.set()

        served = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code != 200]
        assert len(responses) == 200
        for response in refused:
            assert_error(response, 402, "insufficient_quota", "insufficient_quota")
        assert len(served) == 50, [r.status_code for r in responses]
        assert {r.headers["x-tooti-node"] for r in served} == {"node-a", "node-b"}
        assert all(r.json()["usage"]["completion_tokens"] == TOKENS for r in served)
        assert lowest[0] >= 0

        assert ledger_check.check(a.db) == []
        cli = await tooti_cli("ledger", "check", gateway=b.url)
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert b"ledger ok" in cli.stdout

        def books(tx: Any) -> tuple[int, int, int, int]:
            charged = int(tx.value("SELECT SUM(charged) FROM usage WHERE account_id = ?",
                                   (user.id,), default=0))
            return (charged, balance(tx, earnings_book(operator.id)), balance(tx, FEES),
                    balance(tx, account_book(user.id)))

        charged, earned, fees, left = await a.db.read(books)
        assert charged == 50 * COST
        assert earned + fees == charged and fees == charged * FEE_BPS // 10_000
        assert left >= 0

    # shut down: both gateways returned their leases; the ledger still balances
    db = Database(pg_url)
    try:
        assert ledger_check.check(db) == []
        totals = ledger_check.summary(db)
    finally:
        db.close()
    assert totals["open_leases"] == 0 and totals["leased"] == 0
    assert totals["balances"] + totals["charged"] == totals["issued"] == 50 * COST


# ------------------------------------------------------------ revocation across gateways

async def test_a_key_revoked_on_one_gateway_is_refused_by_the_other_within_2s(
        pg_url: str, tmp_path: Path) -> None:
    async with gateways(pg_url, tmp_path, 2) as (a, b):
        service = AccountService(a.db)
        await b.network.add_node([backend(price_output=0.0)], node_id="node-b")
        user = await service.create_account("user")
        secret, info = await service.create_key(user.id)
        async with b.client() as on_b:
            # B has verified (and cached) the key
            assert (await on_b.post("/v1/chat/completions", json=chat(),
                                    headers=bearer(secret))).status_code == 200
            async with a.client() as on_a:
                revoked = await on_a.delete(f"/admin/v1/keys/{info.id}", headers=ADMIN)
            assert revoked.status_code == 200 and revoked.json()["revoked"] is True
            keys_b = b.network.gateway.keys
            assert keys_b is not None
            with trio.fail_after(2):
                while True:  # a real request after each of B's polls of the database
                    answer = await on_b.post("/v1/chat/completions", json=chat(),
                                             headers=bearer(secret))
                    if answer.status_code != 200:
                        break
                    await keys_b.wait_polled()
        assert_error(answer, 401, "invalid_api_key", "invalid_request_error")
        assert answer.headers["www-authenticate"] == "Bearer"
        assert secret not in answer.text


# ------------------------------------------------------------ an rpm limit shared by two

async def test_an_rpm_limit_shared_by_two_gateways_holds(pg_url: str, tmp_path: Path) -> None:
    """A key limited to 20 requests per minute, 60 requests at once over two gateways.

    The bound (tooti/gateway/limits.py): what all gateways admit in a window never exceeds
    the limit; the under-use is at most the chunks the other gateways hold (G · C, the
    chunk C = limit // 10 = 2), so between 16 and 20 are served."""
    limit, chunk = 20, 2
    async with gateways(pg_url, tmp_path, 2, frozen=frozen_wall()) as (a, b):
        service = AccountService(a.db)
        await a.network.add_node([backend(price_output=0.0)], node_id="node-a")
        await b.network.add_node([backend(price_output=0.0)], node_id="node-b")
        user = await service.create_account("user")
        secret, _ = await service.create_key(user.id, limits=Limits(rpm=limit))
        responses: list[httpx.Response] = []
        async with a.client() as on_a, b.client() as on_b:
            async def ask(http: httpx.AsyncClient) -> None:
                responses.append(await http.post("/v1/chat/completions", json=chat(),
                                                 headers=bearer(secret)))

            async with trio.open_nursery() as burst:
                for i in range(60):
                    burst.start_soon(ask, on_a if i % 2 else on_b)
    served = [r for r in responses if r.status_code == 200]
    assert limit - 2 * chunk <= len(served) <= limit, len(served)
    assert {r.headers["x-tooti-node"] for r in served} == {"node-a", "node-b"}
    for response in responses:
        if response.status_code != 200:
            assert_error(response, 429, "rate_limit_exceeded", "rate_limit_error")
            assert int(response.headers["retry-after"]) >= 1
            assert response.headers["x-ratelimit-limit-requests"] == str(limit)
    for response in served:
        assert response.headers["x-ratelimit-limit-requests"] == str(limit)


# ------------------------------------------------------------ invites and private groups

async def test_invites_under_concurrency_expiry_and_a_private_groups_nodes(
        database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with gateways(database_url, tmp_path, 1) as (gw,):
        service = AccountService(gw.db)
        async with gw.client() as http:
            await admin_post(http, "/admin/v1/accounts", {"name": "op", "role": "operator"})
            await admin_post(http, "/admin/v1/groups",
                             {"name": "lab", "owner": "op", "public_nodes": False})
            invite = await admin_post(http, "/admin/v1/invites", {"group": "lab",
                                                                  "max_uses": 3})
            token = (await admin_post(http, "/admin/v1/join-tokens",
                                      {"account": "op", "group": "lab"}))["token"]
            directory = gw.network.gateway.station.join_directory
            assert directory is not None
            await directory.wait_current()
            await gw.network.add_node([backend(("lab-model",), price_output=0.0)],
                                      node_id="lab-1", join_token=token)
            assert gw.network.gateway.registry.peers["lab-1"].group == "lab"
            keys = []
            for i in range(12):
                await admin_post(http, "/admin/v1/accounts", {"name": f"u{i}"})
                keys.append((await admin_post(http, "/admin/v1/keys",
                                              {"account": f"u{i}"}))["key"])

            # twelve accounts redeem one 3-use code at once, each with its own key
            redeemed: dict[str, httpx.Response] = {}

            async def redeem(key: str) -> None:
                redeemed[key] = await http.post("/v1/me/redeem", json={"code": invite["code"]},
                                                headers=bearer(key))

            async with trio.open_nursery() as nursery:
                for key in keys:
                    nursery.start_soon(redeem, key)
            answers = list(redeemed.values())
            admitted = [r for r in answers if r.status_code == 200]
            assert len(admitted) == 3, [r.text for r in answers]
            assert all(r.json()["group"]["name"] == "lab" for r in admitted)
            for refused in answers:
                if refused.status_code != 200:
                    assert_error(refused, 410, "used_up", "invalid_request_error")
            members = (await http.get("/admin/v1/groups/lab/members", headers=ADMIN)).json()
            assert len(members["data"]) == 4  # the owner and three

            # an expired code admits nobody
            later = await admin_post(http, "/admin/v1/invites", {"group": "lab", "max_uses": 5,
                                                                 "expires_in": 60})
            outsider_key = next(k for k, r in redeemed.items() if r.status_code != 200)
            with monkeypatch.context() as patch:
                expiry = later["expires_at"]
                patch.setattr(clock, "wall", lambda: expiry + 1)
                expired = await http.post("/v1/me/redeem", json={"code": later["code"]},
                                          headers=bearer(outsider_key))
            assert_error(expired, 410, "expired", "invalid_request_error")

            # a member's group key reaches the group's node; an outsider learns nothing
            member_key = next(k for k, r in redeemed.items() if r.status_code == 200)
            group_key = await http.post("/v1/me/keys", json={"group": "lab"},
                                        headers=bearer(member_key))
            assert group_key.status_code == 201, group_key.text
            served = await http.post("/v1/chat/completions", json=chat("lab-model"),
                                     headers=bearer(group_key.json()["key"]))
            assert served.status_code == 200, served.text
            assert served.headers["x-tooti-node"] == "lab-1"
            refused = await http.post("/v1/me/keys", json={"group": "lab"},
                                      headers=bearer(outsider_key))
            assert refused.status_code == 403
            for key in (outsider_key, member_key):  # the member's plain key is outside too
                hidden = await http.post("/v1/chat/completions", json=chat("lab-model"),
                                         headers=bearer(key))
                unknown = await http.post("/v1/chat/completions", json=chat("no-such-model"),
                                          headers=bearer(key))
                assert hidden.status_code == unknown.status_code
                assert hidden.status_code in (404, 503)
                assert (hidden.json()["error"]["message"].replace("lab-model", "X")
                        == unknown.json()["error"]["message"].replace("no-such-model", "X"))
                listed = (await http.get("/v1/models", headers=bearer(key))).json()["data"]
                assert "lab-model" not in {m["id"] for m in listed}
        assert len(await service.members("lab")) == 4


# ------------------------------------------------------------ every refusal, openai client

async def test_every_refusal_through_the_openai_client(
        database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with gateways(database_url, tmp_path, 1, frozen=frozen_wall()) as (gw,):
        service = AccountService(gw.db)
        await gw.network.add_node([backend(("tooti-sim", "other"))], node_id="node")
        alice = await service.create_account("alice")
        await service.top_up(alice.id, 100 * COST, idem_key="alice")
        broke = await service.create_account("broke")
        good, _ = await service.create_key(alice.id)
        revoked, revoked_info = await service.create_key(alice.id)
        expires = clock.wall() + 3600
        expiring, _ = await service.create_key(alice.id, expires_at=expires)
        narrow, _ = await service.create_key(alice.id, models=["other"])
        limited, _ = await service.create_key(alice.id, limits=Limits(rpm=1))
        poor, _ = await service.create_key(broke.id)
        base = gw.url + "/v1"
        messages: Any = [{"role": "user", "content": "hi"}]

        def client(key: str) -> openai.AsyncOpenAI:
            return openai.AsyncOpenAI(api_key=key, base_url=base, max_retries=0)

        async def create(key: str, model: str = "tooti-sim") -> Any:
            async with client(key) as api:
                return await api.chat.completions.create(model=model, messages=messages,
                                                         max_tokens=TOKENS)

        # a good key: non-streamed and streamed
        answer = await create(good)
        assert answer.choices[0].message.content
        assert answer.usage is not None and answer.usage.completion_tokens == TOKENS
        async with client(good) as api:
            stream = await api.chat.completions.create(model="tooti-sim", messages=messages,
                                                       max_tokens=TOKENS, stream=True)
            text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream
                            if chunk.choices])
        assert text

        def check(error: openai.APIStatusError, status: int, code: str, type_: str) -> None:
            assert error.status_code == status
            assert error.code == code and error.type == type_
            body = error.response.json()["error"]
            assert set(body) == {"message", "type", "param", "code"}

        def check_401(error: openai.APIStatusError, secret: str) -> None:
            check(error, 401, "invalid_api_key", "invalid_request_error")
            assert error.response.headers["www-authenticate"] == "Bearer"
            assert secret not in error.response.text

        # missing (the client always sends one: plain HTTP)
        async with gw.client() as http:
            missing = await http.post("/v1/chat/completions", json=chat())
        assert_error(missing, 401, "invalid_api_key", "invalid_request_error")
        assert missing.headers["www-authenticate"] == "Bearer"
        # wrong
        wrong = "sk-tooti-" + "W" * 43
        with pytest.raises(openai.AuthenticationError) as caught:
            await create(wrong)
        check_401(caught.value, wrong)
        # expired: an hour later, with nothing changed in the database
        assert (await create(expiring)).choices
        with monkeypatch.context() as patch:
            patch.setattr(clock, "wall", lambda: expires + 1)
            with pytest.raises(openai.AuthenticationError) as caught:
                await create(expiring)
        check_401(caught.value, expiring)
        # revoked (through the admin API; the cache learns it within 2 s)
        assert (await create(revoked)).choices
        async with gw.client() as http:
            assert (await http.delete(f"/admin/v1/keys/{revoked_info.id}",
                                      headers=ADMIN)).status_code == 200
        keys = gw.network.gateway.keys
        assert keys is not None
        with trio.fail_after(2):
            await keys.wait_polled()
            await keys.wait_polled()
        with pytest.raises(openai.AuthenticationError) as caught:
            await create(revoked)
        check_401(caught.value, revoked)
        # a model the key may not use
        assert (await create(narrow, "other")).choices
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await create(narrow)
        check(denied.value, 403, "model_not_allowed", "permission_error")
        # no credit
        with pytest.raises(openai.APIStatusError) as unpaid:
            await create(poor)
        check(unpaid.value, 402, "insufficient_quota", "insufficient_quota")
        # rpm 1: the first is served with its x-ratelimit-*, the second is 429
        async with client(limited) as api:
            first = await api.chat.completions.with_raw_response.create(
                model="tooti-sim", messages=messages, max_tokens=TOKENS)
        assert first.headers["x-ratelimit-limit-requests"] == "1"
        assert first.headers["x-ratelimit-remaining-requests"] == "0"
        assert first.headers["x-ratelimit-reset-requests"].endswith("s")
        with pytest.raises(openai.RateLimitError) as limited_out:
            await create(limited)
        check(limited_out.value, 429, "rate_limit_exceeded", "rate_limit_error")
        headers = limited_out.value.response.headers
        assert 1 <= int(headers["retry-after"]) <= 60
        assert headers["x-ratelimit-limit-requests"] == "1"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert math.isfinite(float(headers["x-ratelimit-reset-requests"].rstrip("s")
                                   .split("m")[-1]))
        # refused requests were not charged; served ones were, once each
        usage = await gw.db.read(lambda tx: tx.all(
            "SELECT status, charged FROM usage WHERE account_id = ?", (alice.id,)))
        assert sum(1 for status, _ in usage if status == "ok") == 6
        assert all(charged == COST for status, charged in usage if status == "ok")
        assert ledger_check.check(gw.db) == []


async def test_a_top_up_serves_the_next_request_at_once(database_url: str,
                                                         tmp_path: Path) -> None:
    """A 402 is remembered for a second (no database write per refused request), but a
    top-up through this gateway's admin API makes the very next request go through."""
    async with gateways(database_url, tmp_path, 1) as (gw,):
        service = AccountService(gw.db)
        await gw.network.add_node([backend()], node_id="node")
        carol = await service.create_account("carol")
        key, _ = await service.create_key(carol.id)
        async with gw.client() as http:
            refused = await http.post("/v1/chat/completions", json=chat(max_tokens=TOKENS),
                                      headers=bearer(key))
            assert_error(refused, 402, "insufficient_quota", "insufficient_quota")
            await admin_post(http, "/admin/v1/credits/top-up",
                             {"account": "carol", "amount_micros": 10 * COST})
            served = await http.post("/v1/chat/completions", json=chat(max_tokens=TOKENS),
                                     headers=bearer(key))
            assert served.status_code == 200, served.text


async def test_self_service_counts_against_the_keys_rate(database_url: str,
                                                         tmp_path: Path) -> None:
    """``/v1/me`` is a request like any other for a key's rate limit (a key cannot
    hammer the database through its own reports)."""
    async with gateways(database_url, tmp_path, 1, frozen=frozen_wall()) as (gw,):
        service = AccountService(gw.db)
        dave = await service.create_account("dave")
        key, _ = await service.create_key(dave.id, limits=Limits(rpm=2))
        async with gw.client() as http:
            first = await http.get("/v1/me", headers=bearer(key))
            assert first.status_code == 200, first.text
            assert first.headers["x-ratelimit-limit-requests"] == "2"
            assert (await http.get("/v1/me", headers=bearer(key))).status_code == 200
            refused = await http.get("/v1/me", headers=bearer(key))
            assert_error(refused, 429, "rate_limit_exceeded", "rate_limit_error")
            assert int(refused.headers["retry-after"]) >= 1
