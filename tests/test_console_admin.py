"""The console's admin pages on a real gateway (SQLite and PostgreSQL) with real nodes:
accounts (create, top up once per form, suspend, login link, password, sign out
everywhere, keys), the live network and its node actions, the server-sent event stream,
the live request flow, the ledger check and the config summary without secrets, and
every admin page refused to users and operators."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from html import unescape
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio

from tests.conftest import simulated
from tests.console_support import (
    ADMIN_KEY,
    Browser,
    ConsoleEnv,
    assert_admin_only,
    read_events,
    start_console,
)
from tooti.accounts.database import Database
from tooti.accounts.directory import KeyDirectory
from tooti.admin.events import sse
from tooti.console import admin_pages
from tooti.errors import APIError
from tooti.settings import CorsSettings, GroupSettings

CHAT = {"model": "tooti-sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
JS = Path(admin_pages.__file__).parent / "static" / "console.js"
PASSWORD = "correct horse battery staple"
IDEM = re.compile(r'name="idem" value="([^"]+)"')
ADMIN_GETS = ("/console/admin/accounts", "/console/admin/accounts/admin",
              "/console/admin/network", "/console/admin/requests", "/console/admin/ledger",
              "/console/admin/config", "/console/admin/events")
ADMIN_POSTS = ("/console/admin/accounts", "/console/admin/accounts/admin/top-up",
               "/console/admin/accounts/admin/status",
               "/console/admin/accounts/admin/login-link",
               "/console/admin/accounts/admin/password", "/console/admin/accounts/admin/logout",
               "/console/admin/accounts/admin/keys/k/revoke", "/console/admin/ledger",
               "/console/admin/nodes/n1/disable", "/console/admin/nodes/n1/enable",
               "/console/admin/nodes/n1/drain")


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


async def admin(env: ConsoleEnv) -> Browser:
    """A browser signed in as the admin account."""
    browser = env.browser()
    await env.sign_in(browser, "admin")
    return browser


async def polled(keys: KeyDirectory | None) -> None:
    """Two polls of the key directory (so one started after now)."""
    assert keys is not None
    with trio.fail_after(5):
        await keys.wait_polled()
        await keys.wait_polled()


def js_columns(name: str) -> list[str]:
    """The headers of a column list of console.js (``PEER_COLUMNS``, ...)."""
    block = JS.read_text().split(f"const {name} = [", 1)[1].split("];", 1)[0]
    return re.findall(r'\["[a-z_]+", "([^"]+)"', block)


def headers_of(html: str, table_id: str) -> list[str]:
    table = html.split(f'id="{table_id}"', 1)[1].split("</thead>", 1)[0]
    return [unescape(h) for h in re.findall(r"<th[^>]*>([^<]*)</th>", table)]


def row_of(html: str, row_id: str) -> str:
    """The ``<tr>`` (with its attributes) of ``data-id=row_id``."""
    found = re.search(rf'<tr data-id="{re.escape(row_id)}"[^>]*>.*?</tr>', html, re.S)
    assert found, f"no row {row_id}"
    return found.group(0)


@asynccontextmanager
async def admin_events(
        browser: Browser) -> AsyncIterator[tuple[AsyncIterator[str], list[tuple[str, Any]]]]:
    """``/console/admin/events`` opened by ``browser`` and read up to its snapshot: the
    stream's lines and the events read so far (more go into that list by ``read_events``)."""
    seen: list[tuple[str, Any]] = []
    async with browser.http.stream("GET", "/console/admin/events") as response:
        lines = response.aiter_lines()
        await read_events(lines, "snapshot", seen)
        yield lines, seen


# ------------------------------------------------------------ authorization

async def test_users_and_operators_get_403_on_every_admin_page_visitors_sign_in(
        console_env: ConsoleEnv) -> None:
    await assert_admin_only(console_env, ADMIN_GETS, ADMIN_POSTS, {
        "amount": "5", "idem": "x", "name": "evil", "status": "suspended",
        "password": PASSWORD, "again": PASSWORD})
    visitor = console_env.browser()
    for path in ADMIN_GETS:
        answer = await visitor.get(path)
        assert answer.status_code == 303 and answer.headers["location"] == "/console/login"
    admin_account = await console_env.service.get_account("admin")
    assert admin_account.balance == 0 and admin_account.status == "active"
    assert await console_env.service.find_account("evil") is None


