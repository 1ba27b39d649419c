"""The console's security, across every page, without a browser (SQLite and PostgreSQL).

The pages are not listed by hand: they are read from the running app's URL map
(``console.app.url_map.iter_rules()``), so a page added later is covered by every test
here at once, and a page this file does not know how to classify (:data:`ROLES`) or
whose path takes an id it does not know how to fill (:func:`fill`) fails the test with
its path: nobody adds an unguarded page silently.

The world (:func:`world`): a gateway serving the console, with known secrets in its
configuration (the admin key, static join tokens, a static group's API key, the
PostgreSQL URL's password on PostgreSQL), accounts of every role (``admin``; operators
``olga`` and ``oscar``; users ``ursula`` and ``victor``), secrets made through the
services (API keys, invite codes, a credit code, join tokens, a login link, a password,
the console's cookie-signing key), a real node joined with ``olga``'s join token and a
real paid request by ``ursula``, so the node, request and earnings pages have rows.

* :func:`test_every_page_is_authorised`: for each rule, a visitor is sent to the sign-in
  page (303; the sign-in pages and static files: 200), a user gets 403 on operator and
  admin pages, an operator 403 on admin pages, each role its own pages (200); every
  ``POST`` refused by role changes nothing in the database.
* :func:`test_every_post_refuses_a_missing_or_wrong_csrf_token`: 403, nothing changed.
* :func:`test_another_accounts_resource_by_id_is_refused`: every route taking an id,
  with ids of another account's key, group, invite, join token, member or account: 403 or
  404, and the resource intact.
* :func:`test_no_secret_in_any_rendered_page`: every GET page (ids filled) as admin,
  operator and user, and the live event stream's snapshot, hold none of the secrets
  (nor their SHA-256 hex digests); a page that creates a secret shows it once, only in
  its ``.secret-box``, and the next GET of that page does not.
* :func:`test_refused_forms_do_not_echo_secrets`: a refused code, password or link is
  not shown back on the page that refuses it.
* :func:`test_session_cookie_flags_and_content` (and ``…_secure_over_tls``): the
  cookie's flags, ``Secure`` when the gateway serves TLS, and a content of nothing but
  an opaque random token (the database keeps only its SHA-256).
* :func:`test_bad_input_gets_a_clear_page`: oversized forms (413), every form of every
  page sent with NUL bytes or 10 kB in each field (a 4xx page or harmless, never a
  500 or a hang), unknown ids (404; 10 kB long too; with a NUL byte, which must not
  reach PostgreSQL: 400), wrong methods (405), all with the security headers.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import re
import zlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from html import unescape
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
import trio

from tests.console_support import ADMIN_KEY, Browser, ConsoleEnv, start_console
from tests.hostile.test_tls import Authority
from tooti.accounts import schema
from tooti.accounts.database import Database, Tx
from tooti.accounts.records import AccountInfo, GroupInfo, InviteInfo, JoinTokenInfo, KeyInfo
from tooti.backends.simulated import SimulatedBackend
from tooti.console.app import COOKIE, Console
from tooti.console.guard import SignedCookie
from tooti.settings import BackendSettings, GroupSettings

PASSWORD = "ursula's long console password"
CONFIG_SECRETS = {
    "admin key": ADMIN_KEY,
    "static join token": "jt-static-default-secret-5d1f0c",
    "rotated join token": "jt-static-rotation-secret-8a2e44",
    "static group join token": "jt-static-group-secret-91b7e2",
    "static group api key": "sk-static-group-api-key-3c6f18",
}
PG_PASSWORD = "pg-url-password-secret-77d0a9"
MODEL = "tooti-sim"
ROLES: list[tuple[str, str]] = [
    (r"/console/static/.*", "static"),
    (r"/console/login", "public"),
    (r"/console/login/link", "public"),
    (r"/console/logout", "public"),
    (r"/console/logout/everywhere", "user"),
    (r"/console/", "user"),
    (r"/console/account(/password)?", "user"),
    (r"/console/(requests|redeem|quickstart|keys(/<[^>]+>/revoke)?)", "user"),
    (r"/console/(nodes|groups|earnings)([./].*)?", "operator"),
    (r"/console/admin/.*", "admin"),
]
"""Who may use each rule of the console (the first full match of its path): ``static``
and ``public`` (anyone), ``user`` (any signed-in account), ``operator``, ``admin``."""
RANK = {"visitor": -1, "user": 0, "operator": 1, "admin": 2}
TIMEOUT = 30.0
"""Hang guard of one request (never reached when the console works)."""
SECRET_BOX = re.compile(r'<section class="[^"]*\bsecret-box\b[^"]*"[^>]*>.*?</section>', re.S)
FORM = re.compile(r"<form\b([^>]*)>(.*?)</form>", re.S)
FIELD = re.compile(r"<(input|select|textarea)\b([^>]*)>", re.S)
ATTR = re.compile(r'([a-zA-Z-]+)="([^"]*)"')


# ---------------------------------------------------------------- the world


@dataclass
class World:
    """A gateway with the console on, accounts of every role and known secrets."""

    env: ConsoleEnv
    database: Database
    admin: AccountInfo
    olga: AccountInfo
    oscar: AccountInfo
    ursula: AccountInfo
    victor: AccountInfo
    group: GroupInfo
    """olga's group (ursula is a member)."""
    oscar_group: GroupInfo
    invite: InviteInfo
    """An open invite of olga's group."""
    olga_token: JoinTokenInfo
    ursula_key: KeyInfo
    secrets: dict[str, str] = field(default_factory=dict)
    """Label → a secret no page may show."""
    browsers: dict[str, Browser] = field(default_factory=dict)
    """Role → a browser signed in as ``admin``, ``olga`` (operator), ``ursula`` (user)."""

    @property
    def console(self) -> Console:
        console = self.env.gateway.console
        assert console is not None
        return console

    def ids(self, role: str) -> dict[str, str]:
        """What fills each converter of a rule for a browser of ``role``: a real id of
        that account's own resources (an admin: olga's and ursula's)."""
        return {"key_id": self.ursula_key.id, "token_id": self.olga_token.id,
                "name": self.group.name, "invite_id": self.invite.id,
                "account_id": self.ursula.id, "ident": self.ursula.id,
                "node_id": "node-sec", "action": "disable", "filename": "console.css"}


