"""Signing in and out of the console on a real gateway (SQLite and PostgreSQL): passwords
with the lockout, one-time links, sessions in the database behind a signed cookie, the
cookie's flags, session fixation, CSRF, and the headers every answer carries."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from tests.console_support import ConsoleEnv, csrf_of, start_console
from tooti.accounts.database import Database

PASSWORD = "correct horse battery staple"
ADMIN = "adm-console-process-key"


def cookie_header(response: httpx.Response) -> str:
    """The console cookie's Set-Cookie header."""
    found = [v for k, v in response.headers.multi_items()
             if k == "set-cookie" and v.startswith("tooti_console=")]
    assert found, f"no console cookie in {response.headers}"
    return found[-1]


async def test_password_sign_in_and_out(console_env: ConsoleEnv) -> None:
    await console_env.account("bob", password=PASSWORD)
    browser = console_env.browser()
    assert (await browser.get("/console/")).headers["location"] == "/console/login"
    page = await browser.get("/console/login")
    assert page.status_code == 200 and 'id="login-form"' in page.text
    answer = await browser.post("/console/login", {"name": "bob", "password": PASSWORD})
    assert answer.status_code == 303 and answer.headers["location"] == "/console/"
    flags = cookie_header(answer).lower()
    assert "httponly" in flags and "samesite=lax" in flags and "path=/console" in flags
    assert "secure" not in flags  # plain HTTP: a Secure cookie would never come back
    overview = await browser.get("/console/")
    assert overview.status_code == 200 and ">bob</a>" in overview.text
    out = await browser.post("/console/logout")
    assert out.status_code == 303 and out.headers["location"] == "/console/login"
    assert (await browser.get("/console/")).status_code == 303


async def test_wrong_password_unknown_name_and_no_password_look_the_same(
        console_env: ConsoleEnv) -> None:
    await console_env.account("bob", password=PASSWORD)
    await console_env.account("carol")  # no password set
    browser = console_env.browser()
    await browser.get("/console/login")
    answers = [await browser.post("/console/login", {"name": name, "password": "nope-nope-nope"})
               for name in ("bob", "nobody", "carol")]
    assert [a.status_code for a in answers] == [401, 401, 401]
    messages = {a.text.split('id="login-error"')[1].split("</p>")[0] for a in answers}
    assert len(messages) == 1 and "Wrong account name or password" in messages.pop()
    assert "tooti_console=" not in "".join(a.headers.get("set-cookie", "") for a in answers
                                           if "sid" in a.headers.get("set-cookie", ""))


async def test_lockout_after_repeated_failures(console_env: ConsoleEnv) -> None:
    await console_env.account("bob", password=PASSWORD)
    browser = console_env.browser()
    await browser.get("/console/login")
    statuses = [(await browser.post("/console/login",
                                    {"name": "bob", "password": "wrong-guess-1"})).status_code
                for _ in range(5)]
    assert statuses == [401] * 4 + [429]  # the fifth failure locks the account
    locked = await browser.post("/console/login", {"name": "bob", "password": PASSWORD})
    assert locked.status_code == 429, locked.text
    assert int(locked.headers["retry-after"]) > 0
    assert "locked" in locked.text
    assert (await browser.get("/console/")).status_code == 303  # still signed out


async def test_login_link_is_spent_by_the_post_not_the_get(console_env: ConsoleEnv) -> None:
    bob = await console_env.account("bob")
    console = console_env.gateway.console
    assert console is not None
    token = await console.ctx.links.mint(bob.id)
    preview = console_env.browser()  # a chat app's link preview: GETs only
    for _ in range(2):
        page = await preview.get("/console/login/link", params={"token": token})
        assert page.status_code == 200 and 'id="link-form"' in page.text
    browser = console_env.browser()
    await browser.get("/console/login/link", params={"token": token})
    answer = await browser.post("/console/login/link", {"token": token})
    assert answer.status_code == 303
    assert answer.headers["location"] == "/console/account"  # no password yet: set one
    again = console_env.browser()
    opened = await again.get("/console/login/link", params={"token": token})
    assert opened.status_code == 400 and "not valid" in opened.text  # said at once
    assert 'id="link-form"' not in opened.text
    await again.get("/console/login")  # a form's token, to post the spent link anyway
    spent = await again.post("/console/login/link", {"token": token})
    assert spent.status_code == 400 and "not valid" in spent.text
    assert (await again.get("/console/")).status_code == 303


