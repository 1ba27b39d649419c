"""A real gateway with its console on, for the console's tests: a loopback port, a real
database (SQLite or PostgreSQL through the ``database`` fixture), real nodes dialling
in, and httpx clients that keep cookies like a browser and send each form's CSRF token.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from html import unescape
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tooti.accounts.database import Database
from tooti.accounts.join_directory import JoinTokenDirectory
from tooti.accounts.records import AccountInfo
from tooti.accounts.service import AccountService
from tooti.backends.base import Backend
from tooti.billing.base import BillingSetup
from tooti.billing.credits import Credits
from tooti.gateway.app import Gateway
from tooti.mesh.station import Station
from tooti.node.node import Node
from tooti.settings import GatewaySettings, NodeSettings, TunnelSettings

ADMIN_KEY = "adm-console-secret-key"
FEE_BPS = 1000
"""The house's fee on every charge (10 %), as ``billing.options.fee_bps``."""
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    """The CSRF token a page's forms carry."""
    found = CSRF.search(html)
    assert found, "the page has no form with a CSRF token"
    return unescape(found.group(1))


class Browser:
    """An httpx client that keeps the console's cookie and the last page's CSRF token."""

    def __init__(self, url: str) -> None:
        self.http = httpx.AsyncClient(base_url=url, timeout=20, follow_redirects=False)
        self.csrf = ""

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        response = await self.http.get(path, **kwargs)
        found = CSRF.search(response.text) if response.headers.get(
            "content-type", "").startswith("text/html") else None
        if found:
            self.csrf = unescape(found.group(1))
        return response

    async def post(self, path: str, data: dict[str, Any] | None = None,
                   csrf: str | None = None, **kwargs: Any) -> httpx.Response:
        """POST a form with the last page's CSRF token (or ``csrf``)."""
        form = {"csrf": self.csrf if csrf is None else csrf, **(data or {})}
        response = await self.http.post(path, data=form, **kwargs)
        found = CSRF.search(response.text)
        if found:
            self.csrf = unescape(found.group(1))
        return response

    async def aclose(self) -> None:
        await self.http.aclose()


@dataclass
class ConsoleEnv:
    """A gateway with the console on, its account service, and its nodes."""

    nursery: trio.Nursery
    gateway: Gateway
    url: str
    service: AccountService
    tunnel: TunnelSettings
    browsers: list[Browser] = field(default_factory=list)
    scopes: dict[str, trio.CancelScope] = field(default_factory=dict)

    def browser(self) -> Browser:
        """A new browser with no cookie."""
        made = Browser(self.url)
        self.browsers.append(made)
        return made

    async def account(self, name: str, role: str = "user", password: str = "") -> AccountInfo:
        """Create an account (with a password when given)."""
        account = await self.service.create_account(name, role)
        if password:
            console = self.gateway.console
            assert console is not None
            await console.ctx.passwords.set_password(account.id, password)
        return account

    async def sign_in(self, browser: Browser, name: str) -> httpx.Response:
        """Sign ``name`` in on ``browser`` with a fresh login link; the final answer."""
        console = self.gateway.console
        assert console is not None
        found = await self.service.find_account(name)
        assert found is not None
        token = await console.ctx.links.mint(found.id)
        page = await browser.get("/console/login/link", params={"token": token})
        assert page.status_code == 200, page.text
        answer = await browser.post("/console/login/link", {"token": token})
        assert answer.status_code == 303, answer.text
        landing = await browser.get(answer.headers["location"])
        assert landing.status_code == 200, landing.text
        return landing

    async def flush_billing(self) -> None:
        """Every request settled so far is in the database."""
        for plugin in self.gateway.billing.plugins:
            if isinstance(plugin, Credits):
                await plugin.flush()

    async def add_node(self, backends: list[Backend], node_id: str, *, join_token: str = "",
                       **node_kwargs: Any) -> Node:
        """A node dialling the gateway (with ``join_token``: an operator's token)."""
        settings = NodeSettings(peers=[self.url.replace("http://", "ws://") + "/tooti/v1/tunnel"],
                                id=node_id, join_token=join_token, **node_kwargs)
        node = Node(settings, self.tunnel, backends, node_id)
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await node.run(task_status=task_status)

        await self.nursery.start(run)
        self.scopes[node_id] = scope
        registry = self.gateway.registry
        await registry.wait_until(
            lambda: node_id in registry.peers and bool(registry.peers[node_id].models))
        return node