def priced_backend() -> SimulatedBackend:
    return SimulatedBackend(BackendSettings(
        type="simulated", models=[MODEL], max_concurrency=4, price_output=1000.0,
        options={"tokens": 5}))


def with_password(url: str) -> str:
    """``url`` with :data:`PG_PASSWORD` as its password (what an operator configures)."""
    scheme, _, rest = url.partition("://")
    userinfo, _, host = rest.rpartition("@")
    return f"{scheme}://{userinfo.split(':')[0]}:{PG_PASSWORD}@{host}"


async def start_world(nursery: trio.Nursery, database: Database, database_url: str,
                      tmp_path: Path, *, node: bool = True, **extra: Any) -> World:
    """The world of this file (see the module docstring); without ``node`` (a TLS
    gateway, which the tunnel and the helpers' plain clients do not reach), no node, no
    request and no signed-in browsers."""
    options: dict[str, Any] = {
        "join_token": CONFIG_SECRETS["static join token"],
        "join_tokens": {"rotation": CONFIG_SECRETS["rotated join token"]},
        "groups": {"staticgrp": GroupSettings(
            join_token=CONFIG_SECRETS["static group join token"],
            api_keys=[CONFIG_SECRETS["static group api key"]])},
        **extra}
    secrets = dict(CONFIG_SECRETS)
    if database_url.startswith("postgresql"):
        options["database"] = with_password(database_url)
        secrets["database password"] = PG_PASSWORD
    env = await start_console(nursery, database, tmp_path, **options)
    service, gateway = env.service, env.gateway
    admin = await service.ensure_admin()
    console = gateway.console
    assert console is not None

    olga = await env.account("olga", "operator")
    oscar = await env.account("oscar", "operator")
    ursula = await env.account("ursula", "user", password=PASSWORD)
    victor = await env.account("victor", "user")
    secrets["password"] = PASSWORD
    group = await service.create_group(olga.id, "olga-group")
    oscar_group = await service.create_group(oscar.id, "oscar-group")
    used, _ = await service.create_invite(group.id, olga.id)
    await service.redeem_invite(used, ursula.id)
    secrets["redeemed invite"] = used
    secrets["open invite"], invite = await service.create_invite(group.id, olga.id,
                                                                  max_uses=3)
    secrets["oscar invite"], _ = await service.create_invite(oscar_group.id, oscar.id)
    secrets["olga join token"], olga_token = await service.create_join_token(
        olga.id, name="rack-1")
    secrets["olga group join token"], _ = await service.create_join_token(
        olga.id, group=group.id, name="rack-g")
    secrets["oscar join token"], _ = await service.create_join_token(oscar.id)
    secrets["ursula key"], ursula_key = await service.create_key(ursula.id, "laptop")
    secrets["ursula group key"], _ = await service.create_key(ursula.id, "grp",
                                                              group=group.name)
    secrets["victor key"], _ = await service.create_key(victor.id, "victor's")
    secrets["admin key (account)"], _ = await service.create_key(admin.id, "ops")
    secrets["olga key"], _ = await service.create_key(olga.id, "olga's")
    secrets["credit code"], _ = await service.create_credit_code(2_000_000, admin.id)
    secrets["login link"] = await console.ctx.links.mint(victor.id)
    secrets["cookie signing key"] = await console.ctx.sessions.secret_key()
    await service.top_up(ursula.id, 5_000_000, idem_key="sec-top-up")

    if node:
        directory = gateway.station.join_directory
        assert directory is not None
        await directory.wait_current()
        await env.add_node([priced_backend()], "node-sec",
                           join_token=secrets["olga join token"])
        async with httpx.AsyncClient(base_url=env.url, timeout=TIMEOUT) as http:
            answer = await http.post(
                "/v1/chat/completions",
                headers={"authorization": f"Bearer {secrets['ursula key']}"},
                json={"model": MODEL, "max_tokens": 5,
                      "messages": [{"role": "user", "content": "hello"}]})
            assert answer.status_code == 200, answer.text
        await env.flush_billing()

    world = World(env, database, admin, olga, oscar, ursula, victor, group, oscar_group,
                  invite, olga_token, ursula_key, secrets)
    for role, name in (("admin", "admin"), ("operator", "olga"), ("user", "ursula")):
        if not node:
            break
        browser = env.browser()
        await env.sign_in(browser, name)
        world.browsers[role] = browser
        secrets[f"{role} session token"] = session_content(world, browser)["sid"]
    return world


