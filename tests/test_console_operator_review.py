"""Review fixes of the console's operator pages against a real gateway (SQLite and
PostgreSQL): a join token an admin mints on another operator's group page is the
owner's (the nodes joining with it earn for the owner) and that page lists the owner's
tokens; the earnings page reads only its operator's rows; advertised prices render
exactly, converted to micro-units as billing converts them."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.console_support import ConsoleEnv
from tests.test_console_operator import operator_with_node, secret_of
from tooti.accounts import earnings
from tooti.accounts.database import Database
from tooti.accounts.money import format_credits, price_micros
from tooti.backends.simulated import SimulatedBackend
from tooti.settings import BackendSettings

PRICE_IN = 12.3456789
PRICE_OUT = 999999.5
"""Credits per 1M tokens that ``%g`` (six significant digits) would round."""


async def test_admin_mints_a_group_token_for_the_groups_owner(
        console_env: ConsoleEnv) -> None:
    env = console_env
    owner = await env.account("opal", "operator")
    admin_id = (await env.service.find_account("admin")).id  # type: ignore[union-attr]
    await env.service.create_group(owner.id, "opals")
    admin = env.browser()
    await env.sign_in(admin, "admin")
    await admin.get("/console/groups/opals")
    made = await admin.post("/console/groups/opals/tokens", {"name": "for-opal"})
    assert made.status_code == 200, made.text
    secret = secret_of(made.text)
    [token] = await env.service.list_join_tokens(owner.id)
    assert token.name == "for-opal" and token.group == "opals"
    assert secret.startswith(token.prefix)
    assert await env.service.list_join_tokens(admin_id) == []
    # the group page (the admin's view too) lists the owner's token for the group
    listed = await admin.get("/console/groups/opals")
    assert token.prefix in listed.text and secret not in listed.text
    # the nodes page's form, given the group, mints for the owner as well
    await admin.get("/console/nodes")
    minted = await admin.post("/console/nodes/tokens", {"name": "via-nodes",
                                                        "group": "opals"})
    assert minted.status_code == 200, minted.text
    assert [t.name for t in await env.service.list_join_tokens(owner.id)] == [
        "for-opal", "via-nodes"]
    assert await env.service.list_join_tokens(admin_id) == []
    operator = env.browser()
    await env.sign_in(operator, "opal")
    page = await operator.get("/console/groups/opals")
    assert len(re.findall(re.escape(token.prefix), page.text)) >= 1


async def test_earnings_page_reads_only_its_operators_rows(
        console_env: ConsoleEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    env = console_env
    olga_id, _ = await operator_with_node(env, "olga", "node-o")
    pete_id, _ = await operator_with_node(env, "pete", "node-p", "pete-model")
    db = env.gateway.database
    assert db is not None
    everyone = earnings.payouts(db)
    assert {row.owner_id for row in everyone} == {olga_id, pete_id}
    assert earnings.payouts(db, owner=olga_id) == [
        row for row in everyone if row.owner_id == olga_id]
    assert earnings.payouts(db, owner="acct_nobody") == []
    # every usage scan the pages make is filtered to the signed-in operator
    owners: list[str | None] = []
    real = earnings.by_node

    def spy(database: Database, *, since: float | None = None,
            until: float | None = None, owner: str | None = None) -> list[Any]:
        owners.append(owner)
        return real(database, since=since, until=until, owner=owner)

    monkeypatch.setattr(earnings, "by_node", spy)
    browser = env.browser()
    await env.sign_in(browser, "olga")
    for path in ("/console/earnings", "/console/earnings.csv", "/console/earnings.json"):
        assert (await browser.get(path)).status_code == 200, path
    assert owners and set(owners) == {olga_id}
    page = (await browser.get("/console/earnings")).text
    [mine] = [row for row in everyone if row.owner_id == olga_id]
    owed = re.search(r'id="owed-now">.*?class="value">([^<]+)<', page, re.S)
    assert owed and owed.group(1) == format_credits(mine.owed) and mine.owed > 0


async def test_advertised_prices_render_exactly_as_billed(console_env: ConsoleEnv) -> None:
    env = console_env
    operator = await env.account("pia", "operator")
    token, _ = await env.service.create_join_token(operator.id, name="rack")
    directory = env.gateway.station.join_directory
    assert directory is not None
    await directory.wait_current()
    backend = SimulatedBackend(BackendSettings(
        type="simulated", models=["exact-sim"], max_concurrency=2,
        price_input=PRICE_IN, price_output=PRICE_OUT, options={"tokens": 1}))
    await env.add_node([backend], "node-x", join_token=token)
    browser = env.browser()
    await env.sign_in(browser, "pia")
    html = (await browser.get("/console/nodes")).text
    row = re.search(r'<tr class="node-row" data-node="node-x">(.*?)</tr>', html, re.S)
    assert row, html
    # "%g" showed 12.3457 and 1.23457e+06: six significant digits of a float
    assert f">{format_credits(price_micros(PRICE_IN))}<" in row.group(1)
    assert ">12.345679<" in row.group(1) and ">999999.5<" in row.group(1)