async def test_origin_null_of_a_no_referrer_page_falls_back_on_sec_fetch_site(
        console_env: ConsoleEnv) -> None:
    """Under ``Referrer-Policy: no-referrer`` Chromium sends ``Origin: null`` with the
    console's own forms: then ``Sec-Fetch-Site`` decides (a foreign page's is
    ``cross-site``)."""
    browser = await admin(console_env)
    await browser.get("/console/admin/accounts")
    own = {"origin": "null", "sec-fetch-site": "same-origin"}
    for headers in ({"origin": "null", "sec-fetch-site": "cross-site"},
                    {"origin": "https://evil.example", "sec-fetch-site": "same-origin"}):
        refused = await browser.post("/console/admin/accounts", {"name": "mallory"},
                                     headers=headers)
        assert refused.status_code == 403 and "another site" in refused.text
    made = await browser.post("/console/admin/accounts", {"name": "carol"}, headers=own)
    assert made.status_code == 303
    assert [a.name for a in await console_env.service.list_accounts()] == ["admin", "carol"]


# ------------------------------------------------------------ accounts

async def test_create_account_list_and_refusals(console_env: ConsoleEnv) -> None:
    browser = await admin(console_env)
    page = await browser.get("/console/admin/accounts")
    assert page.status_code == 200 and 'id="create-account"' in page.text
    made = await browser.post("/console/admin/accounts", {"name": "carol", "role": "operator"})
    assert made.status_code == 303
    carol = await console_env.service.find_account("carol")
    assert carol is not None and carol.role == "operator" and carol.status == "active"
    assert made.headers["location"] == f"/console/admin/accounts/{carol.id}"
    detail = await browser.get(made.headers["location"])
    assert "Account carol (operator) created." in detail.text
    listed = await browser.get("/console/admin/accounts")
    row = row_of(listed.text, carol.id)
    assert ">carol</a>" in row and "operator" in row and "active" in row
    await browser.get("/console/admin/accounts")
    taken = await browser.post("/console/admin/accounts", {"name": "carol", "role": "user"})
    assert taken.status_code == 409 and 'id="accounts-error"' in taken.text
    await browser.get("/console/admin/accounts")
    bad = await browser.post("/console/admin/accounts", {"name": "no spaces <b>",
                                                         "role": "user"})
    assert bad.status_code == 400 and "<b>" not in bad.text
    await browser.get("/console/admin/accounts")
    role = await browser.post("/console/admin/accounts", {"name": "dave", "role": "root"})
    assert role.status_code == 400
    assert [a.name for a in await console_env.service.list_accounts()] == ["admin", "carol"]
    assert (await browser.get("/console/admin/accounts/nobody")).status_code == 404


async def test_top_up_moves_the_amount_once_when_the_form_is_sent_twice(
        console_env: ConsoleEnv) -> None:
    bob = await console_env.account("bob")
    browser = await admin(console_env)
    page = await browser.get(f"/console/admin/accounts/{bob.id}")
    found = IDEM.search(page.text)
    assert found, "the top-up form has no idempotency key"
    form = {"amount": "12.5", "idem": found.group(1), "memo": "welcome"}
    path = f"/console/admin/accounts/{bob.id}/top-up"
    first = await browser.post(path, form)
    second = await browser.post(path, form)  # the double click
    assert first.status_code == second.status_code == 303
    assert (await console_env.service.get_account(bob.id)).balance == 12_500_000
    shown = await browser.get(first.headers["location"])
    assert 'id="balance">12.5<' in shown.text
    again = IDEM.search(shown.text)
    assert again and again.group(1) != form["idem"]  # a new form is a new top-up
    assert (await browser.post(path, {**form, "idem": again.group(1),
                                      "amount": "0.000001"})).status_code == 303
    assert (await console_env.service.get_account(bob.id)).balance == 12_500_001
    # The same form id with another amount is refused; bad amounts and a missing id too.
    await browser.get(f"/console/admin/accounts/{bob.id}")
    conflict = await browser.post(path, {**form, "amount": "99"})
    assert conflict.status_code == 409 and 'id="account-error"' in conflict.text
    for bad in ({**form, "amount": "1.5e3"}, {**form, "amount": "-1"},
                {**form, "amount": "0"}, {"amount": "1"}):
        await browser.get(f"/console/admin/accounts/{bob.id}")
        refused = await browser.post(path, bad)
        assert refused.status_code == 400, (bad, refused.text)
    assert (await console_env.service.get_account(bob.id)).balance == 12_500_001
    assert (await browser.post("/console/admin/accounts/nobody/top-up",
                               form)).status_code == 404