async def test_set_password_then_sign_in_with_it_and_others_are_signed_out(
        console_env: ConsoleEnv) -> None:
    await console_env.account("bob")
    first, second = console_env.browser(), console_env.browser()
    await console_env.sign_in(first, "bob")
    await console_env.sign_in(second, "bob")
    await first.get("/console/account")
    short = await first.post("/console/account/password",
                             {"password": "short", "again": "short"})
    assert short.status_code == 400
    differ = await first.post("/console/account/password",
                              {"password": PASSWORD, "again": PASSWORD + "x"})
    assert differ.status_code == 400 and "differ" in differ.text
    saved = await first.post("/console/account/password",
                             {"password": PASSWORD, "again": PASSWORD})
    assert saved.status_code == 303
    assert (await first.get("/console/")).status_code == 200  # this browser stays in
    assert (await second.get("/console/")).status_code == 303  # the other one is out
    # A change now asks for the current password.
    await first.get("/console/account")
    wrong = await first.post("/console/account/password", {
        "current": "not-the-password", "password": PASSWORD + "2", "again": PASSWORD + "2"})
    assert wrong.status_code == 403
    fresh = console_env.browser()
    await fresh.get("/console/login")
    assert (await fresh.post("/console/login",
                             {"name": "bob", "password": PASSWORD})).status_code == 303


async def test_sign_out_everywhere(console_env: ConsoleEnv) -> None:
    await console_env.account("bob")
    first, second = console_env.browser(), console_env.browser()
    await console_env.sign_in(first, "bob")
    await console_env.sign_in(second, "bob")
    await first.get("/console/account")
    answer = await first.post("/console/logout/everywhere")
    assert answer.status_code == 303
    assert (await first.get("/console/")).status_code == 303
    assert (await second.get("/console/")).status_code == 303


async def test_session_fixation_a_visitor_cookie_is_never_promoted(
        console_env: ConsoleEnv) -> None:
    await console_env.account("bob", password=PASSWORD)
    browser = console_env.browser()
    await browser.get("/console/login")
    visitor_cookie = browser.http.cookies.get("tooti_console")
    assert visitor_cookie
    answer = await browser.post("/console/login", {"name": "bob", "password": PASSWORD})
    signed_in = browser.http.cookies.get("tooti_console")
    assert answer.status_code == 303 and signed_in and signed_in != visitor_cookie
    # The visitor cookie (as an attacker who planted it holds it) opens nothing.
    attacker = console_env.browser()
    attacker.http.cookies.set("tooti_console", visitor_cookie, path="/console")
    assert (await attacker.get("/console/")).status_code == 303
    # A forged or altered cookie is ignored (its signature fails), not an error.
    forged = console_env.browser()
    forged.http.cookies.set("tooti_console", signed_in[:-4] + "AAAA", path="/console")
    assert (await forged.get("/console/")).status_code == 303
    # After sign-out, the signed-in cookie replayed opens nothing either.
    await browser.get("/console/")
    assert (await browser.post("/console/logout")).status_code == 303
    replay = console_env.browser()
    replay.http.cookies.set("tooti_console", signed_in, path="/console")
    assert (await replay.get("/console/")).status_code == 303


async def test_csrf_refused(console_env: ConsoleEnv) -> None:
    await console_env.account("bob", password=PASSWORD)
    browser = console_env.browser()
    await console_env.sign_in(browser, "bob")
    for token in ("", "x" * 43):
        refused = await browser.post("/console/logout/everywhere", csrf=token)
        assert refused.status_code == 403 and "expired" in refused.text
    other_site = await browser.post("/console/logout/everywhere",
                                    headers={"origin": "https://evil.example"})
    assert other_site.status_code == 403 and "another site" in other_site.text
    cross = await browser.post("/console/logout/everywhere",
                               headers={"sec-fetch-site": "cross-site"})
    assert cross.status_code == 403
    assert (await browser.get("/console/")).status_code == 200  # nothing happened
    # The sign-in form needs the visitor's token too (login CSRF).
    visitor = console_env.browser()
    answer = await visitor.post("/console/login", {"name": "bob", "password": PASSWORD},
                                csrf="")
    assert answer.status_code == 403


