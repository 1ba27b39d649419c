"""The console's operator pages against a real gateway (SQLite and PostgreSQL): a real
node joined with the operator's join token, real paid requests from a user with credit,
then the nodes page (live node, model, price, earnings bar), the join token, group and
invite forms (secrets shown once, never listed again), the earnings page and its CSV /
JSON export (this operator's row only), and the authorization of every operator page
(a user: 403; another operator: 404 for this operator's group, invite and token ids)."""

from __future__ import annotations

import csv
import io
import re

import httpx

from tests.console_support import ConsoleEnv
from tooti.accounts.money import format_credits
from tooti.backends.simulated import SimulatedBackend
from tooti.settings import BackendSettings

PRICE_IN = 0.0
PRICE_OUT = 1000.0
"""Credits per 1M completion tokens: 1,000 micro-units per token."""
TOKENS = 5
COST = TOKENS * 1000
SECRET_IN_BOX = re.compile(r'<code class="secret" id="[a-z-]+secret">([^<]+)</code>')

OPERATOR_PAGES = ["/console/nodes", "/console/groups", "/console/earnings",
                  "/console/earnings.csv", "/console/earnings.json"]


def priced_backend(model: str = "tooti-sim") -> SimulatedBackend:
    return SimulatedBackend(BackendSettings(
        type="simulated", models=[model], max_concurrency=8, price_input=PRICE_IN,
        price_output=PRICE_OUT, options={"tokens": TOKENS}))


async def operator_with_node(env: ConsoleEnv, name: str = "olga", node_id: str = "node-o",
                             model: str = "tooti-sim") -> tuple[str, str]:
    """An operator whose node (joined with its token, the only one serving ``model``)
    served two paid requests; returns (operator id, join token secret)."""
    operator = await env.account(name, "operator")
    token, _ = await env.service.create_join_token(operator.id, name="rack-1")
    directory = env.gateway.station.join_directory
    assert directory is not None
    await directory.wait_current()  # else a loopback node would join as the admin's
    await env.add_node([priced_backend(model)], node_id, join_token=token)
    user = await env.account(f"{name}-user", "user")
    await env.service.top_up(user.id, 1_000_000, idem_key=f"top-{name}")
    key, _ = await env.service.create_key(user.id, "k")
    async with httpx.AsyncClient(base_url=env.url, timeout=20) as http:
        for _ in range(2):
            answer = await http.post(
                "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                json={"model": model, "max_tokens": TOKENS,
                      "messages": [{"role": "user", "content": "hi"}]})
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-tooti-node"] == node_id
    await env.flush_billing()
    return operator.id, token


def secret_of(html: str) -> str:
    found = SECRET_IN_BOX.search(html)
    assert found, "no secret shown"
    return found.group(1)


async def test_nodes_page_shows_the_live_node_its_price_and_earnings(
        console_env: ConsoleEnv) -> None:
    env = console_env
    operator_id, token = await operator_with_node(env)
    browser = env.browser()
    await env.sign_in(browser, "olga")
    page = await browser.get("/console/nodes")
    assert page.status_code == 200, page.text
    html = page.text
    row = re.search(r'<tr class="node-row" data-node="node-o">(.*?)</tr>', html, re.S)
    assert row, html
    assert 'badge live' in row.group(1) and "tooti-sim" in row.group(1)
    assert ">1000<" in row.group(1)  # the completion price, credits per 1M tokens
    assert "/ 8<" in row.group(1)  # load: in flight / capacity
    # tokens/s as the gateway measured the two requests (the last cell)
    assert re.search(r'<td class="num">\d+\.\d</td>\s*$', row.group(1)), row.group(1)
    # the earnings chart has a bar for today, for node-o, with what it earned
    earned = env.gateway.database.read_sync(lambda tx: tx.value(  # type: ignore[union-attr]
        "SELECT SUM(earned) FROM usage WHERE owner_id = ?", (operator_id,)))
    assert int(earned) > 0
    assert re.search(r'<rect class="c0"[^>]*><title>\d{4}-\d\d-\d\d node-o: ', html)
    # the join token is listed by prefix, its secret never
    assert "rack-1" in html and token not in html
    assert token[:12] in html

    # a node that goes away is shown offline (it is still bound to the account)
    env.scopes["node-o"].cancel()
    registry = env.gateway.registry
    await registry.wait_until(lambda: "node-o" not in registry.peers)
    html = (await browser.get("/console/nodes")).text
    row = re.search(r'<tr class="node-row" data-node="node-o">(.*?)</tr>', html, re.S)
    assert row and "badge offline" in row.group(1), html