async def test_suspend_makes_the_keys_401_and_reactivate_restores(
        console_env: ConsoleEnv) -> None:
    await console_env.add_node([simulated()], "n1")
    bob = await console_env.account("bob")
    await console_env.service.top_up(bob.id, 10_000_000, idem_key="t1")
    secret, _ = await console_env.service.create_key(bob.id, "laptop")
    bob_browser = console_env.browser()
    await console_env.sign_in(bob_browser, "bob")
    browser = await admin(console_env)
    keys = console_env.gateway.keys
    async with httpx.AsyncClient(base_url=console_env.url, timeout=20) as http:
        assert (await http.post("/v1/chat/completions", json=CHAT,
                                headers=bearer(secret))).status_code == 200
        page = await browser.get(f"/console/admin/accounts/{bob.id}")
        assert 'id="suspend"' in page.text and 'id="keys"' not in page.text
        assert "laptop" in row_of(page.text, (await console_env.service.list_keys(bob.id))[0].id)
        suspended = await browser.post(f"/console/admin/accounts/{bob.id}/status",
                                       {"status": "suspended"})
        assert suspended.status_code == 303
        assert (await console_env.service.get_account(bob.id)).status == "suspended"
        await polled(keys)
        refused = await http.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
        assert refused.status_code == 401, refused.text
        assert (await bob_browser.get("/console/")).status_code == 303  # signed out too
        page = await browser.get(f"/console/admin/accounts/{bob.id}")
        assert 'id="reactivate"' in page.text and ">suspended<" in page.text
        back = await browser.post(f"/console/admin/accounts/{bob.id}/status",
                                  {"status": "active"})
        assert back.status_code == 303
        await polled(keys)
        assert (await http.post("/v1/chat/completions", json=CHAT,
                                headers=bearer(secret))).status_code == 200
    await browser.get(f"/console/admin/accounts/{bob.id}")
    odd = await browser.post(f"/console/admin/accounts/{bob.id}/status", {"status": "gone"})
    assert odd.status_code == 400
    admin_page = await browser.get("/console/admin/accounts/admin")
    assert 'id="suspend"' not in admin_page.text  # the admin account cannot be suspended
    kept = await browser.post("/console/admin/accounts/admin/status", {"status": "suspended"})
    assert kept.status_code == 409
    assert (await console_env.service.get_account("admin")).status == "active"


async def test_login_link_password_logout_everywhere_and_key_revocation(
        console_env: ConsoleEnv) -> None:
    bob = await console_env.account("bob")
    eve = await console_env.account("eve")
    _, bob_key = await console_env.service.create_key(bob.id, "bobs")
    _, eve_key = await console_env.service.create_key(eve.id, "eves")
    browser = await admin(console_env)
    path = f"/console/admin/accounts/{bob.id}"
    await browser.get(path)
    made = await browser.post(f"{path}/login-link", {"ttl": "3600"})
    assert made.status_code == 200 and 'class="secret-box"' in made.text
    url = unescape(re.search(r'<code class="secret" id="login-link">([^<]+)</code>',
                             made.text).group(1))  # type: ignore[union-attr]
    assert url.startswith(f"{console_env.url}/console/login/link?token=tl-tooti-")
    token = url.split("token=", 1)[1]
    assert token not in (await browser.get(path)).text  # shown once
    bob_browser = console_env.browser()
    assert (await bob_browser.get(url)).status_code == 200
    signed = await bob_browser.post("/console/login/link", {"token": token})
    assert signed.status_code == 303
    assert (await bob_browser.get("/console/account")).status_code == 200
    await browser.get(path)
    assert (await browser.post(f"{path}/login-link", {"ttl": "31"})).status_code == 400
    # A password set by the admin signs bob out and lets him in with it.
    await browser.get(path)
    differ = await browser.post(f"{path}/password", {"password": PASSWORD, "again": "x"})
    assert differ.status_code == 400
    short = await browser.post(f"{path}/password", {"password": "short", "again": "short"})
    assert short.status_code == 400
    saved = await browser.post(f"{path}/password", {"password": PASSWORD, "again": PASSWORD})
    assert saved.status_code == 303
    assert (await bob_browser.get("/console/account")).status_code == 303
    await bob_browser.get("/console/login")
    assert (await bob_browser.post("/console/login", {"name": "bob", "password": PASSWORD})
            ).status_code == 303
    # Sign out everywhere.
    await browser.get(path)
    out = await browser.post(f"{path}/logout")
    assert out.status_code == 303
    assert "signed out everywhere (1 session(s)" in (await browser.get(path)).text
    assert (await bob_browser.get("/console/account")).status_code == 303
    # Keys: revoked through the page of their account only.
    await browser.get(path)
    other = await browser.post(f"{path}/keys/{eve_key.id}/revoke")
    assert other.status_code == 404
    revoked = await browser.post(f"{path}/keys/{bob_key.id}/revoke")
    assert revoked.status_code == 303
    keys = {k.id: k for k in await console_env.service.list_keys()}
    assert keys[bob_key.id].revoked_at is not None and keys[eve_key.id].revoked_at is None
    page = await browser.get(path)
    assert "revoked" in row_of(page.text, bob_key.id) and "/revoke" not in row_of(
        page.text, bob_key.id)