@pytest.fixture
async def world(nursery: trio.Nursery, database: Database, database_url: str,
                tmp_path: Path) -> AsyncIterator[World]:
    """The world, on SQLite and PostgreSQL."""
    made = await start_world(nursery, database, database_url, tmp_path)
    yield made
    for browser in made.env.browsers:
        await browser.aclose()
    made.env.gateway.shutdown()


# ---------------------------------------------------------------- rules and requests


@dataclass(frozen=True)
class Page:
    """One rule of the console's URL map."""

    rule: str
    methods: frozenset[str]
    arguments: frozenset[str]
    role: str

    def path(self, ids: dict[str, str]) -> str:
        return fill(self.rule, self.arguments, ids)


def role_of(rule: str) -> str:
    """The role a rule is for (:data:`ROLES`); a rule nobody classified fails here."""
    for pattern, role in ROLES:
        if re.fullmatch(pattern, rule):
            return role
    pytest.fail(f"console page {rule} is not classified in {__name__}.ROLES: say who "
                "may see it (and guard it)")


def fill(rule: str, arguments: Iterable[str], ids: dict[str, str]) -> str:
    """``rule`` with each ``<converter:name>`` replaced by ``ids[name]``."""
    path = rule
    for name in arguments:
        if name not in ids:
            pytest.fail(f"console page {rule} takes <{name}>, which {__name__} does not "
                        "know how to fill (add it to World.ids)")
        path = re.sub(rf"<(?:[^:>]+:)?{name}>", quote(ids[name], safe=""), path)
    assert "<" not in path, path
    return path


def pages(world: World) -> list[Page]:
    """Every rule of the running console, classified."""
    found = []
    for rule in world.console.app.url_map.iter_rules():
        methods = frozenset(rule.methods or ()) - {"HEAD", "OPTIONS"}
        unknown = methods - {"GET", "POST"}
        assert not unknown, f"console page {rule.rule} answers {unknown}: classify it here"
        found.append(Page(rule.rule, methods, frozenset(rule.arguments), role_of(rule.rule)))
    assert len(found) >= 20, [page.rule for page in found]  # the map is the app's, full
    return found


@dataclass
class Answer:
    status: int
    headers: httpx.Headers
    text: str


async def fetch(browser: Browser, method: str, path: str, **kwargs: Any) -> Answer:
    """One request; an event stream is read up to its first event (the snapshot)."""
    with trio.fail_after(TIMEOUT):
        async with browser.http.stream(method, path, **kwargs) as response:
            if response.headers.get("content-type", "").startswith("text/event-stream"):
                text = ""
                async for chunk in response.aiter_text():
                    text += chunk
                    if "\n\n" in text:
                        break
            else:
                text = (await response.aread()).decode("utf-8", "replace")
    return Answer(response.status_code, response.headers, text)


async def get(browser: Browser, path: str) -> Answer:
    answer = await fetch(browser, "GET", path)
    if answer.headers.get("content-type", "").startswith("text/html"):
        found = re.search(r'name="csrf" value="([^"]+)"', answer.text)
        if found:
            browser.csrf = unescape(found.group(1))
    return answer


async def post(browser: Browser, path: str, data: dict[str, Any] | None = None,
               csrf: str | None = None) -> Answer:
    form = {"csrf": browser.csrf if csrf is None else csrf, **(data or {})}
    return await fetch(browser, "POST", path, data=form)