async def test_join_tokens_minted_shown_once_and_revoked(console_env: ConsoleEnv) -> None:
    env = console_env
    operator = await env.account("otto", "operator")
    other = await env.account("oscar", "operator")
    theirs, their_token = await env.service.create_join_token(other.id, name="theirs")
    browser = env.browser()
    await env.sign_in(browser, "otto")
    await browser.get("/console/nodes")
    minted = await browser.post("/console/nodes/tokens", {"name": "laptop", "group": ""})
    assert minted.status_code == 200, minted.text
    secret = secret_of(minted.text)
    assert secret.startswith("tj-tooti-")
    assert f"TOOTI_JOIN_TOKEN={secret} tooti run --role node --peer ws://" in minted.text
    tokens = await env.service.list_join_tokens(operator.id)
    assert [t.name for t in tokens] == ["laptop"]
    listed = await browser.get("/console/nodes")
    assert secret not in listed.text and tokens[0].prefix in listed.text
    # another operator's token id is unknown here, and stays valid
    refused = await browser.post(f"/console/nodes/tokens/{their_token.id}/revoke")
    assert refused.status_code == 404
    assert (await env.service.list_join_tokens(other.id))[0].revoked_at is None
    assert theirs not in refused.text
    revoked = await browser.post(f"/console/nodes/tokens/{tokens[0].id}/revoke")
    assert revoked.status_code == 303
    assert (await env.service.list_join_tokens(operator.id))[0].revoked_at is not None
    # another operator's group is not one to mint for (404, as an unknown group)
    await env.service.create_group(other.id, "oscars")
    await browser.get("/console/nodes")
    assert (await browser.post("/console/nodes/tokens",
                               {"group": "oscars"})).status_code == 404


async def test_groups_invites_members_and_group_tokens(console_env: ConsoleEnv) -> None:
    env = console_env
    operator = await env.account("gina", "operator")
    user = await env.account("ursula", "user")
    browser = env.browser()
    await env.sign_in(browser, "gina")
    await browser.get("/console/groups")
    created = await browser.post("/console/groups", {"name": "lab", "public_nodes": "on"})
    assert created.status_code == 303 and created.headers["location"] == "/console/groups/lab"
    group = await env.service.get_group("lab")
    assert group.owner_id == operator.id and group.public_nodes is True
    taken = await browser.post("/console/groups", {"name": "lab"})
    assert taken.status_code == 400 and "notice error" in taken.text
    bad = await browser.post("/console/groups", {"name": ""})
    assert bad.status_code == 400
    listing = await browser.get("/console/groups")
    assert 'data-group="lab"' in listing.text

    page = await browser.get("/console/groups/lab")
    assert page.status_code == 200 and "gina" in page.text
    made = await browser.post("/console/groups/lab/invites",
                              {"max_uses": "3", "expires_days": "7"})
    assert made.status_code == 200, made.text
    code = secret_of(made.text)
    assert code.startswith("ti-tooti-")
    [invite] = await env.service.list_invites("lab")
    assert invite.max_uses == 3 and invite.expires_at is not None
    assert (await browser.post("/console/groups/lab/invites",
                               {"max_uses": "zero"})).status_code == 400
    # the user redeems it: a member, listed; the code is never listed
    await env.service.redeem_invite(code, user.id)
    page = await browser.get("/console/groups/lab")
    assert code not in page.text and "1 / 3" in page.text
    assert f'data-member="{user.id}"' in page.text
    removed = await browser.post(f"/console/groups/lab/members/{user.id}/remove")
    assert removed.status_code == 303
    assert [m.id for m in await env.service.members("lab")] == [operator.id]
    revoked = await browser.post(f"/console/groups/lab/invites/{invite.id}/revoke")
    assert revoked.status_code == 303
    assert (await env.service.list_invites("lab"))[0].revoked_at is not None

    minted = await browser.post("/console/groups/lab/tokens", {"name": "gpu"})
    assert minted.status_code == 200
    secret = secret_of(minted.text)
    [token] = await env.service.list_join_tokens(operator.id)
    assert token.group == "lab" and token.name == "gpu"
    assert secret not in (await browser.get("/console/groups/lab")).text

    # another operator: every id of this group is unknown (404), nothing changes
    await env.account("hank", "operator")
    stranger = env.browser()
    await env.sign_in(stranger, "hank")
    assert (await stranger.get("/console/groups/lab")).status_code == 404
    assert (await stranger.get("/console/groups/nope")).status_code == 404
    for path in ("/console/groups/lab/invites", "/console/groups/lab/tokens",
                 f"/console/groups/lab/invites/{invite.id}/revoke",
                 f"/console/groups/lab/members/{operator.id}/remove"):
        assert (await stranger.post(path, {"max_uses": "1"})).status_code == 404, path
    assert 'data-group="lab"' not in (await stranger.get("/console/groups")).text
    assert len(await env.service.list_invites("lab")) == 1
    # an invite id of another group is unknown in this one
    await env.service.create_group((await env.service.find_account("hank")).id,  # type: ignore[union-attr]
                                   "hanks")
    _, theirs = await env.service.create_invite("hanks", (await env.service.find_account(
        "hank")).id)  # type: ignore[union-attr]
    await browser.get("/console/groups/lab")
    assert (await browser.post(
        f"/console/groups/lab/invites/{theirs.id}/revoke")).status_code == 404
    assert (await env.service.list_invites("hanks"))[0].revoked_at is None