async def start_console(nursery: trio.Nursery, database: Database,
                        data_dir: Path | None = None, /, **settings: Any) -> ConsoleEnv:
    """A gateway with the console on, listening on a loopback port, as a paying
    deployment runs (as ``tooti run`` builds it): the ``credits`` billing plugin (fee
    10 %: usage rows, charges, earnings) and minted join tokens admitted (a node joining
    with one earns for the token's account). ``settings`` are ``[gateway]`` keys
    (``database`` among them: the URL the gateway names, e.g. in its config page)."""
    service = AccountService(database)
    await service.ensure_admin()
    tunnel = TunnelSettings(heartbeat_interval=0.5)
    options: dict[str, Any] = {"listen": "127.0.0.1:0", "admin_key": ADMIN_KEY,
                               "auth": "keys", "console": True, "first_byte_timeout": 10,
                               **settings}
    gateway_settings = GatewaySettings(**options)
    station = Station(gateway_settings, tunnel, join_directory=JoinTokenDirectory(database))
    data_dir = data_dir or Path(tempfile.mkdtemp(prefix="tooti-console-"))
    credits = Credits(BillingSetup(data_dir, {"fee_bps": FEE_BPS}, database=database))
    gateway = Gateway(gateway_settings, tunnel, billing=[credits], station=station,
                      database=database)
    urls = await nursery.start(gateway.serve)
    return ConsoleEnv(nursery, gateway, urls[0], service, tunnel)


@pytest.fixture
async def console_env(nursery: trio.Nursery, database: Database, tmp_path: Path
                      ) -> AsyncIterator[ConsoleEnv]:
    """A running gateway with the console on (SQLite and PostgreSQL)."""
    env = await start_console(nursery, database, tmp_path)
    yield env
    for browser in env.browsers:
        await browser.aclose()
    env.gateway.shutdown()


async def read_events(lines: AsyncIterator[str], until: str,
                      seen: list[tuple[str, Any]]) -> None:
    """Read server-sent events (``event:`` then ``data:`` JSON lines, as ``/events`` and
    ``/console/admin/events`` send them) into ``seen`` up to one of kind ``until``; the
    stream ending first is an error."""
    kind = ""
    async for line in lines:
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            seen.append((kind, json.loads(line[6:])))
            if kind == until:
                return
    raise AssertionError(f"the stream ended before a {until} event: {seen}")


async def assert_admin_only(env: ConsoleEnv, gets: tuple[str, ...], posts: tuple[str, ...],
                            form: dict[str, str]) -> None:
    """A user (bob) and an operator (olga), both created here, get the console's 403 page
    ("this page is for admins", HTML) on each of ``gets`` and on each of ``posts`` sent
    ``form`` with a valid CSRF token (so it is the role that refuses, not the CSRF check)."""
    await env.account("bob")
    await env.account("olga", "operator")
    for name in ("bob", "olga"):
        browser = env.browser()
        await env.sign_in(browser, name)
        for path in gets:
            page = await browser.get(path)
            assert page.status_code == 403, (name, path, page.text)
            assert "this page is for admins" in page.text
            assert "text/html" in page.headers["content-type"]
        for path in posts:
            await browser.get("/console/account")  # a fresh CSRF token
            answer = await browser.post(path, form)
            assert answer.status_code == 403, (name, path, answer.text)
            assert "this page is for admins" in answer.text
