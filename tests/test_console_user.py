"""The console's user pages against a real gateway (SQLite and PostgreSQL), a real node
and real ``/v1/chat/completions`` requests: overview, requests, keys (create shown once,
works on /v1, never listed again; revoke; another account's key 404), redeem (invite
and credit codes), quick start, and bad key-form input refused with nothing created."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import simulated
from tests.console_support import ConsoleEnv
from tooti.backends.simulated import SimulatedBackend
from tooti.settings import BackendSettings

PRICE_OUT = 1000.0
"""Credits per 1M completion tokens: 1,000 µ per token."""
TOKENS = 5


def priced() -> SimulatedBackend:
    return SimulatedBackend(BackendSettings(
        type="simulated", models=["tooti-sim"], price_output=PRICE_OUT,
        options={"tokens": TOKENS}))


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "tooti-sim", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": TOKENS, **extra}


async def ask(env: ConsoleEnv, key: str, **extra: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=env.url, timeout=20) as http:
        response = await http.post("/v1/chat/completions", json=chat(**extra),
                                   headers={"authorization": f"Bearer {key}"})
        await response.aread()
        return response


async def test_overview_and_requests_show_real_usage(console_env: ConsoleEnv) -> None:
    env = console_env
    user = await env.account("ursula")
    await env.service.top_up(user.id, 50_000_000, idem_key="t-1")
    await env.add_node([priced()], "node-u")
    key, _ = await env.service.create_key(user.id, "main")
    plain = await ask(env, key)
    assert plain.status_code == 200, plain.text
    streamed = await ask(env, key, stream=True)
    assert streamed.status_code == 200, streamed.text
    await env.flush_billing()
    browser = env.browser()
    await env.sign_in(browser, "ursula")
    overview = await browser.get("/console/")
    assert overview.status_code == 200
    text = overview.text
    # two requests of 5 completion tokens at 1000 µ each: 0.01 credits charged
    # What the account can spend: its book plus the credit a gateway holds for it in a
    # lease (the book alone would show 49 of the 49.99 left).
    assert (await env.service.get_account(user.id)).balance < 49_990_000
    assert ('id="stat-balance"><span class="label">Balance (credits)</span>'
            '<span class="value">49.99</span>') in text
    assert 'id="stat-requests"' in text and '<span class="value">2</span>' in text
    assert '<span class="value">0.01</span>' in text  # charged this month
    assert text.count('<svg class="chart"') == 2 and "tooti-sim" in text
    assert "<rect class=\"c0\"" in text
    assert "You belong to no group" in text
    requests = await browser.get("/console/requests")
    assert requests.status_code == 200
    rows = requests.text.split('id="requests-table"')[1]
    assert rows.count("<tr id=\"req-") == 2
    assert "node-u" in rows and "tooti-sim" in rows and "0.005" in rows
    assert ">yes<" in rows and ">no<" in rows  # one streamed, one not
    ttfts = [cell.split("</td>")[0] for cell in rows.split('class="num ttft">')[1:]]
    assert any(cell != "-" and float(cell) >= 0 for cell in ttfts), ttfts
    # another account sees none of it
    await env.account("other")
    stranger = env.browser()
    await env.sign_in(stranger, "other")
    theirs = await stranger.get("/console/requests")
    assert "node-u" not in theirs.text and "No request yet" in theirs.text


async def test_key_created_once_works_and_revoke(console_env: ConsoleEnv) -> None:
    env = console_env
    user = await env.account("kim")
    await env.service.top_up(user.id, 10_000_000, idem_key="t-2")
    await env.add_node([simulated()], "node-u")
    browser = env.browser()
    await env.sign_in(browser, "kim")
    page = await browser.get("/console/keys")
    assert page.status_code == 200 and 'id="key-form"' in page.text
    made = await browser.post("/console/keys", {
        "name": "laptop", "expires": "30d", "models": "tooti-sim, other",
        "group": "", "rpm": "60", "tpm": "", "concurrency": "2",
        "budget_day": "1.5", "budget_month": "20"})
    assert made.status_code == 200, made.text
    secret = made.text.split('id="new-key-secret">')[1].split("<")[0]
    assert secret.startswith("sk-") or len(secret) > 20
    keys = await env.service.list_keys(user.id)
    assert len(keys) == 1
    key = keys[0]
    assert key.name == "laptop" and key.models == ("tooti-sim", "other")
    assert key.limits.rpm == 60 and key.limits.concurrency == 2 and key.limits.tpm is None
    assert key.limits.budget_day == 1_500_000 and key.limits.budget_month == 20_000_000
    assert key.expires_at is not None
    assert (await ask(env, secret)).status_code == 200
    listed = await browser.get("/console/keys")
    assert secret not in listed.text and "secret-box" not in listed.text
    assert key.prefix in listed.text and f'id="key-{key.id}"' in listed.text
    overview = await browser.get("/console/")
    assert secret not in overview.text
    # another account's key id: 404, and the key stays active
    other = await env.account("mallory")
    theirs, _ = await env.service.create_key(other.id, "theirs")
    their_id = (await env.service.list_keys(other.id))[0].id
    refused = await browser.post(f"/console/keys/{their_id}/revoke")
    assert refused.status_code == 404
    assert (await env.service.list_keys(other.id))[0].revoked_at is None
    # revoking one's own
    revoked = await browser.post(f"/console/keys/{key.id}/revoke")
    assert revoked.status_code == 303 and revoked.headers["location"] == "/console/keys"
    assert (await env.service.list_keys(user.id))[0].revoked_at is not None
    after = await browser.get("/console/keys")
    assert "revoked" in after.text and "Key laptop revoked." in after.text
    directory = env.gateway.keys
    assert directory is not None
    for _ in range(2):  # a poll that began before the revocation, then one after it
        await directory.wait_polled()
    assert (await ask(env, secret)).status_code == 401
    assert (await ask(env, theirs)).status_code != 401


async def test_bad_key_form_input_is_400_and_creates_nothing(
        console_env: ConsoleEnv) -> None:
    env = console_env
    user = await env.account("bea")
    browser = env.browser()
    await env.sign_in(browser, "bea")
    await browser.get("/console/keys")
    bad = [({"rpm": "-1"}, "rpm"), ({"expires": "soon"}, "expiry"),
           ({"group": "nope"}, "group"), ({"budget_day": "lots"}, "daily budget"),
           ({"budget_month": "0"}, "monthly budget"), ({"tpm": "1e3"}, "tpm"),
           ({"name": "x" * 65}, "name")]
    for fields, message in bad:
        answer = await browser.post("/console/keys", {"name": "k", **fields})
        assert answer.status_code == 400, (fields, answer.status_code)
        assert 'class="notice error"' in answer.text and message in answer.text
        assert "secret-box" not in answer.text
    assert await env.service.list_keys(user.id) == []


async def test_redeem_invite_and_credit_code(console_env: ConsoleEnv) -> None:
    env = console_env
    operator = await env.account("olga", "operator")
    user = await env.account("uma")
    await env.service.create_group(operator.id, "lab")
    invite, _ = await env.service.create_invite("lab", operator.id)
    admin = await env.service.find_account("admin")
    assert admin is not None
    code, _ = await env.service.create_credit_code(2_500_000, admin.id)
    browser = env.browser()
    await env.sign_in(browser, "uma")
    assert 'id="redeem-form"' in (await browser.get("/console/redeem")).text
    joined = await browser.post("/console/redeem", {"code": invite})
    assert joined.status_code == 303
    assert "joined the group lab" in (await browser.get("/console/redeem")).text
    assert [g.name for g in await env.service.list_groups(user.id)] == ["lab"]
    credited = await browser.post("/console/redeem", {"code": code})
    assert credited.status_code == 303
    assert "balance is now 2.5 credits" in (await browser.get("/console/redeem")).text
    assert (await env.service.get_account(user.id)).balance == 2_500_000
    again = await browser.post("/console/redeem", {"code": code})
    assert again.status_code >= 400 and 'id="redeem-error"' in again.text
    assert (await env.service.get_account(user.id)).balance == 2_500_000
    junk = await browser.post("/console/redeem", {"code": "hello"})
    assert junk.status_code == 400 and "not an invite code" in junk.text
    # the group now shows on the overview and in the key form's group select
    assert "<td>lab</td>" in (await browser.get("/console/")).text
    assert '<option value="lab"' in (await browser.get("/console/keys")).text
    made = await browser.post("/console/keys", {"name": "lab-key", "group": "lab"})
    assert made.status_code == 200 and "new-key-secret" in made.text
    assert (await env.service.list_keys(user.id))[0].group == "lab"


async def test_quickstart_uses_the_browsers_url_and_lists_models(
        console_env: ConsoleEnv) -> None:
    env = console_env
    await env.account("quinn")
    await env.add_node([simulated()], "node-u")
    browser = env.browser()
    await env.sign_in(browser, "quinn")
    page = await browser.get("/console/quickstart")
    assert page.status_code == 200
    for snippet in ("qs-curl", "qs-openai"):
        assert f'<pre id="{snippet}">' in page.text
        assert f'data-copy="#{snippet}"' in page.text
    assert f"{env.url}/v1/chat/completions" in page.text
    assert f'base_url="{env.url}/v1"' in page.text
    assert "YOUR_KEY" in page.text and "<code>tooti-sim</code>" in page.text
    fronts = env.gateway.console.ctx.fronts if env.gateway.console else ()
    assert ('id="qs-anthropic"' in page.text) == ("anthropic" in fronts)
    assert ('id="qs-ollama"' in page.text) == ("ollama" in fronts)
    if "ollama" in fronts:
        assert f'Client(host="{env.url}"' in page.text


USER_PAGES = ["/console/", "/console/requests", "/console/keys", "/console/redeem",
              "/console/quickstart"]


async def test_user_pages_need_a_session_and_forms_need_csrf(
        console_env: ConsoleEnv) -> None:
    env = console_env
    visitor = env.browser()
    for path in USER_PAGES:
        answer = await visitor.get(path)
        assert answer.status_code == 303 and answer.headers["location"] == "/console/login"
    user = await env.account("vic")
    browser = env.browser()
    await env.sign_in(browser, "vic")
    for path in USER_PAGES:
        page = await browser.get(path)
        assert page.status_code == 200, path
        assert "style=" not in page.text and "<script>" not in page.text
    forged = await browser.post("/console/keys", {"name": "x"}, csrf="not-the-token")
    assert forged.status_code == 403
    assert await env.service.list_keys(user.id) == []
