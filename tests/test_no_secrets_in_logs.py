"""No secret ever reaches a log: every auth path, with known secrets, through real
``tooti run`` processes at log level ``debug``, then every byte they wrote is searched.

The processes: a gateway (``--auth keys`` in its config, an admin key, a shared join
token, a node group with its own join token and a static group API key; JSON logs) and
nodes dialling it: one with the shared token, one with the group's token, one with a
join token minted through the admin API (JSON logs), and one with a wrong token (text
logs), so both formats are searched.

The paths: the admin API with the right admin key, a wrong one and a malformed header;
accounts, API keys (their secret is in the HTTP answer only), a group, invite codes,
credit codes and join tokens created through it; ``/v1`` with a valid key as
``Authorization: Bearer`` and as ``x-api-key``, streamed and not; a wrong key of valid
shape, a malformed key, a revoked key, the admin key as a bearer, the static group key;
self-service (``/v1/me``, a key created by its owner and then used); invite and credit
code redemption, right and wrong, through ``/v1/me/redeem`` and the admin API.

Each secret's full value is searched for, and for generated ones (``sk-tooti-…``,
``tj-tooti-…``, ``ti-tooti-…``, ``tc-tooti-…``) also the part after their visible
prefix (what a listing shows is allowed, nothing more). So that the test cannot pass
because nothing was logged, the gateway's access records are parsed and must include
every ``/v1`` request made, with the status its client got.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.processes import START_TIMEOUT, Tooti, spawn, toml_table, toml_value_lines
from tooti.accounts.credentials import (
    API_KEY,
    CREDIT_CODE,
    INVITE,
    JOIN_TOKEN,
    VISIBLE,
    generate,
)

ADMIN_KEY = "admin-" + secrets.token_urlsafe(24)
SHARED_TOKEN = "shared-" + secrets.token_urlsafe(24)
GROUP_TOKEN = "group-" + secrets.token_urlsafe(24)
STATIC_KEY = "static-" + secrets.token_urlsafe(24)
WRONG_TOKEN = generate(JOIN_TOKEN)
CHAT = "/v1/chat/completions"
KINDS = (API_KEY, JOIN_TOKEN, INVITE, CREDIT_CODE)


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "tooti-sim", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4, **extra}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def hidden_parts(secret: str) -> list[str]:
    """What must never appear: the whole secret, and for a generated one the part after
    its kind and visible characters."""
    for kind in KINDS:
        if secret.startswith(kind):
            return [secret, secret[len(kind) + VISIBLE:]]
    return [secret]


class Run:
    """The processes of the test and the requests made (request id → status)."""

    def __init__(self, nursery: trio.Nursery, root: Path) -> None:
        self.nursery, self.root = nursery, root
        self.children: list[Tooti] = []
        self.gateway: Tooti | None = None
        self.url = ""
        self.requests: dict[str, int] = {}
        """``/v1`` request id → the status its client got."""

    def note(self, response: httpx.Response) -> httpx.Response:
        if response.request.url.path.startswith("/v1/"):
            self.requests[response.headers["x-request-id"]] = response.status_code
        return response

    async def start_gateway(self) -> None:
        config = (
            toml_value_lines({"roles": ["gateway"], "log_level": "debug",
                              "log_format": "json", "drain_grace": 1.0})
            + toml_table("gateway", {"listen": "127.0.0.1:0", "auth": "keys",
                                     "admin_key": ADMIN_KEY, "join_token": SHARED_TOKEN})
            + toml_table("gateway.groups.lab", {"join_token": GROUP_TOKEN,
                                                "api_keys": [STATIC_KEY]})
            + toml_table("tunnel", {"heartbeat_interval": 0.5})
        )
        path = self.root / "gateway.toml"
        path.write_text(config)
        self.gateway = await spawn(self.nursery, path, self.root / "gateway-data", "gateway")
        self.children.append(self.gateway)
        with trio.fail_after(START_TIMEOUT):
            match = await self.gateway.wait_for(r"gateway listening on (http://127\.0\.0\.1:\d+)")
        self.url = match.group(1)

    async def start_node(self, node_id: str, token: str, log_format: str) -> Tooti:
        config = (
            toml_value_lines({"roles": ["node"], "log_level": "debug",
                              "log_format": log_format, "drain_grace": 0.0})
            + toml_table("node", {"id": node_id, "join_token": token,
                                  "peers": [self.url.replace("http://", "ws://")],
                                  "reconnect_initial": 0.1, "reconnect_max": 1.0})
            + toml_table("[[node.backends]]", {"type": "simulated"})
            + toml_table("tunnel", {"heartbeat_interval": 0.5})
        )
        path = self.root / f"{node_id}.toml"
        path.write_text(config)
        node = await spawn(self.nursery, path, self.root / f"{node_id}-data", node_id)
        self.children.append(node)
        return node

    async def registered(self, node_id: str) -> None:
        assert self.gateway is not None
        with trio.fail_after(START_TIMEOUT):
            await self.gateway.wait_for(rf"peer {re.escape(node_id)} serves \S")

    def output(self) -> str:
        return "\n".join(child.text for child in self.children)


async def admin_post(http: httpx.AsyncClient, path: str, body: dict[str, Any]
                     ) -> dict[str, Any]:
    response = await http.post(path, json=body, headers=bearer(ADMIN_KEY))
    assert response.status_code in (200, 201), response.text
    answer: dict[str, Any] = response.json()
    return answer


async def exercise(run: Run, http: httpx.AsyncClient) -> list[str]:
    """Every auth path; returns the secrets generated on the way."""
    found: list[str] = []

    async def v1(method: str, path: str, headers: dict[str, str], **kw: Any
                 ) -> httpx.Response:
        return run.note(await http.request(method, path, headers=headers, **kw))

    # the admin API: right key, wrong key, malformed header
    await admin_post(http, "/admin/v1/accounts", {"name": "op", "role": "operator"})
    await admin_post(http, "/admin/v1/accounts", {"name": "alice"})
    wrong_admin = "admin-" + secrets.token_urlsafe(24)
    found.append(wrong_admin)
    assert (await http.get("/admin/v1/accounts",
                           headers=bearer(wrong_admin))).status_code == 401
    assert (await http.get("/admin/v1/accounts",
                           headers={"authorization": wrong_admin})).status_code == 401

    # API keys: created (the secret only in the answer), used, revoked
    created = await admin_post(http, "/admin/v1/keys", {"account": "alice"})
    key, key_id = created["key"], created["id"]
    doomed = await admin_post(http, "/admin/v1/keys", {"account": "alice"})
    found += [key, doomed["key"]]
    await admin_post(http, "/admin/v1/credits/top-up", {"account": "alice", "amount": "10"})

    served = await v1("POST", CHAT, bearer(key), json=chat())
    assert served.status_code == 200, served.text
    streamed = await v1("POST", CHAT, {"x-api-key": key}, json=chat(stream=True))
    assert streamed.status_code == 200 and "data: [DONE]" in streamed.text
    assert (await v1("GET", "/v1/models", bearer(doomed["key"]))).status_code == 200
    revoked = await http.delete(f"/admin/v1/keys/{doomed['id']}", headers=bearer(ADMIN_KEY))
    assert revoked.status_code == 200, revoked.text
    # The gateway's key cache learns of the revocation at its next database poll (every
    # 0.5 s), which another process cannot wait on: ask again, under a deadline.
    with trio.fail_after(10):
        while (await v1("GET", "/v1/models", bearer(doomed["key"]))).status_code != 401:  # noqa: ASYNC110
            await trio.sleep(0.1)
    assert (await v1("POST", CHAT, bearer(doomed["key"]), json=chat())).status_code == 401
    wrong_key, malformed = generate(API_KEY), "sk-tooti-" + secrets.token_urlsafe(12)
    found += [wrong_key, malformed]
    assert (await v1("POST", CHAT, bearer(wrong_key), json=chat())).status_code == 401
    assert (await v1("POST", CHAT, {"x-api-key": malformed}, json=chat())).status_code == 401
    assert (await v1("GET", "/v1/models", {})).status_code == 401
    assert (await v1("POST", CHAT, bearer(ADMIN_KEY), json=chat())).status_code == 200
    assert (await v1("GET", "/v1/models", bearer(STATIC_KEY))).status_code == 200

    # self-service: /v1/me, a key made by its owner and used
    assert (await v1("GET", "/v1/me", bearer(key))).status_code == 200
    own = await v1("POST", "/v1/me/keys", bearer(key), json={"name": "mine"})
    assert own.status_code == 201, own.text
    found.append(own.json()["key"])
    assert (await v1("POST", CHAT, bearer(own.json()["key"]), json=chat())).status_code == 200

    # invite and credit codes, right and wrong, through /v1/me and the admin API
    await admin_post(http, "/admin/v1/groups", {"name": "team", "owner": "op"})
    invite = (await admin_post(http, "/admin/v1/invites", {"group": "team"}))["code"]
    code = (await admin_post(http, "/admin/v1/credits/codes", {"amount": "1"}))["code"]
    admin_code = (await admin_post(http, "/admin/v1/credits/codes", {"amount": "1"}))["code"]
    wrong_invite, wrong_code = generate(INVITE), generate(CREDIT_CODE)
    found += [invite, code, admin_code, wrong_invite, wrong_code]
    for good in (invite, code):
        answer = await v1("POST", "/v1/me/redeem", bearer(key), json={"code": good})
        assert answer.status_code == 200, answer.text
    for bad in (wrong_invite, wrong_code, code):  # the credit code is used up now
        answer = await v1("POST", "/v1/me/redeem", bearer(key), json={"code": bad})
        assert 400 <= answer.status_code < 500, answer.text
    await admin_post(http, "/admin/v1/credits/redeem", {"code": admin_code, "account": "op"})
    refused = await http.post("/admin/v1/credits/redeem", headers=bearer(ADMIN_KEY),
                              json={"code": wrong_code, "account": "op"})
    assert 400 <= refused.status_code < 500

    # a join token minted through the admin API (then used by a node)
    minted = (await admin_post(http, "/admin/v1/join-tokens", {"account": "op"}))["token"]
    found.append(minted)
    found.append(key_id)  # not a secret: checked below to be in the access log
    return found


async def test_no_secret_reaches_any_log(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        run = Run(nursery, tmp_path)
        try:
            await run.start_gateway()
            shared = await run.start_node("node-shared", SHARED_TOKEN, "text")
            await run.start_node("node-group", GROUP_TOKEN, "text")
            wrong = await run.start_node("node-wrong", WRONG_TOKEN, "text")
            await run.registered("node-shared")
            await run.registered("node-group")
            with trio.fail_after(START_TIMEOUT):
                await wrong.wait_for("refused the join token")
            async with httpx.AsyncClient(base_url=run.url, timeout=30) as http:
                generated = await exercise(run, http)
                key_id = generated.pop()
                minted = generated[-1]
                await run.start_node("node-minted", minted, "json")
                await run.registered("node-minted")
                # a request after the minted node joined (it may serve it)
                assert (await http.get("/healthz")).status_code == 200
            assert shared.alive
            for child in run.children:
                if child is not run.gateway:
                    child.signal(signal.SIGTERM)
            assert run.gateway is not None
            run.gateway.signal(signal.SIGTERM)
            for child in run.children:
                await child.wait()
        except BaseException:
            print(run.output())
            raise
        finally:
            with trio.CancelScope(shield=True):
                for child in run.children:
                    if child.alive:
                        await child.kill()
            nursery.cancel_scope.cancel()

    output = run.output()
    known = [ADMIN_KEY, SHARED_TOKEN, GROUP_TOKEN, STATIC_KEY, WRONG_TOKEN, *generated]
    for secret in known:
        for part in hidden_parts(secret):
            assert part not in output, f"a secret reached a log: ...{part[-6:]}"

    # the access log recorded every /v1 request, with the status its client got
    assert run.gateway is not None
    access = {}
    for line in run.gateway.text.splitlines():
        if line.startswith("{") and '"logger":"tooti.access"' in line:
            entry = json.loads(line)
            access[entry["request_id"]] = entry
    assert len(run.requests) >= 15
    assert {rid: access[rid]["status"] for rid in run.requests if rid in access} == \
        run.requests
    by_key = [e for e in access.values() if e["key_id"] == key_id]
    assert any(e["path"] == CHAT and e["outcome"] == "ok" for e in by_key)
    assert all(e["key_id"] is None for e in access.values() if e["status"] == 401)
    # the other processes logged at debug too (a quiet run would prove nothing)
    assert "DEBUG" in run.children[1].text or '"level":"debug"' in output