async def test_earnings_page_and_export_are_the_operators_own(
        console_env: ConsoleEnv) -> None:
    env = console_env
    olga_id, _ = await operator_with_node(env, "olga", "node-o")
    pete_id, _ = await operator_with_node(env, "pete", "node-p", "pete-model")
    browser = env.browser()
    await env.sign_in(browser, "olga")
    page = await browser.get("/console/earnings")
    assert page.status_code == 200
    assert 'data-node="node-o"' in page.text and "node-p" not in page.text
    earned = int(env.gateway.database.read_sync(lambda tx: tx.value(  # type: ignore[union-attr]
        "SELECT SUM(earned) FROM usage WHERE owner_id = ?", (olga_id,))))
    owed = re.search(r'id="owed-now">.*?class="value">([^<]+)<', page.text, re.S)
    assert owed and owed.group(1) == format_credits(earned)

    exported = await browser.get("/console/earnings.csv")
    assert exported.status_code == 200
    assert exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [row["owner_id"] for row in rows] == [olga_id]
    assert int(rows[0]["earned"]) == earned and int(rows[0]["owed"]) == earned
    assert pete_id not in exported.text
    as_json = (await browser.get("/console/earnings.json")).json()
    assert [row["owner_id"] for row in as_json["data"]] == [olga_id]
    # a period before the requests: nothing earned in it (owed stays)
    old = await browser.get("/console/earnings.csv",
                            params={"since": "2000-01-01", "until": "2000-01-02"})
    [row] = list(csv.DictReader(io.StringIO(old.text)))
    assert int(row["earned"]) == 0 and int(row["owed"]) == earned
    bad = await browser.get("/console/earnings", params={"since": "yesterday-ish"})
    assert bad.status_code == 400
    # the nodes page: olga's live node, never pete's (live on the same gateway)
    nodes = (await browser.get("/console/nodes")).text
    assert 'data-node="node-o"' in nodes and "node-p" not in nodes


async def test_operator_pages_refuse_users(console_env: ConsoleEnv) -> None:
    env = console_env
    await env.account("uma", "user")
    await env.account("ozzy", "operator")
    await env.service.create_group((await env.service.find_account("ozzy")).id,  # type: ignore[union-attr]
                                   "ozgroup")
    browser = env.browser()
    await env.sign_in(browser, "uma")
    for path in [*OPERATOR_PAGES, "/console/groups/ozgroup"]:
        assert (await browser.get(path)).status_code == 403, path
    for path in ("/console/nodes/tokens", "/console/groups", "/console/groups/ozgroup/invites",
                 "/console/groups/ozgroup/tokens"):
        assert (await browser.post(path, {"name": "x"})).status_code == 403, path
    assert await env.service.list_join_tokens() == []
    assert len(await env.service.list_groups()) == 1
    # signed out: to the sign-in page
    anonymous = env.browser()
    for path in OPERATOR_PAGES:
        answer = await anonymous.get(path)
        assert answer.status_code == 303 and answer.headers["location"] == "/console/login"


async def test_an_admin_sees_operator_pages_and_manages_any_group(
        console_env: ConsoleEnv) -> None:
    env = console_env
    owner = await env.account("opal", "operator")
    await env.service.create_group(owner.id, "opals")
    admin = env.browser()
    await env.sign_in(admin, "admin")
    for path in OPERATOR_PAGES:
        assert (await admin.get(path)).status_code == 200, path
    page = await admin.get("/console/groups/opals")
    assert page.status_code == 200 and "opal" in page.text
    made = await admin.post("/console/groups/opals/invites", {"max_uses": "2"})
    assert made.status_code == 200 and secret_of(made.text).startswith("ti-tooti-")
    [invite] = await env.service.list_invites("opals")
    assert invite.max_uses == 2 and invite.expires_at is None
    # the operator's own page lists it (by prefix only)
    operator = env.browser()
    await env.sign_in(operator, "opal")
    listed = await operator.get("/console/groups/opals")
    assert f'data-invite="{invite.id}"' in listed.text
    assert secret_of(made.text) not in listed.text