# ------------------------------------------------------------ network and events

async def test_network_page_lists_the_node_and_disable_enable_drain(
        console_env: ConsoleEnv) -> None:
    await console_env.add_node([simulated()], "n1")
    await console_env.add_node([simulated()], "n2")
    browser = await admin(console_env)
    page = await browser.get("/console/admin/network")
    assert page.status_code == 200
    assert headers_of(page.text, "peers") == [*js_columns("PEER_COLUMNS"), "actions"]
    assert 'data-live="peers" data-source="/console/admin/events" data-actions="yes"' \
        in page.text
    assert '<template id="peer-actions"><form method="post"><input type="hidden" ' \
        'name="csrf" value="' in page.text
    assert 'id="live-status" class="live-status"' in page.text
    row = row_of(page.text, "n1")
    assert 'class="state-live"' in row and "<td>tooti-sim</td>" in row
    assert 'action="/console/admin/nodes/n1/disable"' in row
    async with httpx.AsyncClient(base_url=console_env.url, timeout=20,
                                 headers=bearer(ADMIN_KEY)) as http:
        disabled = await browser.post("/console/admin/nodes/n1/disable")
        assert disabled.status_code == 303
        assert disabled.headers["location"] == "/console/admin/network"
        page = await browser.get("/console/admin/network")
        assert "Node n1: disabled, now disabled." in page.text
        row = row_of(page.text, "n1")
        assert 'class="state-disabled"' in row and "/n1/enable" in row
        served = [(await http.post("/v1/chat/completions", json=CHAT)) for _ in range(6)]
        assert {r.status_code for r in served} == {200}
        assert {r.headers["x-tooti-node"] for r in served} == {"n2"}
        await browser.post("/console/admin/nodes/n2/disable")
        nothing = await http.post("/v1/chat/completions", json=CHAT)
        assert nothing.status_code == 503, nothing.text
        enabled = await browser.post("/console/admin/nodes/n1/enable")
        assert enabled.status_code == 303
        back = await http.post("/v1/chat/completions", json=CHAT)
        assert back.status_code == 200 and back.headers["x-tooti-node"] == "n1"
        assert 'class="state-live"' in row_of(
            (await browser.get("/console/admin/network")).text, "n1")
    registry = console_env.gateway.registry
    drained = await browser.post("/console/admin/nodes/n1/drain")
    assert drained.status_code == 303
    assert registry.peers.get("n1") is None or registry.peers["n1"].draining
    # Unknown ids and actions are the 404 page; a GET is not an action.
    assert (await browser.post("/console/admin/nodes/ghost/disable")).status_code == 404
    assert (await browser.post("/console/admin/nodes/n2/explode")).status_code == 404
    assert (await browser.get("/console/admin/nodes/n2/enable")).status_code == 405
    assert registry.peers["n2"].disabled  # untouched by the refused requests
    # A disabled node that left stays disabled, listed with a way to enable it.
    console_env.scopes["n2"].cancel()
    with trio.fail_after(10):
        await registry.wait_until(lambda: "n2" not in registry.peers)
    page = await browser.get("/console/admin/network")
    offline = page.text.split('id="disabled-offline"', 1)[1]
    assert 'action="/console/admin/nodes/n2/enable"' in row_of(offline, "n2")
    assert (await browser.post("/console/admin/nodes/n2/enable")).status_code == 303
    assert "n2" not in registry.disabled_ids
    assert 'id="disabled-offline"' not in (await browser.get("/console/admin/network")).text
    # A refusal of the control (a relayed node's drain, 409) is a message on the page.

    def relayed(node_id: str) -> dict[str, Any]:
        raise APIError(409, f"node '{node_id}' is reached through relay 'r1'",
                       code="relayed_node")

    console_env.gateway.peer_control.drain = relayed  # type: ignore[method-assign]
    refused = await browser.post("/console/admin/nodes/n9/drain")
    assert refused.status_code == 303
    page = await browser.get(refused.headers["location"])
    assert "node &#39;n9&#39; is reached through relay &#39;r1&#39;" in page.text