def assert_security_headers(answer: Answer, where: str) -> None:
    headers = answer.headers
    csp = headers.get("content-security-policy", "")
    assert "default-src 'none'" in csp and "script-src 'self'" in csp, where
    assert "unsafe-inline" not in csp, where
    assert headers.get("x-frame-options") == "DENY", where
    assert headers.get("referrer-policy") == "no-referrer", where
    assert headers.get("x-content-type-options") == "nosniff", where


def assert_html_page(answer: Answer, status: int | set[int], where: str) -> None:
    """An HTML page (not a bare text or a traceback) with ``status``."""
    wanted = {status} if isinstance(status, int) else status
    assert answer.status in wanted, f"{where}: {answer.status} {answer.text[:400]}"
    assert answer.headers.get("content-type", "").startswith("text/html"), where
    assert "<html" in answer.text and "Traceback" not in answer.text, where
    assert_security_headers(answer, where)


TABLES = re.findall(r"CREATE TABLE (\w+)", inspect.getsource(schema))
MOVING = {"gateways", "leases", "console_sessions", "login_failures"}
"""Tables a gateway writes on its own (its heartbeat, credit leases) or as browsing
goes (a session's ``last_seen``): checked by :func:`fingerprint` on their own terms."""


def fingerprint(database: Database) -> dict[str, list[tuple[Any, ...]]]:
    """The database's content (every table's rows; sessions without ``last_seen``)."""
    def read(tx: Tx) -> dict[str, list[tuple[Any, ...]]]:
        rows = {table: sorted(tx.all(f"SELECT * FROM {table}"), key=repr)
                for table in TABLES if table not in MOVING}
        rows["console_sessions"] = sorted(tx.all(
            "SELECT hash, account_id, revoked_at FROM console_sessions"), key=repr)
        return rows

    assert len(TABLES) >= 20 and "accounts" in TABLES
    return database.read_sync(read)


def session_content(world: World, browser: Browser) -> dict[str, Any]:
    """What the browser's console cookie holds (checked against its signature)."""
    cookie = browser.http.cookies.get(COOKIE, path="/console")
    assert cookie
    app = world.console.app
    interface = app.session_interface
    assert isinstance(interface, SignedCookie)
    serializer = interface.get_signing_serializer(app)
    assert serializer is not None
    content = serializer.loads(cookie)
    assert isinstance(content, dict)
    return content


# ---------------------------------------------------------------- 1. authorisation


async def test_every_page_is_authorised(world: World) -> None:
    env = world.env
    before = fingerprint(world.database)
    visitor = env.browser()
    assert (await get(visitor, "/console/login")).status == 200
    checked = 0
    for page in pages(world):
        for role, browser in [("visitor", visitor), *world.browsers.items()]:
            ids = world.ids(role)
            path = page.path(ids)
            where = f"{role} {page.rule}"
            if page.role in ("static", "public"):  # open to a visitor (a signed-in
                if "GET" in page.methods and (role == "visitor" or page.role == "static"):
                    query = "?token=tl-tooti-unknown" if page.rule.endswith("/link") else ""
                    answer = await get(browser, path + query)
                    # an unknown link is said at once (400), before any button
                    expected = 400 if query else 200
                    assert answer.status == expected, f"{where}: {answer.status}"
                    assert_security_headers(answer, where)
                    checked += 1
                continue  # account may be sent on from the sign-in page
            for method in sorted(page.methods):
                if method == "POST" and RANK[role] >= RANK[page.role]:
                    continue  # an allowed POST acts: each page's own tests check it
                answer = (await get(browser, path) if method == "GET"
                          else await post(browser, path))
                where = f"{role} {method} {page.rule}"
                if role == "visitor":
                    assert answer.status == 303, f"{where}: {answer.status}"
                    assert answer.headers["location"] == "/console/login", where
                elif RANK[role] < RANK[page.role]:
                    assert_html_page(answer, 403, where)
                    assert f"for {page.role}s" in answer.text, where
                elif method == "GET":
                    assert answer.status == 200, f"{where}: {answer.status} {answer.text[:300]}"
                assert_security_headers(answer, where)
                checked += 1
    assert checked > 60
    assert fingerprint(world.database) == before  # no refused POST changed anything
    for browser in world.browsers.values():  # nobody was signed out
        assert (await get(browser, "/console/")).status == 200


# ---------------------------------------------------------------- 1b. CSRF


async def test_every_post_refuses_a_missing_or_wrong_csrf_token(world: World) -> None:
    admin = world.browsers["admin"]
    await get(admin, "/console/")
    before = fingerprint(world.database)
    posts = [page for page in pages(world) if "POST" in page.methods]
    assert len(posts) >= 15
    other = world.browsers["user"].csrf  # a real token, of another session
    for page in posts:
        path = page.path(world.ids("admin"))
        for token in ("", "forged-" + "x" * 36, other):
            answer = await post(admin, path, {"name": "x", "amount": "1"}, csrf=token)
            assert_html_page(answer, 403, f"csrf {token[:8]!r} {page.rule}")
        form_without_token = await fetch(admin, "POST", path, data={"name": "x"})
        assert_html_page(form_without_token, 403, f"no csrf field {page.rule}")
    assert fingerprint(world.database) == before
    assert (await get(admin, "/console/")).status == 200  # logout refused too


