"""The console's story end to end in a real browser (issue 16, "Tests that must exist: In
a real browser"): headless Debian Chromium driven by selenium against a real gateway
(console on, credits billing with a 10 % fee, minted join tokens admitted: the
``console_env`` fixture) on SQLite, a real node, a real ``/v1/chat/completions``.

The story, as the people in it live it
--------------------------------------
1. **The admin's first sign-in link comes from the CLI**: ``python -m tooti accounts
   login-link admin --gateway URL --admin-key KEY`` runs as a subprocess against the
   gateway's admin API; the URL it prints is opened in the browser, the link signs the
   admin in (once), and the admin sets a password on the account page.
2. **The admin** creates an operator (``olga``) and a user (``uma``) on
   ``/console/admin/accounts``, tops ``uma`` up with 25 credits, and makes a one-time
   sign-in link for each (read from the page's ``.secret-box``, the only place it is
   ever shown).
3. **The operator** opens its link, sets a password, creates the group ``friends``, an
   invite code and a join token for that group (both read from their secret boxes).
   The test starts the node ``node-friends`` with that token (a simulated backend with
   prices, so the request earns something); the admin's network page, open in the
   admin's own browser since *before* the node joined, shows it arrive without a reload.
4. **The user** opens its link, sets a password, redeems the invite code (joining
   ``friends``), and creates an API key in that group (read once from the secret box).
5. **The live view**: the admin's ``/console/admin/requests`` is loaded and follows the
   event stream (``● live``); only THEN the test sends a streamed
   ``/v1/chat/completions`` with the user's key (200, served by ``node-friends``), and
   the request's row appears on the admin's page, finished, without a reload.
6. **Everyone sees it**: the user's overview (requests, tokens, credits charged, balance,
   the group) and ``/console/requests`` (model, node, tokens, cost); the operator, signed
   in again with its password this time, sees the node's earning (non-zero, the price
   less the gateway's fee) on ``/console/earnings`` and ``/console/nodes``; the admin's
   network page shows ``node-friends`` live and the accounts page the new balances.
   The amounts asserted are the database's (:func:`tooti.accounts.reports.recent_requests`)
   and are checked against the prices: the page must show what the books hold.

Two browsers, because a browser has one cookie jar
--------------------------------------------------
The console's session is one cookie (``tooti_console``, path ``/console``) per browser
profile, so two people cannot be signed in side by side in one profile: a second window
(``switch_to.new_window``) would share the cookie. The admin therefore has a browser of
its own: a second Chromium session started with :func:`tests.browser.start_chromium` on
its own temporary profile (quit and removed at the end of the test, however it ends).
The ``browser`` fixture's Chromium is the *other people's* machine: the operator signs
in there, signs out with the header's button, then the user signs in, and at the end
the user signs out and the operator signs in again with the password it set. This is
how the story happens in life (the admin never signs out while the others work), and it
is what makes the live-view check honest: the admin's page is open and streaming while
the user's key makes the request elsewhere.

Checks on every page
--------------------
Every page visited is saved as a whole-page PNG (desktop, 1280 px wide) named in story
order (``01-admin-sign-in-link.png``, ...), plus the user's overview on a phone-sized
screen, into ``tests/.output/console/`` (or ``$TOOTI_SCREENSHOTS``); the main ones are
copied by hand into ``docs/console/`` (``01-admin-accounts`` is ``NN-admin-accounts-after``,
``04-operator-group`` is ``NN-operator-group-join-token``, ``07-user-keys`` is
``NN-user-key-created``; the others keep their names).
On every page :func:`tests.browser.browser_errors` must be empty: no Content-Security-Policy
refusal, no JavaScript error, no failed load. Every wait is :func:`tests.browser.wait_for`
on what the next page shows (no sleep), and
every selenium call runs in a worker thread (:func:`tests.browser.in_thread`) so the
test's trio loop keeps serving the gateway meanwhile. SQLite only: the database layer is
covered on both databases by the other console tests; this one is about the browser.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.browser import (
    browser_errors,
    in_thread,
    screenshot,
    set_desktop,
    set_phone,
    start_chromium,
    wait_for,
)
from tests.console_support import ADMIN_KEY, FEE_BPS, ConsoleEnv
from tooti.accounts.money import cost_micros, format_credits, price_micros, split_fee
from tooti.accounts.reports import recent_requests
from tooti.backends.simulated import SimulatedBackend
from tooti.settings import BackendSettings

MODEL = "friends-8b"
PRICE_IN = 1000.0
PRICE_OUT = 4000.0
"""Credits per 1M tokens: 1,000 µ per prompt token, 4,000 µ per completion token."""
TOKENS = 12
TOP_UP = 25_000_000
"""25 credits, in micro-units."""
PASSWORDS = {"admin": "admin password, long enough", "olga": "olga's rack password",
             "uma": "uma types this password"}


def priced_backend() -> SimulatedBackend:
    """The friends' node's backend: a simulated model with a price, so a request is
    charged to the user and earns for the node's operator."""
    return SimulatedBackend(BackendSettings(
        type="simulated", models=[MODEL], max_concurrency=4, price_input=PRICE_IN,
        price_output=PRICE_OUT, options={"tokens": TOKENS}))


