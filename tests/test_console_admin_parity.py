"""The admin console can do what the admin CLI does (issue 16's parity), on a real
gateway (SQLite and PostgreSQL) with a real node and real paid requests:

* an account's limits (``tooti accounts limits``), an API key made for it (``tooti keys
  create``: secret shown once), its join tokens (``tooti join-tokens``: minted for a
  group it owns, shown once, revoked), a group owned by it (``tooti groups create
  --owner``), a code redeemed for it (``tooti invites|credits redeem --account``);
* ``/console/admin/groups`` (``tooti groups list``; each group's page opens for an
  admin), ``/console/admin/credits`` (``tooti credits code|codes``),
  ``/console/admin/earnings`` (``tooti earnings``, ``--export``, ``earnings payout``:
  a form sent twice pays once), the ledger replay (``tooti ledger replay``) and
  ``/console/admin/usage`` (``tooti usage``);
* every new page and form refused (403) to users and operators; bad input a 400 page
  with nothing changed. Each effect is checked in the database, in exact micro-units.
"""

from __future__ import annotations

import json
import re
from html import unescape
from typing import Any

import httpx

from tests.console_support import ADMIN_KEY, ConsoleEnv, assert_admin_only
from tests.test_console_accounts import usage_row
from tests.test_console_admin import IDEM, admin, row_of
from tests.test_console_operator import operator_with_node
from tooti import clock
from tooti.accounts.money import format_credits
from tooti.accounts.records import Limits
from tooti.billing.credits import COLUMNS
from tooti.billing.ledger import summarize
from tooti.console import admin_pages

SECRET = re.compile(r'<code class="secret" id="([a-z-]+)">([^<]+)</code>')
NEW_GETS = ("/console/admin/groups", "/console/admin/credits", "/console/admin/earnings",
            "/console/admin/earnings.csv", "/console/admin/earnings.json",
            "/console/admin/usage")
NEW_POSTS = ("/console/admin/accounts/admin/limits", "/console/admin/accounts/admin/keys",
             "/console/admin/accounts/admin/join-tokens",
             "/console/admin/accounts/admin/join-tokens/jt_x/revoke",
             "/console/admin/accounts/admin/groups", "/console/admin/accounts/admin/redeem",
             "/console/admin/credits", "/console/admin/earnings/payout",
             "/console/admin/ledger/replay", "/console/admin/usage")


def secret_in(html: str, element: str) -> str:
    """The secret shown in the ``.secret-box`` element ``element``."""
    assert 'class="secret-box"' in html
    found = {name: unescape(value) for name, value in SECRET.findall(html)}
    assert element in found, (element, found)
    return found[element]


async def test_users_and_operators_get_403_on_every_new_page_and_form(
        console_env: ConsoleEnv) -> None:
    env = console_env
    await assert_admin_only(env, NEW_GETS, NEW_POSTS, {
        "rpm": "1", "name": "evil", "amount": "5", "idem": "x", "account": "admin",
        "code": "tc-tooti-x", "group": ""})
    admin_account = await env.service.get_account("admin")
    assert admin_account.limits == Limits() and admin_account.balance == 0
    assert await env.service.list_keys() == []
    assert await env.service.list_join_tokens() == []
    assert await env.service.list_groups() == []
    assert await env.service.list_credit_codes() == []


async def test_account_limits_set_cleared_and_refused(console_env: ConsoleEnv) -> None:
    env = console_env
    bob = await env.account("bob")
    browser = await admin(env)
    path = f"/console/admin/accounts/{bob.id}"
    page = await browser.get(path)
    assert 'id="limits-form"' in page.text
    made = await browser.post(f"{path}/limits", {"rpm": "60", "tpm": "", "concurrency": "2"})
    assert made.status_code == 303 and made.headers["location"] == path
    assert (await env.service.get_account(bob.id)).limits == Limits(rpm=60, concurrency=2)
    shown = await browser.get(path)
    assert "Limits of bob: rpm 60, concurrency 2." in shown.text
    assert 'name="rpm" id="limits-rpm" inputmode="numeric" maxlength="16" value="60"' in \
        shown.text
    for bad in ({"rpm": "-1"}, {"tpm": "ten"}, {"concurrency": "1.5"}, {"rpm": "٣"}):
        await browser.get(path)
        refused = await browser.post(f"{path}/limits", bad)
        assert refused.status_code == 400, (bad, refused.text)
        assert 'id="account-error"' in refused.text
    assert (await env.service.get_account(bob.id)).limits == Limits(rpm=60, concurrency=2)
    await browser.get(path)
    cleared = await browser.post(f"{path}/limits", {"rpm": "", "tpm": "", "concurrency": ""})
    assert cleared.status_code == 303
    assert (await env.service.get_account(bob.id)).limits == Limits()
    await browser.get(path)
    assert (await browser.post("/console/admin/accounts/nobody/limits",
                               {"rpm": "1"})).status_code == 404