# ---------------------------------------------------------------- 2. ids of others


async def test_another_accounts_resource_by_id_is_refused(world: World) -> None:
    env = world.env
    oscar, victor = env.browser(), env.browser()
    await env.sign_in(oscar, "oscar")
    await env.sign_in(victor, "victor")
    before = fingerprint(world.database)
    with_ids = [page for page in pages(world)
                if page.arguments and page.role not in ("static", "public")]
    assert {"key_id", "token_id", "name", "invite_id", "ident"} <= set().union(
        *(page.arguments for page in with_ids))
    tried = 0
    for browser, who in ((oscar, "operator oscar"), (victor, "user victor")):
        for page in with_ids:
            path = page.path(world.ids("admin"))  # olga's and ursula's resources
            for method in sorted(page.methods):
                answer = (await get(browser, path) if method == "GET"
                          else await post(browser, path, {"name": "n", "group": "",
                                                          "max_uses": "1"}))
                assert_html_page(answer, {403, 404}, f"{who} {method} {path}")
                tried += 1
    # ids of another account under one's own path: the id is checked, not only the path
    for path in (f"/console/groups/{world.oscar_group.name}/invites/{world.invite.id}/revoke",
                 f"/console/groups/{world.oscar_group.name}/members/{world.ursula.id}/remove"):
        answer = await post(oscar, path)
        assert_html_page(answer, {403, 404}, path)
    mint = await post(oscar, "/console/nodes/tokens", {"group": world.group.name})
    assert_html_page(mint, {403, 404}, "oscar mints a token for olga's group")
    admin = world.browsers["admin"]
    await get(admin, "/console/")
    crossed = await post(admin, f"/console/admin/accounts/{world.victor.id}/keys/"
                                f"{world.ursula_key.id}/revoke")
    assert_html_page(crossed, 404, "admin revokes ursula's key as victor's")
    assert tried >= 20
    # every resource intact
    assert fingerprint(world.database) == before
    keys = {key.id: key for key in await env.service.list_keys(world.ursula.id)}
    assert keys[world.ursula_key.id].revoked_at is None
    invites = {i.id: i for i in await env.service.list_invites(world.group.id)}
    assert invites[world.invite.id].revoked_at is None
    tokens = {t.id: t for t in await env.service.list_join_tokens(world.olga.id)}
    assert tokens[world.olga_token.id].revoked_at is None
    assert world.ursula.id in {a.id for a in await env.service.members(world.group.id)}
    assert "node-sec" in env.gateway.registry.peers
    assert env.gateway.registry.peers["node-sec"].state() == "live"


# ---------------------------------------------------------------- 3. no secret shown


def leaks(text: str, secrets: dict[str, str]) -> list[str]:
    """The labels of the secrets (or their SHA-256 hex digests) found in ``text``."""
    found = []
    for label, secret in secrets.items():
        digest = hashlib.sha256(secret.encode()).hexdigest()
        if secret in text or quote(secret, safe="") in text or digest in text:
            found.append(label)
    return found


async def render_everything(world: World) -> dict[str, str]:
    """Every GET page (ids filled) as admin, operator and user, and the visitor's pages:
    ``"role path"`` → the answer's text."""
    rendered: dict[str, str] = {}
    visitor = world.env.browser()
    roles = [("visitor", visitor), *world.browsers.items()]
    for page in pages(world):
        if "GET" not in page.methods:
            continue
        for role, browser in roles:
            if page.role == "public" and role != "visitor":
                continue  # a signed-in account is sent on from the sign-in pages
            if RANK[role] < RANK.get(page.role, -1):
                continue
            path = page.path(world.ids(role))
            link = page.rule.endswith("/login/link")
            if link:
                path += "?token=tl-tooti-unknown"
            answer = await get(browser, path)
            assert answer.status == (400 if link else 200), \
                f"{role} {path}: {answer.status} {answer.text[:300]}"
            rendered[f"{role} {path}"] = answer.text
    for role, browser in world.browsers.items():  # pages with a query
        for path in ("/console/earnings?since=2020-01-01", "/console/login/link?token=x"):
            if role == "user" and path.startswith("/console/earnings"):
                continue
            rendered[f"{role} {path}"] = (await get(browser, path)).text
    admin = world.browsers["admin"]  # every account's and every group's detail page
    details = [f"/console/admin/accounts/{account.id}" for account in
               await world.env.service.list_accounts()]
    details += [f"/console/groups/{group.name}" for group in
                await world.env.service.list_groups()]
    for path in details:
        answer = await get(admin, path)
        assert answer.status == 200, f"admin {path}: {answer.status}"
        rendered[f"admin {path}"] = answer.text
    return rendered