async def test_every_answer_carries_the_security_headers(console_env: ConsoleEnv) -> None:
    browser = console_env.browser()
    for path in ("/console/login", "/console/", "/console/nope", "/console/static/console.css",
                 "/console"):
        answer = await browser.get(path)
        csp = answer.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
        assert "unsafe-inline" not in csp
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["referrer-policy"] == "no-referrer"
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["x-request-id"].startswith("req_")
        if "/static/" not in path:
            assert answer.headers["cache-control"] == "no-store", path
    missing = await browser.get("/console/nope")
    assert missing.status_code == 404 and "<html" in missing.text
    beside = await browser.get("/consolex")  # not the console's: the gateway's own 404
    assert beside.status_code == 404 and beside.json()["error"]["code"] == "not_found"
    assert (await browser.get("/console")).headers["location"] == "/console/login"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_suspended_account_is_signed_out(console_env: ConsoleEnv) -> None:
    bob = await console_env.account("bob", password=PASSWORD)
    browser = console_env.browser()
    await console_env.sign_in(browser, "bob")
    await console_env.service.set_status(bob.id, "suspended")
    assert (await browser.get("/console/")).status_code == 303
    await browser.get("/console/login")
    answer = await browser.post("/console/login", {"name": "bob", "password": PASSWORD})
    assert answer.status_code == 403 and "suspended" in answer.text


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_console_off_by_default(nursery: trio.Nursery, database: Database,
                                      tmp_path: Path) -> None:
    env = await start_console(nursery, database, tmp_path, console=False)
    async with httpx.AsyncClient(base_url=env.url) as http:
        assert (await http.get("/console/login")).status_code == 404
    env.gateway.shutdown()


async def test_tooti_run_console_signs_in_with_the_clis_link(tmp_path: Path) -> None:
    """A real ``tooti run`` process with ``console = true``: the CLI's login link (with
    the admin key from the environment) signs a browser in; an unknown path under
    ``/console`` is the console's 404 page, ``/v1`` is unchanged."""
    import os
    import sys

    from tests.processes import open_cluster

    async with open_cluster(tmp_path) as cluster:
        await cluster.start_gateway(console=True, admin_key=ADMIN, auth="keys")
        link = await trio.run_process(
            [sys.executable, "-m", "tooti", "accounts", "login-link", "admin",
             "--gateway", cluster.url], capture_stdout=True, capture_stderr=True,
            env={**os.environ, "TOOTI_ADMIN_KEY": ADMIN})
        url = link.stdout.decode().splitlines()[0]  # then a note on whom to give it
        assert url.startswith(f"{cluster.url}/console/login/link?token=tl-tooti-"), url
        async with httpx.AsyncClient(timeout=20) as http:
            page = await http.get(url)
            assert page.status_code == 200
            token = url.split("token=", 1)[1]
            answer = await http.post(f"{cluster.url}/console/login/link",
                                     data={"csrf": csrf_of(page.text), "token": token})
            assert answer.status_code == 303, answer.text
            account = await http.get(f"{cluster.url}/console/account")
            assert account.status_code == 200 and "Set a password" in account.text
            assert (await http.get(f"{cluster.url}/console/nope")).status_code == 404
            models = await http.get(f"{cluster.url}/v1/models")
            assert models.status_code == 401  # auth = keys: the console changes nothing


async def test_signing_in_again_ends_the_browsers_previous_session(
        console_env: ConsoleEnv) -> None:
    await console_env.account("bob", password=PASSWORD)
    await console_env.account("eve", password=PASSWORD)
    browser = console_env.browser()
    await console_env.sign_in(browser, "bob")
    bob_cookie = browser.http.cookies.get("tooti_console")
    await browser.get("/console/login")  # signed in: redirected, the form is still there
    await browser.post("/console/login", {"name": "eve", "password": PASSWORD})
    assert ">eve</a>" in (await browser.get("/console/")).text
    replay = console_env.browser()
    replay.http.cookies.set("tooti_console", bob_cookie, path="/console")
    assert (await replay.get("/console/")).status_code == 303  # bob's session ended


async def test_nul_characters_and_times_beyond_the_calendar_are_clear_answers(
        console_env: ConsoleEnv) -> None:
    await console_env.account("olga", "operator")
    browser = console_env.browser()
    await console_env.sign_in(browser, "olga")
    assert (await browser.get("/console/groups/a%00b")).status_code == 400
    refused = await browser.post("/console/groups", {"name": "a\x00b"})
    assert refused.status_code == 400 and "NUL" in refused.text
    far = await browser.get("/console/earnings", params={"since": "1e12"})
    assert far.status_code == 200, far.text  # not a 500: such a time is shown as "-"
    assert "Traceback" not in far.text