def test_peer_actions_per_role_state_and_route() -> None:
    actions = admin_pages.peer_actions
    assert actions("node", "live", "") == ("disable", "drain")
    assert actions("node", "disabled", "") == ("enable", "drain")
    assert actions("node", "live", "r1") == ("disable",)  # its drain is a 409
    assert actions("node", "disabled", "r1") == ("enable",)
    assert actions("relay", "live", "") == ("drain",)
    assert actions("relay", "disabled", "") == ("enable", "drain")
    assert actions("node", "gone", "") == actions("relay", "gone", "") == ()


async def test_network_page_drains_a_relay_and_offers_no_drain_behind_it(
        console_env: ConsoleEnv) -> None:
    """A relay's row offers its drain (which closes its tunnel); the node behind it is
    offered disable, not the drain the control refuses."""
    from types import SimpleNamespace

    from tests.test_relay import start_relay
    from tooti.node.node import Node
    from tooti.settings import NodeSettings

    env = console_env
    registry = env.gateway.registry
    shim = SimpleNamespace(tunnel_url=env.url.replace("http://", "ws://") + "/tooti/v1/tunnel",
                           tunnel=env.tunnel, nursery=env.nursery)
    relay = await start_relay(shim, "r1")  # type: ignore[arg-type]
    node = Node(NodeSettings(peers=[relay.tunnel_url], id="behind", reconnect_initial=0.05,
                             reconnect_max=0.5), env.tunnel, [simulated()], "behind")
    scope = trio.CancelScope()

    async def run() -> None:
        with scope:
            await node.run()

    env.nursery.start_soon(run)
    try:
        with trio.fail_after(10):
            await registry.wait_until(lambda: "r1" in registry.peers and bool(
                getattr(registry.peers.get("behind"), "models", None)))
        browser = await admin(env)
        page = await browser.get("/console/admin/network")
        relay_row, behind = row_of(page.text, "r1"), row_of(page.text, "behind")
        assert "<td>relay</td>" in relay_row and "<td>r1</td>" in behind
        assert 'action="/console/admin/nodes/r1/drain"' in relay_row
        assert 'data-confirm="drain relay r1?"' in relay_row
        assert "/r1/disable" not in relay_row
        assert 'action="/console/admin/nodes/behind/disable"' in behind
        assert "/behind/drain" not in behind
        disabled = await browser.post("/console/admin/nodes/behind/disable")
        assert disabled.status_code == 303 and registry.peers["behind"].disabled
        assert 'action="/console/admin/nodes/behind/enable"' in row_of(
            (await browser.get("/console/admin/network")).text, "behind")
        drained = await browser.post("/console/admin/nodes/r1/drain")
        assert drained.status_code == 303
        assert registry.peers.get("r1") is None or registry.peers["r1"].draining
    finally:
        scope.cancel()
        relay.scope.cancel()