async def test_api_key_made_for_an_account_is_shown_once(console_env: ConsoleEnv) -> None:
    env = console_env
    olga = await env.account("olga", "operator")
    bob = await env.account("bob")
    team = await env.service.create_group(olga.id, "team")
    invite, _ = await env.service.create_invite(team.id, olga.id)
    await env.service.redeem_invite(invite, bob.id)
    await env.service.create_group(olga.id, "other")  # bob is not a member
    browser = await admin(env)
    path = f"/console/admin/accounts/{bob.id}"
    await browser.get(path)
    form = {"name": "laptop", "expires": "30d", "models": "m1, m2,m1", "group": "team",
            "rpm": "10", "tpm": "", "concurrency": "3", "budget_day": "2.5",
            "budget_month": "0.000001"}
    bad_forms = [{**form, "budget_day": "-1"}, {**form, "rpm": "x"},
                 {**form, "group": "other"}, {**form, "group": "nope"},
                 {**form, "expires": "soon"}, {**form, "budget_month": "1e3"}]
    for bad in bad_forms:
        await browser.get(path)
        refused = await browser.post(f"{path}/keys", bad)
        assert refused.status_code == 400, (bad, refused.text)
        assert 'id="account-error"' in refused.text and 'id="new-key-box"' not in refused.text
    assert await env.service.list_keys(bob.id) == []
    await browser.get(path)
    before = clock.wall()
    made = await browser.post(f"{path}/keys", form)
    assert made.status_code == 200, made.text
    secret = secret_in(made.text, "new-key-secret")
    found = await env.service.find_key_by_secret(secret)
    assert found is not None
    key, owner = found
    assert owner.id == bob.id and key.name == "laptop" and key.group == "team"
    assert key.models == ("m1", "m2")
    assert key.limits == Limits(rpm=10, concurrency=3, budget_day=2_500_000, budget_month=1)
    assert key.expires_at is not None and before + 30 * 86400 <= key.expires_at \
        <= clock.wall() + 30 * 86400
    again = await browser.get(path)
    assert secret not in again.text and key.prefix in row_of(again.text, key.id)
    assert "rpm 10, concurrency 3" in row_of(again.text, key.id)
    # The account may make a key: the same key the CLI's POST /admin/v1/keys makes works.
    async with httpx.AsyncClient(base_url=env.url, timeout=20) as http:
        listed = await http.get("/admin/v1/keys", params={"account": "bob"},
                                headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert [k["id"] for k in listed.json()["data"]] == [key.id]


async def test_join_tokens_and_groups_of_an_operator(console_env: ConsoleEnv) -> None:
    env = console_env
    olga = await env.account("olga", "operator")
    oscar = await env.account("oscar", "operator")
    bob = await env.account("bob")
    theirs = await env.service.create_group(oscar.id, "theirs")
    _, oscar_token = await env.service.create_join_token(oscar.id, name="o")
    browser = await admin(env)
    path = f"/console/admin/accounts/{olga.id}"
    # A group owned by olga (as tooti groups create --owner olga --no-public-nodes).
    await browser.get(path)
    made = await browser.post(f"{path}/groups", {"name": "team", "public_nodes": "no"})
    assert made.status_code == 303 and made.headers["location"] == path
    team = await env.service.get_group("team")
    assert team.owner_id == olga.id and team.public_nodes is False and team.members == 1
    for bad, status in (({"name": "team"}, 409), ({"name": "bad name!"}, 400),
                        ({"name": "x2", "public_nodes": "maybe"}, 400)):
        await browser.get(path)
        assert (await browser.post(f"{path}/groups", bad)).status_code == status, bad
    bob_path = f"/console/admin/accounts/{bob.id}"
    await browser.get(bob_path)
    assert 'id="group-form"' not in (await browser.get(bob_path)).text
    assert (await browser.post(f"{bob_path}/groups", {"name": "bobs"})).status_code == 403
    assert {grp.name for grp in await env.service.list_groups()} == {"theirs", "team"}
    # Join tokens: minted for olga's group, shown once, listed by prefix, revoked.
    page = await browser.get(path)
    options = page.text.split('id="join-token-group"', 1)[1].split("</select>", 1)[0]
    assert 'value="team"' in options and 'value="theirs"' not in options
    for bad in ({"group": "theirs"}, {"group": "nope"}, {"name": "a\x01b"}):
        await browser.get(path)
        refused = await browser.post(f"{path}/join-tokens", bad)
        assert refused.status_code == 400, (bad, refused.text)
    await browser.get(bob_path)
    assert (await browser.post(f"{bob_path}/join-tokens", {})).status_code == 403
    assert [t.id for t in await env.service.list_join_tokens()] == [oscar_token.id]
    await browser.get(path)
    minted = await browser.post(f"{path}/join-tokens", {"name": "rack-2", "group": "team"})
    assert minted.status_code == 200, minted.text
    secret = secret_in(minted.text, "join-token-secret")
    tokens = await env.service.list_join_tokens(olga.id)
    assert [(t.name, t.group, t.revoked_at) for t in tokens] == [("rack-2", "team", None)]
    assert secret.startswith(tokens[0].prefix)
    listed = await browser.get(path)
    assert secret not in listed.text and tokens[0].prefix in row_of(listed.text, tokens[0].id)
    other = await browser.post(f"{path}/join-tokens/{oscar_token.id}/revoke")
    assert other.status_code == 404
    revoked = await browser.post(f"{path}/join-tokens/{tokens[0].id}/revoke")
    assert revoked.status_code == 303
    by_id = {t.id: t for t in await env.service.list_join_tokens()}
    assert by_id[tokens[0].id].revoked_at is not None
    assert by_id[oscar_token.id].revoked_at is None
    # Every group, with its owner and members, each opening its page for the admin.
    groups = await browser.get("/console/admin/groups")
    assert groups.status_code == 200
    row = row_of(groups.text, team.id)
    assert 'href="/console/groups/team">team</a>' in row and ">olga</a>" in row
    assert '<td class="num">1</td>' in row and "<td>no</td>" in row
    assert ">oscar</a>" in row_of(groups.text, theirs.id)
    for name in ("team", "theirs"):
        opened = await browser.get(f"/console/groups/{name}")
        assert opened.status_code == 200, (name, opened.text)


async def test_redeem_a_code_for_an_account(console_env: ConsoleEnv) -> None:
    env = console_env
    olga = await env.account("olga", "operator")
    bob = await env.account("bob")
    admin_account = await env.service.get_account("admin")
    code, _ = await env.service.create_credit_code(1_250_000, admin_account.id)
    team = await env.service.create_group(olga.id, "team")
    invite, _ = await env.service.create_invite(team.id, olga.id)
    browser = await admin(env)
    path = f"/console/admin/accounts/{bob.id}"
    for bad in ("", "hello", "tc-tooti-unknown", "ti-tooti-unknown"):
        await browser.get(path)
        refused = await browser.post(f"{path}/redeem", {"code": bad})
        assert refused.status_code == 400, (bad, refused.text)
    await browser.get(path)
    assert (await browser.post(f"{path}/redeem", {"code": code})).status_code == 303
    assert (await env.service.get_account(bob.id)).balance == 1_250_000
    await browser.get(path)
    assert (await browser.post(f"{path}/redeem", {"code": invite})).status_code == 303
    assert [m.id for m in await env.service.members(team.id)] == [olga.id, bob.id]
    await browser.get(path)
    used = await browser.post(f"{path}/redeem", {"code": code})
    assert used.status_code == 410  # used up: the service's refusal on the page
    assert (await env.service.get_account(bob.id)).balance == 1_250_000


async def test_credit_codes_made_shown_once_and_listed(console_env: ConsoleEnv) -> None:
    env = console_env
    bob = await env.account("bob")
    browser = await admin(env)
    page = await browser.get("/console/admin/credits")
    assert page.status_code == 200 and 'id="credit-code-form"' in page.text
    for bad in ({"amount": "-1"}, {"amount": "abc"}, {"amount": "0"}, {"amount": ""},
                {"amount": "1.0000001"}, {"amount": "5", "expires": "later"}):
        await browser.get("/console/admin/credits")
        refused = await browser.post("/console/admin/credits", bad)
        assert refused.status_code == 400, (bad, refused.text)
        assert 'id="credits-error"' in refused.text and "secret-box" not in refused.text
    assert await env.service.list_credit_codes() == []
    await browser.get("/console/admin/credits")
    before = clock.wall()
    made = await browser.post("/console/admin/credits", {"amount": "2.000001",
                                                         "expires": "7d"})
    assert made.status_code == 200
    secret = secret_in(made.text, "credit-code-secret")
    [code] = await env.service.list_credit_codes()
    assert code.amount == 2_000_001 and code.redeemed_by is None
    assert code.expires_at is not None and before + 7 * 86400 <= code.expires_at \
        <= clock.wall() + 7 * 86400
    assert secret.startswith(code.prefix)
    assert await env.service.redeem_credit_code(secret, bob.id) == 2_000_001
    listed = await browser.get("/console/admin/credits")
    assert secret not in listed.text
    row = row_of(listed.text, code.id)
    assert f"<code>{code.prefix}…</code>" in row and '"num">2.000001<' in row
    assert "<td>bob</td>" in row


async def test_earnings_export_and_a_payout_sent_twice_pays_once(
        console_env: ConsoleEnv) -> None:
    env = console_env
    operator_id, _ = await operator_with_node(env)
    earned = (await env.service.get_account(operator_id)).earnings
    assert earned > 0
    browser = await admin(env)
    page = await browser.get("/console/admin/earnings")
    assert page.status_code == 200
    operator_row = row_of(page.text, operator_id)
    assert ">olga</a>" in operator_row and "<td class=\"num\">2</td>" in operator_row
    assert f'"num">{format_credits(earned)}</td>' in operator_row  # owed now
    assert "node-o" in row_of(page.text, "node-o")
    # The exports are the admin API's.
    async with httpx.AsyncClient(base_url=env.url, timeout=20,
                                 headers={"authorization": f"Bearer {ADMIN_KEY}"}) as http:
        for fmt in ("csv", "json"):
            api = await http.get("/admin/v1/earnings/export", params={"format": fmt})
            mine = await browser.get(f"/console/admin/earnings.{fmt}")
            assert mine.status_code == 200 and mine.content == api.content, fmt
            assert operator_id in mine.text
    assert json.loads(mine.text)["data"][0]["owed"] == earned
    # A payout, the form sent twice: paid once.
    page = await browser.get("/console/admin/earnings")
    idem = IDEM.search(page.text)
    assert idem, "the payout form has no idempotency key"
    form = {"account": operator_id, "amount": "0.000003", "idem": idem.group(1)}
    first = await browser.post("/console/admin/earnings/payout", form)
    second = await browser.post("/console/admin/earnings/payout", form)
    assert first.status_code == second.status_code == 303
    assert (await env.service.get_account(operator_id)).earnings == earned - 3
    shown = await browser.get(first.headers["location"])
    assert "Payout of 0.000003 credits to olga recorded" in shown.text
    fresh = IDEM.search(shown.text)
    assert fresh and fresh.group(1) != form["idem"]
    # Refusals: a 400 (or the service's 409) page, nothing paid.
    refusals = [({**form, "amount": "9"}, 409),  # the same form id for another amount
                ({**form, "idem": fresh.group(1), "amount": "-1"}, 400),
                ({**form, "idem": fresh.group(1), "amount": "abc"}, 400),
                ({**form, "idem": fresh.group(1), "account": "nobody"}, 400),
                ({**form, "idem": ""}, 400),
                ({**form, "idem": fresh.group(1), "amount": "1000"}, 409)]  # > owed
    for bad, status in refusals:
        await browser.get("/console/admin/earnings")
        refused = await browser.post("/console/admin/earnings/payout", bad)
        assert refused.status_code == status, (bad, refused.text)
        assert 'id="earnings-error"' in refused.text
    assert (await env.service.get_account(operator_id)).earnings == earned - 3
    bad_period = await browser.get("/console/admin/earnings", params={"since": "soon"})
    assert bad_period.status_code == 400


async def test_usage_page_is_tooti_usage(console_env: ConsoleEnv) -> None:
    env = console_env
    operator_id, _ = await operator_with_node(env)
    database = env.gateway.database
    assert database is not None
    browser = await admin(env)
    called: list[str] = []
    summarize_ = admin_pages.summarize

    def counted(db: Any, by: str) -> Any:
        called.append(by)
        return summarize_(db, by)

    admin_pages.summarize = counted  # type: ignore[assignment]
    try:
        shown = await browser.get("/console/admin/usage")  # a GET scans nothing
        assert shown.status_code == 200 and 'id="usage-form"' in shown.text
        assert called == [] and 'id="usage-by-' not in shown.text
        page = await browser.post("/console/admin/usage")
    finally:
        admin_pages.summarize = summarize_  # type: ignore[assignment]
    assert page.status_code == 200
    assert called == ["account", "model", "node", "key", "status", "owner"]
    for by in ("account", "model", "node", "key", "status", "owner"):
        table = page.text.split(f'id="usage-by-{by}"', 1)[1].split("</table>", 1)[0]
        rows = summarize(database, by)
        assert rows, by
        for row in rows:
            cells = re.findall(r'<td class="num">([^<]*)</td>', row_of(table, row.group))
            assert cells[:3] == [str(row.requests), str(row.prompt_tokens),
                                 str(row.completion_tokens)], (by, cells)
    node = row_of(page.text.split('id="usage-by-node"', 1)[1], "node-o")
    assert '<td class="num">2</td>' in node
    assert "(olga)" in row_of(page.text.split('id="usage-by-owner"', 1)[1], operator_id)


async def test_ledger_replay_bills_the_quarantine_once(console_env: ConsoleEnv) -> None:
    env = console_env
    database = env.gateway.database
    assert database is not None
    record = usage_row("req-q", clock.wall(), "", "m")
    assert set(record) == set(COLUMNS)
    database.write_sync(lambda tx: tx.run(
        "INSERT INTO usage_quarantine (request_id, ts, error, row_json) VALUES (?, ?, ?, ?)",
        ("req-q", clock.wall(), "test", json.dumps(record))))
    browser = await admin(env)
    page = await browser.get("/console/admin/ledger")
    assert 'id="ledger-replay-form"' in page.text
    replayed = await browser.post("/console/admin/ledger/replay")
    assert replayed.status_code == 303
    assert replayed.headers["location"] == "/console/admin/ledger"
    shown = await browser.get("/console/admin/ledger")
    assert "Replayed 1 quarantined request(s) (0 were billed before), 0 still refused." \
        in shown.text
    assert database.read_sync(lambda tx: tx.all(
        "SELECT request_id, prompt_tokens FROM usage")) == [("req-q", 10)]
    assert database.read_sync(lambda tx: tx.value(
        "SELECT COUNT(*) FROM usage_quarantine")) == 0
    await browser.get("/console/admin/ledger")
    assert (await browser.post("/console/admin/ledger/replay")).status_code == 303
    assert "Replayed 0 quarantined" in (await browser.get("/console/admin/ledger")).text
    assert database.read_sync(lambda tx: tx.value("SELECT COUNT(*) FROM usage")) == 1


async def test_nul_bytes_and_long_text_in_every_new_form_are_refused_cleanly(
        console_env: ConsoleEnv) -> None:
    """PostgreSQL text cannot hold a NUL: every new field and path id with one (or 10 kB
    of text) is a 400/404 page, never a 500, and nothing changes."""
    env = console_env
    olga = await env.account("olga", "operator")
    browser = await admin(env)
    base = f"/console/admin/accounts/{olga.id}"
    forms = {f"{base}/limits": ("rpm", "tpm", "concurrency"),
             f"{base}/keys": ("name", "expires", "models", "group", "rpm", "tpm",
                              "concurrency", "budget_day", "budget_month"),
             f"{base}/join-tokens": ("name", "group"), f"{base}/groups": ("name",
                                                                        "public_nodes"),
             f"{base}/redeem": ("code",), "/console/admin/credits": ("amount", "expires"),
             "/console/admin/earnings/payout": ("account", "amount", "idem")}
    for action, fields in forms.items():
        for field in fields:
            for bad in ("nul\x00byte", "\x00", "y" * 10_000):
                await browser.get("/console/admin/credits")
                answer = await browser.post(action, {"amount": "1", "idem": "i1",
                                                     "account": olga.id, field: bad})
                assert answer.status_code in (400, 404, 409, 413), (action, field, answer.text)
    for path in (f"{base}/join-tokens/jt%00x/revoke", f"{base}/keys/k%00x/revoke",
                 "/console/admin/accounts/a%00b/limits"):
        await browser.get("/console/admin/credits")
        assert (await browser.post(path, {"rpm": "1"})).status_code in (400, 404), path
    assert (await env.service.get_account(olga.id)).limits == Limits()
    assert await env.service.list_keys() == [] and await env.service.list_groups() == []
    assert await env.service.list_join_tokens() == []
    assert await env.service.list_credit_codes() == []
    bad_since = await browser.get("/console/admin/earnings", params={"since": "a\x00"})
    assert bad_since.status_code == 400