class Story:
    """Page steps on one selenium driver: each runs in a worker thread, and every page
    it lands on is checked for browser errors and saved as the next screenshot."""

    def __init__(self, driver: Any, url: str, who: str, shots: list[str]) -> None:
        self.driver = driver
        self.url = url
        self.who = who
        self.shots = shots  # shared by both browsers: the story's screenshots in order

    async def shot(self, name: str) -> None:
        """Save the page as the story's next screenshot; the page logged no error."""
        name = f"{len(self.shots) + 1:02d}-{name}"
        self.shots.append(name)
        await in_thread(screenshot, self.driver, name)
        errors = await in_thread(browser_errors, self.driver)
        assert errors == [], f"{self.who}'s page {name} logged errors: {errors}"

    async def visit(self, path: str, ready: str, *, text: str | None = None,
                    name: str = "") -> Any:
        """Open ``path`` (or a full URL), wait for ``ready``; screenshot as ``name``."""
        url = path if path.startswith("http") else self.url + path
        await in_thread(self.driver.get, url)
        element = await in_thread(wait_for, self.driver, ready, text=text)
        if name:
            await self.shot(name)
        return element

    async def submit(self, form: str, fields: dict[str, str], ready: str, *,
                     text: str | None = None, name: str = "") -> Any:
        """Fill ``form``'s fields (css → value; a <select> by its option's value), press
        its submit button, wait for ``ready`` on the answer; screenshot as ``name``."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.select import Select

        def fill_and_send() -> None:
            for css, value in fields.items():
                element = self.driver.find_element(By.CSS_SELECTOR, f"{form} {css}")
                if element.tag_name == "select":
                    Select(element).select_by_value(value)
                else:
                    element.clear()
                    element.send_keys(value)
            self.driver.find_element(By.CSS_SELECTOR, f"{form} button[type=submit]").click()

        await in_thread(fill_and_send)
        element = await in_thread(wait_for, self.driver, ready, text=text)
        if name:
            await self.shot(name)
        return element

    async def text_of(self, css: str) -> str:
        return str((await in_thread(wait_for, self.driver, css)).text)

    async def sign_in_with_link(self, link: str, name: str) -> None:
        """Open a one-time link, press Sign in, land on the account page (no password
        yet), set one: the console then shows the overview."""
        await self.visit(link, "#link-form button", text="Sign in", name=f"{name}-sign-in-link")
        await self.submit("#link-form", {}, "#password-form", text="Save the password",
                          name=f"{name}-set-password")
        assert "Set a password" in await self.text_of("main")
        password = PASSWORDS[name]
        await self.submit("#password-form", {"#new-password": password,
                                             "#new-password-again": password},
                          ".notice.ok", text="Password saved")
        assert await self.text_of("header.top .who a") == name

    async def sign_out(self) -> None:
        await self.submit("header.top .who form", {}, "#login-form")


def live_text(driver: Any, css: str, text: str) -> str:
    """The text of the live table row ``css`` once it contains ``text``. console.js
    redraws a live table's whole body on every event, so an element found a moment ago
    can be gone already: look again rather than read a stale one."""
    from selenium.common.exceptions import StaleElementReferenceException

    while True:
        try:
            return str(wait_for(driver, css, text=text).text)
        except StaleElementReferenceException:
            continue


async def cli_login_link(url: str, account: str) -> str:
    """``python -m tooti accounts login-link ACCOUNT`` against the gateway: the URL it
    prints (its first line)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOOTI_")}
    done = await trio.run_process(
        [sys.executable, "-m", "tooti", "accounts", "login-link", account,
         "--gateway", url, "--admin-key", ADMIN_KEY],
        env=env, capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    printed = done.stdout.decode().splitlines()[0].strip()
    assert printed.startswith(f"{url}/console/login/link?token=tl-tooti-"), printed
    return printed


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_console_story_in_a_real_browser(console_env: ConsoleEnv,
                                                   browser: Any) -> None:
    env = console_env
    shots: list[str] = []
    profile = Path(tempfile.mkdtemp(prefix="tooti-chromium-admin-"))
    admin_driver: Any = None
    try:
        admin_driver = await in_thread(start_chromium, profile)
        await story(env, Story(admin_driver, env.url, "admin", shots),
                    Story(browser, env.url, "operator/user", shots))
    finally:
        if admin_driver is not None:
            admin_driver.quit()  # talks to chromedriver only, never to this loop's gateway
        shutil.rmtree(profile, ignore_errors=True)


async def story(env: ConsoleEnv, admin: Story, people: Story) -> None:
    # 1. the admin's first sign-in link, printed by the CLI; a password set in the console
    link = await cli_login_link(env.url, "admin")
    await admin.sign_in_with_link(link, "admin")

    # 2. the operator and the user, 25 credits, a sign-in link for each
    links: dict[str, str] = {}
    for name, role in (("olga", "operator"), ("uma", "user")):
        await admin.visit("/console/admin/accounts", "#create-account")
        await admin.submit("#create-account", {"#account-name": name, "#account-role": role},
                           ".notice.ok", text=f"Account {name} ({role}) created")
        if name == "uma":
            await admin.submit("#top-up-form", {"#top-up-amount": "25",
                                                "#top-up-memo": "welcome"},
                               ".notice.ok", text="Top-up of 25 credits")
            assert await admin.text_of("#balance") == "25"
        box = await admin.submit("#login-link-form", {}, "#login-link-box",
                                 name=f"admin-{name}-login-link")
        assert f"One-time sign-in link for {name}" in box.text
        links[name] = await admin.text_of("#login-link")
        assert links[name].startswith(f"{env.url}/console/login/link?token=tl-tooti-")
    await admin.visit("/console/admin/accounts", "#accounts tr", text="uma",
                      name="admin-accounts")
    rows = await admin.text_of("#accounts")
    assert "olga operator active" in rows and "uma user active 25" in rows, rows

    # 3. the operator: password, group, invite code, join token; its node joins
    await people.sign_in_with_link(links["olga"], "olga")
    await people.visit("/console/groups", "#create-group-form", name="operator-groups")
    await people.submit("#create-group-form", {"#group-name": "friends"}, ".notice.ok",
                        text="Group friends created")
    await people.submit("#create-invite-form", {}, "#new-invite",
                        name="operator-group-invite")
    invite = await people.text_of("#invite-secret")
    assert invite.startswith("ti-tooti-"), invite
    await people.submit("#group-token-form", {"#group-token-name": "friends-rack"},
                        "#new-join-token", name="operator-group-join-token")
    join_token = await people.text_of("#join-token-secret")
    assert invite not in await people.text_of("main")  # shown once: not on this page

    await admin.visit("/console/admin/network", "#live-status", text="live")
    directory = env.gateway.station.join_directory
    assert directory is not None
    await directory.wait_current()  # the gateway knows the token minted a moment ago
    await env.add_node([priced_backend()], "node-friends", join_token=join_token)
    row = await in_thread(live_text, admin.driver,  # no reload: over the event stream
                          '#peers tr[data-id="node-friends"].state-live', MODEL)
    assert "friends" in row, row
    await admin.shot("admin-network-node-joined")

    # 4. the user: password, the invite redeemed, a key in the group
    await people.sign_out()
    await people.sign_in_with_link(links["uma"], "uma")
    await people.visit("/console/redeem", "#redeem-form")
    await people.submit("#redeem-form", {"#redeem-code": invite}, ".notice.ok",
                        text="You joined the group friends", name="user-redeemed")
    await people.visit("/console/keys", "#key-form")
    await people.submit("#key-form", {"#key-name": "laptop", "#key-expires": "30d",
                                      "#key-group": "friends"},
                        "#new-key", text="laptop", name="user-key-created")
    key = await people.text_of("#new-key-secret")
    assert key and "friends" in await people.text_of("#keys-table")

    # 5. the admin's live requests page follows the stream; then the request
    await admin.visit("/console/admin/requests", "#live-status", text="live")
    async with httpx.AsyncClient(base_url=env.url, timeout=20) as http:
        async with http.stream("POST", "/v1/chat/completions",
                               headers={"authorization": f"Bearer {key}"},
                               json={"model": MODEL, "stream": True, "max_tokens": TOKENS,
                                     "messages": [{"role": "user", "content": "hi"}]}
                               ) as answer:
            body = (await answer.aread()).decode()
    assert answer.status_code == 200, body
    assert answer.headers["x-tooti-node"] == "node-friends"
    assert "data: [DONE]" in body
    request_id = answer.headers["x-request-id"]
    live_row = await in_thread(live_text, admin.driver,
                               f'#live-requests tr[data-id="{request_id}"]', "finished")
    assert "uma" in live_row and MODEL in live_row and "node-friends" in live_row, live_row
    await admin.shot("admin-live-requests")

    # what the books hold, checked against the prices
    await env.flush_billing()
    uma = await env.service.find_account("uma")
    assert uma is not None
    [served] = await recent_requests(env.gateway.database, uma.id)  # type: ignore[arg-type]
    assert served.request_id == request_id and served.completion_tokens == TOKENS
    cost = cost_micros(served.prompt_tokens, served.completion_tokens,
                       price_micros(PRICE_IN), price_micros(PRICE_OUT))
    assert served.charged == cost > 0
    earned, _fee = split_fee(cost, FEE_BPS)
    assert earned > 0

    # 6. the user's overview and requests
    await people.visit("/console/", "#overview-stats", name="user-overview")
    assert await people.text_of("#stat-requests .value") == "1"
    assert await people.text_of("#stat-tokens .value") == str(
        served.prompt_tokens + served.completion_tokens)
    assert await people.text_of("#stat-charged .value") == format_credits(cost)
    assert format_credits(TOP_UP - cost) in await people.text_of("#stat-balance")
    assert MODEL in await people.text_of("#chart-tokens")
    assert "friends" in await people.text_of("#groups")
    await in_thread(set_phone, people.driver)
    try:
        await people.visit("/console/", "#overview-stats", name="user-overview-phone")
    finally:
        await in_thread(set_desktop, people.driver)
    req = await people.visit("/console/requests", f"#req-{request_id}",
                             name="user-requests")
    for shown in (MODEL, "node-friends", "yes", str(served.prompt_tokens),
                  str(TOKENS), format_credits(cost)):
        assert shown in req.text, (shown, req.text)

    # the operator again, with its password this time: earnings and nodes
    await people.sign_out()
    await people.submit("#login-form", {"#name": "olga", "#password": PASSWORDS["olga"]},
                        "#overview-stats")
    earnings = await people.visit("/console/earnings",
                                  '#earnings-nodes tr[data-node="node-friends"]',
                                  name="operator-earnings")
    assert format_credits(earned) in earnings.text, earnings.text
    assert await people.text_of("#earned-period .value") == format_credits(earned)
    nodes = await people.visit("/console/nodes", '.node-row[data-node="node-friends"]',
                               name="operator-nodes")
    assert "live" in nodes.text and MODEL in nodes.text and "friends" in nodes.text
    assert format_credits(earned) in await people.text_of("#earnings-chart")

    # the admin's network (node-friends live) and accounts (the balances moved)
    await admin.visit("/console/admin/network", "#live-status", text="live")
    row = await in_thread(live_text, admin.driver,
                          '#peers tr[data-id="node-friends"].state-live', MODEL)
    assert "friends" in row, row
    await admin.shot("admin-network")
    accounts = await admin.visit("/console/admin/accounts", "#accounts",
                                 name="admin-accounts-after")
    # The admin's list shows what the user's overview shows: the book plus the credit
    # this gateway holds in its open lease for the user's requests.
    book = (await env.service.get_account(uma.id)).balance
    held = await env.service.held(uma.id)
    assert held > 0 and book + held == TOP_UP - cost
    assert f"uma user active {format_credits(TOP_UP - cost)}" in accounts.text, accounts.text
    assert f"olga operator active 0 {format_credits(earned)}" in accounts.text, accounts.text