async def test_event_stream_snapshot_then_request_events_and_release(
        console_env: ConsoleEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    await console_env.add_node([simulated()], "n1")
    browser = await admin(console_env)
    bus = console_env.gateway.registry.bus
    before = bus.subscribers
    released = trio.Event()
    unsubscribe = bus.unsubscribe

    def watched(sub: Any) -> None:
        unsubscribe(sub)
        released.set()

    bus.unsubscribe = watched  # type: ignore[method-assign]
    served: list[bytes] = []
    frames_of = admin_pages.event_frames

    async def recorded(*args: Any) -> AsyncIterator[bytes]:  # the admin API's frames
        async for frame in frames_of(*args):
            served.append(frame)
            yield frame

    monkeypatch.setattr(admin_pages, "event_frames", recorded)
    seen: list[tuple[str, Any]] = []
    async with httpx.AsyncClient(base_url=console_env.url, timeout=20,
                                 headers=bearer(ADMIN_KEY)) as http:
        with trio.fail_after(10):
            async with browser.http.stream("GET", "/console/admin/events") as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                assert "default-src 'none'" in response.headers["content-security-policy"]
                lines = response.aiter_lines()
                await read_events(lines, "snapshot", seen)
                assert bus.subscribers == before + 1
                assert [p["id"] for p in seen[0][1]["peers"]] == ["n1"]
                answer = await http.post("/v1/chat/completions", json=CHAT)
                assert answer.status_code == 200
                await read_events(lines, "request.finished", seen)
            # The client left: the server notices and releases the subscription.
            await released.wait()
    assert bus.subscribers == before
    kinds = [kind for kind, _ in seen]
    assert kinds[0] == "snapshot" and "request.received" in kinds
    finished = seen[-1][1]
    assert finished["data"]["request_id"] == answer.headers["x-request-id"]
    assert finished["data"]["node"] == "n1" and finished["seq"] > seen[0][1]["seq"]
    # What the console sent is what the admin API's stream (event_frames) made.
    assert served[0].startswith(b"event: snapshot\n")
    assert [frame for frame in served if frame.startswith(b"event: ")][-1] == sse(
        "request.finished", finished, finished["seq"])
    # The live request page renders that request first, with console.js's columns.
    page = await browser.get("/console/admin/requests")
    assert headers_of(page.text, "live-requests") == js_columns("REQUEST_COLUMNS")
    assert 'data-live="requests" data-source="/console/admin/events"' in page.text
    row = row_of(page.text, answer.headers["x-request-id"])
    assert "<td>admin</td>" in row and "<td>n1</td>" in row and "<td>ok</td>" in row


async def test_event_stream_ends_with_dropped_when_the_bus_closes(
        console_env: ConsoleEnv) -> None:
    browser = await admin(console_env)
    bus = console_env.gateway.registry.bus
    with trio.fail_after(10):
        async with admin_events(browser) as (lines, seen):
            bus.close_all("gateway shutting down")  # what a drain does
            await read_events(lines, "dropped", seen)
            rest = [line async for line in lines]  # and the answer ends
    assert seen[-1] == ("dropped", {"reason": "gateway shutting down"})
    assert all(not line.startswith("data:") for line in rest)
    assert bus.subscribers == 0
    late = await browser.get("/console/admin/events")  # opened after: ends at once
    assert [line[7:] for line in late.text.splitlines() if line.startswith("event: ")] == [
        "snapshot", "dropped"]


# ------------------------------------------------------------ ledger and config

async def test_event_stream_ends_when_the_session_ends(
        console_env: ConsoleEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """Signed out everywhere while a stream is open: the stream's next session check
    (here before every frame) ends it with a ``dropped`` event."""
    monkeypatch.setattr(admin_pages, "SESSION_CHECK", 0.0)
    browser, other = await admin(console_env), await admin(console_env)
    bus = console_env.gateway.registry.bus
    with trio.fail_after(10):
        async with admin_events(browser) as (lines, seen):
            bus.publish("peer.cooldown", peer_id="n0")  # the session is still valid
            await read_events(lines, "peer.cooldown", seen)
            await other.get("/console/admin/accounts/admin")
            out = await other.post("/console/admin/accounts/admin/logout")
            assert out.status_code == 303
            bus.publish("peer.cooldown", peer_id="n0")  # the next frame: checked first
            await read_events(lines, "dropped", seen)
            rest = [line async for line in lines]  # and the answer ends
    assert seen[-1] == ("dropped", {"reason": admin_pages.SESSION_ENDED})
    assert [kind for kind, _ in seen] == ["snapshot", "peer.cooldown", "dropped"]
    assert all(not line.startswith("data:") for line in rest)
    assert bus.subscribers == 0


async def test_ledger_check_runs_on_post_and_shows_violations(
        console_env: ConsoleEnv, database: Database) -> None:
    bob = await console_env.account("bob")
    await console_env.service.top_up(bob.id, 5_000_000, idem_key="t1")
    browser = await admin(console_env)
    page = await browser.get("/console/admin/ledger")
    assert page.status_code == 200 and 'id="ledger-form"' in page.text
    assert 'id="ledger-result"' not in page.text
    ok = await browser.post("/console/admin/ledger")
    assert ok.status_code == 200 and 'id="ledger-ok"' in ok.text
    summary = ok.text.split('id="ledger-summary"', 1)[1]
    assert "<td>issued</td><td class=\"num\">5</td>" in summary
    assert "<td>open leases</td>" in summary
    await database.write(lambda tx: tx.run(
        "UPDATE books SET balance = balance + 1 WHERE book = ?", (f"account:{bob.id}",)))
    bad = await browser.post("/console/admin/ledger")
    assert bad.status_code == 200 and 'id="ledger-failed"' in bad.text
    assert f"account:{bob.id}" in bad.text.split('id="ledger-violations"', 1)[1]


async def test_no_secret_on_any_admin_page(nursery: trio.Nursery, database: Database) -> None:
    secrets_ = {"jt-SECRET-one", "jt-SECRET-two", "jt-SECRET-three", "sk-SECRET-four",
                "pw-SECRET-five", "SECRET-six", "jt-SECRET-seven", ADMIN_KEY}
    env = await start_console(
        nursery, database, join_token="jt-SECRET-one", join_tokens={"ops": "jt-SECRET-two"},
        groups={"team": GroupSettings(join_token="jt-SECRET-three",
                                      join_tokens={"spare": "jt-SECRET-seven"},
                                      api_keys=["sk-SECRET-four"])},
        aliases={"fast": ["tooti-sim", "other"]},
        cors=CorsSettings(allow_origins=["https://app.example"]))
    # The URL the settings name (the gateway was handed the test's database itself).
    env.gateway.settings = msgspec.structs.replace(env.gateway.settings, database=(
        "postgresql://tooti:pw-SECRET-five@db.example:5432/tooti?sslpassword=SECRET-six"))
    try:
        await env.add_node([simulated()], "n1", join_token="jt-SECRET-one")
        bob = await env.account("bob")
        _, key = await env.service.create_key(bob.id, "k")
        browser = await admin(env)
        pages = {}
        for path in (*ADMIN_GETS[:-1], f"/console/admin/accounts/{bob.id}"):
            pages[path] = await browser.get(path)
        pages["ledger run"] = await browser.post("/console/admin/ledger")
        async with httpx.AsyncClient(base_url=env.url, timeout=20) as http:
            assert (await http.post("/v1/chat/completions", json=CHAT,
                                    headers=bearer(ADMIN_KEY))).status_code == 200
        with trio.fail_after(10):
            async with browser.http.stream("GET", "/console/admin/events") as response:
                seen: list[tuple[str, Any]] = []
                await read_events(response.aiter_lines(), "snapshot", seen)
        for path, page in pages.items():
            assert page.status_code == 200, (path, page.text)
            for secret in secrets_:
                assert secret not in page.text, (path, secret)
        stream_text = json.dumps(seen)
        assert not [s for s in secrets_ if s in stream_text]
        config = pages["/console/admin/config"].text
        for shown in ("admin key</th><td>set<", "join token (default)</th><td>set<",
                      "1 set: ops", "<th>team</th>", "db.example", "tooti:***@",
                      "?sslpassword=***", "tooti-sim, other", "https://app.example",
                      "LeastLoaded", "127.0.0.1:0",
                      "max body bytes</th><td>4194304<", "console</th><td>on<"):
            assert shown in config, shown
        assert key.prefix in pages[f"/console/admin/accounts/{bob.id}"].text
    finally:
        for opened in env.browsers:
            await opened.aclose()
        env.gateway.shutdown()


# ------------------------------------------------------------ in a real browser

async def test_live_network_and_requests_in_a_browser(
        console_env: ConsoleEnv, browser: Any) -> None:
    """console.js follows the event stream on the admin pages: a node joining while
    the page is open appears, a disable made elsewhere shows, a request appears on the
    live request page; the action buttons it draws post to the console; no errors
    under the CSP."""
    from selenium.webdriver.common.by import By

    from tests.browser import browser_errors, in_thread, screenshot, wait_for

    await console_env.add_node([simulated()], "n1")
    token = await console_env.gateway.console.ctx.links.mint("admin")  # type: ignore[union-attr]
    await in_thread(browser.get, f"{console_env.url}/console/login/link?token={token}")
    await in_thread(lambda: browser.find_element(By.CSS_SELECTOR, "#link-form button").click())
    await in_thread(wait_for, browser, "header.top nav")
    await in_thread(browser.get, f"{console_env.url}/console/admin/network")
    await in_thread(wait_for, browser, "#live-status", text="live")
    await in_thread(wait_for, browser, '#peers tr[data-id="n1"].state-live')
    # console.js offers the buttons the server renders, per role, state and route.
    cases = [(role, state, via) for role in ("node", "relay", "gateway")
             for state in ("live", "disabled", "draining", "gone") for via in ("", "r1")]
    drawn = await in_thread(browser.execute_script, "return arguments[0].map("
                            "([role, state, via]) => peerActions({role, state, via}));",
                            cases)
    assert [tuple(a) for a in drawn] == [admin_pages.peer_actions(*c) for c in cases]
    await console_env.add_node([simulated()], "n2")  # arrives over the stream
    await in_thread(wait_for, browser, '#peers tr[data-id="n2"] td.actions button',
                    text="Disable")
    console_env.gateway.peer_control.disable("n2")  # elsewhere (the admin API)
    await in_thread(wait_for, browser, '#peers tr[data-id="n2"].state-disabled')
    await in_thread(wait_for, browser, '#peers tr[data-id="n2"] td.actions button',
                    text="Enable")
    await in_thread(screenshot, browser, "admin-network")

    def enable_n2() -> None:
        browser.execute_script("window.confirm = () => true;")
        button = browser.find_element(
            By.CSS_SELECTOR, '#peers tr[data-id="n2"] td.actions button')
        assert button.text == "Enable"
        button.click()

    await in_thread(enable_n2)
    await in_thread(wait_for, browser, ".notice.ok", text="Node n2: enabled")
    assert not console_env.gateway.registry.peers["n2"].disabled
    await in_thread(browser.get, f"{console_env.url}/console/admin/requests")
    await in_thread(wait_for, browser, "#live-status", text="live")
    async with httpx.AsyncClient(base_url=console_env.url, timeout=20) as http:
        answer = await http.post("/v1/chat/completions", json=CHAT, headers=bearer(ADMIN_KEY))
    row = await in_thread(wait_for, browser,
                          f'#live-requests tr[data-id="{answer.headers["x-request-id"]}"]',
                          text="finished")
    assert "admin" in row.text and answer.headers["x-tooti-node"] in row.text
    await in_thread(screenshot, browser, "admin-requests")
    bob = await console_env.account("bob")
    await console_env.service.top_up(bob.id, 25_000_000, idem_key="t1")
    await console_env.service.create_key(bob.id, "laptop")
    for path, name, ready in (
            ("accounts", "admin-accounts", f'#accounts tr[data-id="{bob.id}"]'),
            (f"accounts/{bob.id}", "admin-account", "#top-up-form"),
            ("ledger", "admin-ledger", "#ledger-form"),
            ("config", "admin-config", "table.config")):
        await in_thread(browser.get, f"{console_env.url}/console/admin/{path}")
        await in_thread(wait_for, browser, ready)
        if name == "admin-ledger":
            await in_thread(lambda: browser.find_element(
                By.CSS_SELECTOR, "#ledger-form button").click())
            await in_thread(wait_for, browser, "#ledger-ok")
        await in_thread(screenshot, browser, name)
    assert await in_thread(browser_errors, browser) == []


async def test_links_follow_the_public_url_not_the_host_header(
        nursery: trio.Nursery, database: Database) -> None:
    """With ``network.public_url`` set, a login link, the quick start and a join token's
    ``--peer`` line use it, whatever ``Host`` the request carried; without one, the
    browser's own host."""
    env = await start_console(nursery, database)
    env.gateway.station.network.public_url = "wss://gw.example.net/tooti/v1/tunnel"
    await env.account("olga", "operator")
    admin = env.browser()
    await env.sign_in(admin, "admin")
    olga = await env.service.find_account("olga")
    assert olga is not None
    forged = {"host": "evil.example"}
    await admin.get(f"/console/admin/accounts/{olga.id}", headers=forged)
    page = await admin.post(f"/console/admin/accounts/{olga.id}/login-link", {"ttl": "900"},
                            headers=forged)
    assert page.status_code == 200, page.text
    assert "https://gw.example.net/console/login/link?token=tl-tooti-" in page.text
    assert "evil.example" not in page.text
    quick = await admin.get("/console/quickstart", headers=forged)
    assert "https://gw.example.net/v1" in quick.text and "evil.example" not in quick.text
    nodes = await admin.get("/console/nodes", headers=forged)
    assert "evil.example" not in nodes.text
    env.gateway.station.network.public_url = ""
    own = await admin.get("/console/quickstart")
    assert env.url + "/v1" in own.text
    env.gateway.shutdown()