async def test_no_secret_in_any_rendered_page(world: World) -> None:
    rendered = await render_everything(world)
    events = [key for key in rendered if key.startswith("admin /console/admin/events")]
    assert events and rendered[events[0]].startswith("event: snapshot"), events
    assert "node-sec" in rendered[events[0]]  # the snapshot holds the live node
    assert any("node-sec" in text for key, text in rendered.items()
               if key.startswith("operator /console/nodes"))
    assert len(rendered) >= 25
    config = rendered["admin /console/admin/config"]  # rendered with those settings
    assert "staticgrp" in config and "rotation" in config
    account = rendered[f"admin /console/admin/accounts/{world.ursula.id}"]
    assert world.ursula_key.prefix in account  # listed by its prefix, never in full
    for where, text in rendered.items():
        assert not leaks(text, world.secrets), f"{where} shows {leaks(text, world.secrets)}"

    # A page that creates a secret shows it once, in its secret box, and never again.
    admin, operator, user = (world.browsers[r] for r in ("admin", "operator", "user"))
    group_path = f"/console/groups/{world.group.name}"
    creations = [
        (user, "/console/keys", "/console/keys", {"name": "fresh", "expires": "30d"}),
        (operator, "/console/nodes/tokens", "/console/nodes", {"name": "rack-2"}),
        (operator, f"{group_path}/invites", group_path, {"max_uses": "2"}),
        (operator, f"{group_path}/tokens", group_path, {"name": "rack-3"}),
        (admin, f"/console/admin/accounts/{world.victor.id}/login-link",
         f"/console/admin/accounts/{world.victor.id}", {}),
        (admin, f"/console/admin/accounts/{world.victor.id}/keys",
         f"/console/admin/accounts/{world.victor.id}", {"name": "by-admin"}),
        (admin, f"/console/admin/accounts/{world.olga.id}/join-tokens",
         f"/console/admin/accounts/{world.olga.id}", {"name": "by-admin"}),
        (admin, "/console/admin/credits", "/console/admin/credits", {"amount": "1.5"}),
    ]
    made: dict[str, str] = {}
    for browser, action, page, form in creations:
        await get(browser, page)
        answer = await post(browser, action, form)
        assert answer.status == 200, f"{action}: {answer.status} {answer.text[:300]}"
        boxes = SECRET_BOX.findall(answer.text)
        assert len(boxes) == 1, f"{action}: {len(boxes)} secret boxes"
        secret = unescape(re.findall(r'<code class="secret"[^>]*>([^<]+)</code>',
                                     boxes[0])[0]).split("#")[-1].split("token=")[-1]
        assert len(secret) >= 20 and secret in unescape(boxes[0]), action
        outside = unescape(answer.text.replace(boxes[0], ""))
        assert secret not in outside, f"{action} shows its secret outside the box too"
        again = await get(browser, page)
        assert again.status == 200 and secret not in unescape(again.text), action
        assert "secret-box" not in again.text, action
        made[f"created by {action}"] = secret
    assert (await world.env.service.find_key_by_secret(
        made["created by /console/keys"])) is not None  # the shown key is the real one
    world.secrets.update(made)
    for where, text in (await render_everything(world)).items():
        assert not leaks(text, world.secrets), f"{where} shows {leaks(text, world.secrets)}"


# ---------------------------------------------------------------- 4. the cookie


def console_cookie(answer: httpx.Response) -> str:
    found = [v for k, v in answer.headers.multi_items()
             if k == "set-cookie" and v.startswith(COOKIE + "=")]
    assert found, answer.headers
    return found[-1]


def raw_payload(cookie_value: str) -> dict[str, Any]:
    """A signed cookie's payload as anyone holding the cookie can read it (it is signed,
    not encrypted): what a stolen cookie reveals."""
    data = cookie_value.split(".")
    compressed = cookie_value.startswith(".")
    body = data[1] if compressed else data[0]
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    loaded = json.loads(zlib.decompress(raw) if compressed else raw)
    assert isinstance(loaded, dict)
    return loaded


async def check_cookie(world: World, browser: Browser, *, secure: bool) -> None:
    """Sign ursula in with her password on ``browser``: the flags and the content."""
    await get(browser, "/console/login")
    answer = await browser.http.post("/console/login", data={
        "csrf": browser.csrf, "name": "ursula", "password": PASSWORD})
    assert answer.status_code == 303, answer.text
    flags = [part.strip().lower() for part in console_cookie(answer).split(";")]
    assert "httponly" in flags and "samesite=lax" in flags and "path=/console" in flags
    assert ("secure" in flags) is secure, flags
    content = session_content(world, browser)
    assert set(content) <= {"sid", "_permanent"}, content
    assert raw_payload(browser.http.cookies.get(COOKIE, path="/console") or "") == content
    sid = content["sid"]
    assert isinstance(sid, str) and len(sid) >= 40
    account = world.ursula
    for revealing in (account.id, account.name, account.role, PASSWORD):
        assert revealing not in json.dumps(content), revealing
    stored = world.database.read_sync(lambda tx: tx.all(
        "SELECT hash, account_id FROM console_sessions WHERE account_id = ?", (account.id,)))
    assert (hashlib.sha256(sid.encode()).hexdigest(), account.id) in [
        tuple(row) for row in stored]
    assert all(sid not in str(row) for row in stored)  # only its digest at rest
    assert (await get(browser, "/console/")).status == 200


async def test_session_cookie_flags_and_content(world: World) -> None:
    await check_cookie(world, world.env.browser(), secure=False)
    # a visitor's cookie holds only its own CSRF token for the sign-in form
    visitor = world.env.browser()
    await get(visitor, "/console/login")
    assert set(session_content(world, visitor)) <= {"pre"}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_session_cookie_is_secure_over_tls(nursery: trio.Nursery, database: Database,
                                                 database_url: str, tmp_path: Path) -> None:
    authority = Authority.create(tmp_path)  # the TLS tests' own certificate authority
    authority.issue()
    world = await start_world(nursery, database, database_url, tmp_path, node=False,
                              tls_cert=str(authority.cert_path),
                              tls_key=str(authority.key_path))
    assert world.env.url.startswith("https://")
    browser = world.env.browser()
    await browser.http.aclose()
    browser.http = httpx.AsyncClient(
        base_url=world.env.url, timeout=TIMEOUT, follow_redirects=False,
        verify=authority.client_context())
    await check_cookie(world, browser, secure=True)
    for made in world.env.browsers:
        await made.aclose()
    world.env.gateway.shutdown()


# ---------------------------------------------------------------- 5. bad input


def forms_of(html: str) -> list[tuple[str, dict[str, str]]]:
    """The POST forms of a page: (action, field name → value), the CSRF field kept."""
    found = []
    for attributes, body in FORM.findall(html):
        attrs = dict(ATTR.findall(attributes))
        if attrs.get("method", "get").lower() != "post":
            continue
        fields: dict[str, str] = {}
        for _, field_attrs in FIELD.findall(body):
            named = dict(ATTR.findall(field_attrs))
            if "name" in named:
                fields[named["name"]] = unescape(named.get("value", ""))
        found.append((unescape(attrs.get("action", "")), fields))
    return found


async def test_bad_input_gets_a_clear_page(world: World) -> None:
    admin = world.browsers["admin"]
    await get(admin, "/console/")
    posts = [page for page in pages(world) if "POST" in page.methods]

    # An oversized form: 413 page, before any view runs (and nothing changed); the
    # sender sees it (the body is read and dropped, a huge one closes the connection),
    # never a reset or a client blocked sending to a connection that reads no more.
    before = fingerprint(world.database)
    for page in posts:
        path = page.path(world.ids("admin"))
        big = page.rule in ("/console/keys", "/console/login")
        for size in (65 * 1024, 2 * 1024 * 1024, 9 * 1024 * 1024) if big else (65 * 1024,):
            answer = await post(admin, path, {"name": "x" * size})
            assert_html_page(answer, 413, f"{size} bytes to {page.rule}")
            assert (answer.headers.get("connection") == "close") is (size > 8 * 2**20)
    assert fingerprint(world.database) == before

    # Every form of every page, each field with NUL bytes or 10 kB of text.
    rendered = {}
    for page in pages(world):
        if "GET" in page.methods and page.role not in ("static",) and not (
                page.rule.endswith("events") or page.rule.endswith((".csv", ".json"))):
            path = page.path(world.ids("admin"))
            rendered[path] = (await get(admin, path)).text
    forms = {(action, tuple(sorted(fields))): (action, fields)
             for html in rendered.values() for action, fields in forms_of(html)}
    actions = {action for action, _ in forms.values()}
    assert {"/console/keys", "/console/redeem", "/console/admin/accounts"} <= actions, actions
    sent = 0
    for action, fields in forms.values():
        if not action or urlsplit(action).path.startswith("/console/logout"):
            continue  # a <template>'s form (no action yet), or signing out
        for bad in ("nul\x00byte\x00", "\x00", "y" * 10_000):
            for name in [name for name in fields if name != "csrf"]:
                form = {**fields, name: bad, "csrf": admin.csrf}
                answer = await fetch(admin, "POST", action, data=form)
                where = f"{action} {name}={bad[:6]!r}"
                assert answer.status < 500, f"{where}: {answer.status} {answer.text[:400]}"
                assert answer.status in (200, 303, 400, 403, 404, 409, 413, 429), where
                assert "form has expired" not in answer.text, where  # CSRF kept valid
                if answer.status != 303:
                    assert_html_page(answer, answer.status, where)
                sent += 1
                await get(admin, "/console/")  # a fresh CSRF token if the form changed it
    assert sent > 30
    assert (await get(admin, "/console/")).status == 200  # still signed in and serving
    login = world.env.browser()
    await get(login, "/console/login")
    for bad, status in (("\x00", 400), ("a\x00b", 400), ("z" * 10_000, 401)):
        answer = await post(login, "/console/login", {"name": bad, "password": bad})
        assert_html_page(answer, status, f"login with {bad[:4]!r}")

    # Unknown ids: the 404 page (an id with a NUL byte, which PostgreSQL text cannot
    # hold, is refused before any view: 400); wrong methods: the 405 page.
    for unknown_id, status in (("no-such-id", 404), ("no\x00such", 400), ("z" * 10_000, 404)):
        unknown = {name: unknown_id for name in ("key_id", "token_id", "name", "invite_id",
                                                 "account_id", "ident", "node_id")}
        for page in pages(world):
            if not page.arguments or page.role in ("static", "public"):
                continue
            ids = {**world.ids("admin"), **unknown}
            for method in sorted(page.methods):
                path = page.path(ids)
                answer = (await get(admin, path) if method == "GET"
                          else await post(admin, path))
                assert_html_page(answer, status, f"{method} {path[:80]}")
        if "GET" not in page.methods:
            answer = await get(admin, page.path(world.ids("admin")))
            assert_html_page(answer, 405, f"GET {page.rule}")
    for path in ("/console/logout", "/console/keys/x/revoke", "/console/account/password"):
        assert_html_page(await get(admin, path), 405, f"GET {path}")
    answer = await fetch(admin, "PUT", "/console/keys")
    assert_html_page(answer, 405, "PUT /console/keys")
    answer = await fetch(admin, "DELETE", "/console/")
    assert_html_page(answer, 405, "DELETE /console/")
    assert_html_page(await get(admin, "/console/no/such/page"), 404, "unknown page")


# ---------------------------------------------------------------- 3b. no echo


async def test_refused_forms_do_not_echo_secrets(world: World) -> None:
    """A form refused (a spent code, a wrong or mismatched password, a spent link) is
    re-rendered without the secret it was sent, and a code that worked is not shown on
    the page after it."""
    secrets = world.secrets
    user, admin = world.browsers["user"], world.browsers["admin"]
    guesses = {"wrong current": "wrong-current-password-0f3a", "new": "new-password-one-77a1",
               "again": "new-password-two-19c4"}

    async def refused(browser: Browser, path: str, form: dict[str, str],
                      sent: Iterable[str]) -> Answer:
        await get(browser, "/console/")
        answer = await post(browser, path, form)
        assert 400 <= answer.status < 500, f"{path}: {answer.status} {answer.text[:300]}"
        for secret in sent:
            assert secret not in answer.text, f"{path} echoes what it was sent"
        return answer

    unknown_invite = "ti-tooti-" + "z" * 40
    await refused(user, "/console/redeem", {"code": unknown_invite}, [unknown_invite])
    await get(user, "/console/redeem")
    worked = await post(user, "/console/redeem", {"code": secrets["credit code"]})
    assert worked.status == 303, worked.text
    after = await get(user, worked.headers["location"])
    assert "Credit added" in after.text and secrets["credit code"] not in after.text
    await refused(user, "/console/redeem", {"code": secrets["credit code"]},
                  [secrets["credit code"]])
    await refused(user, "/console/account/password", {
        "current": guesses["wrong current"], "password": guesses["new"],
        "again": guesses["new"]}, guesses.values())
    await refused(user, "/console/account/password", {
        "current": PASSWORD, "password": guesses["new"], "again": guesses["again"]},
        [PASSWORD, *guesses.values()])
    victor = f"/console/admin/accounts/{world.victor.id}"
    await refused(admin, f"{victor}/password",
                  {"password": guesses["new"], "again": guesses["again"]}, guesses.values())
    await refused(admin, f"{victor}/redeem", {"code": unknown_invite}, [unknown_invite])
    visitor = world.env.browser()
    await get(visitor, "/console/login")
    wrong = await post(visitor, "/console/login",
                       {"name": "ursula", "password": guesses["wrong current"]})
    assert wrong.status == 401 and guesses["wrong current"] not in wrong.text
    spent = "tl-tooti-" + "q" * 43
    link = await post(visitor, "/console/login/link", {"token": spent})
    assert link.status == 400 and spent not in link.text
