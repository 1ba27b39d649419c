"""The console's account routes of the admin API (login link, password, log out
everywhere) and their commands (``tooti accounts login-link / set-password / logout``)
on a real gateway on loopback with a database of each kind: the admin key is needed,
unknown fields are refused, the secrets work once through the service, and a password
is never taken from the command line."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import trio

from tests.test_accounts_api import Env, assert_error, make_account, start
from tests.test_cli_accounts import Cli
from tests.test_cli_accounts import tooti as tooti  # the fixture
from tooti.accounts.console_sessions import ConsoleSessions
from tooti.accounts.database import Database
from tooti.accounts.login_links import LoginLinks
from tooti.accounts.passwords import LoginRefused, Passwords

PASSWORD = "a long enough secret"


@pytest.fixture
async def env(nursery: trio.Nursery, database: Database) -> AsyncIterator[Env]:
    running = await start(nursery, database)
    yield running
    running.gateway.shutdown()


async def test_login_link_password_and_logout_routes(env: Env, database: Database) -> None:
    sessions, passwords = ConsoleSessions(database), Passwords(database)
    async with env.client() as http, env.client(None) as anonymous:
        alice = await make_account(http, "alice")
        for method, path, body in (("POST", "login-link", {}),
                                   ("PUT", "password", {"password": PASSWORD}),
                                   ("POST", "logout", {})):
            response = await anonymous.request(method, f"/admin/v1/accounts/alice/{path}",
                                               json=body)
            assert_error(response, 401)

        response = await http.post("/admin/v1/accounts/alice/login-link", json={"ttl": 60})
        assert response.status_code == 201, response.text
        link = response.json()
        assert link["account_id"] == alice["id"]
        assert link["link"].startswith("tl-tooti-")
        assert link["path"] == f"/console/login/link?token={link['link']}"
        assert parse_qs(urlsplit(link["path"]).query)["token"] == [link["link"]]
        assert (await LoginLinks(database).consume(link["link"])).id == alice["id"]
        assert_error(await http.post("/admin/v1/accounts/alice/login-link",
                                     json={"ttl": 60, "for": "x"}), 400, param="for")
        assert_error(await http.post("/admin/v1/accounts/alice/login-link",
                                     json={"ttl": 0}), 400, param="ttl")
        assert_error(await http.post("/admin/v1/accounts/nobody/login-link", json={}),
                     404, "not_found")

        token, _ = await sessions.create(alice["id"])
        response = await http.put(f"/admin/v1/accounts/{alice['id']}/password",
                                  json={"password": PASSWORD})
        assert response.status_code == 204 and response.content == b""
        assert (await passwords.check("alice", PASSWORD)).id == alice["id"]
        assert await sessions.lookup(token) is None  # a password change logs out
        assert_error(await http.put("/admin/v1/accounts/alice/password",
                                    json={"password": "short"}), 400, param="password")
        assert_error(await http.put("/admin/v1/accounts/alice/password",
                                    json={"password": PASSWORD, "old": "x"}), 400,
                     param="old")
        assert_error(await http.get("/admin/v1/accounts/alice/password"), 405)

        tokens = [(await sessions.create(alice["id"]))[0] for _ in range(2)]
        response = await http.post("/admin/v1/accounts/alice/logout")
        assert response.status_code == 200, response.text
        assert response.json() == {"account_id": alice["id"], "revoked": 2}
        assert all([await sessions.lookup(t) is None for t in tokens])
        assert_error(await http.post("/admin/v1/accounts/alice/logout", json={"x": 1}),
                     400, param="x")


async def test_cli_login_link_set_password_and_logout(
        tooti: Cli, database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = await tooti("accounts", "create", "bob")
    assert code == 0, err
    code, out, err = await tooti("accounts", "login-link", "bob", "--ttl", "5m")
    assert code == 0, err
    url = out.splitlines()[0]
    assert url.startswith(f"{tooti.url}/console/login/link?token=tl-tooti-")
    assert "a one-time login link for bob," in out  # the name given, not the id
    secret = parse_qs(urlsplit(url).query)["token"][0]
    bob = await LoginLinks(database).consume(secret)
    assert bob.name == "bob"
    # With a public address the link is on it, whatever --gateway reached.
    tooti.gateway.station.network.public_url = "wss://gw.example.net/tooti/v1/tunnel"
    code, out, err = await tooti("accounts", "login-link", "bob")
    assert code == 0, err
    assert out.startswith("https://gw.example.net/console/login/link?token=tl-tooti-")
    tooti.gateway.station.network.public_url = ""

    # the password comes from stdin when it is not a terminal
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    code, out, err = await tooti("accounts", "set-password", "bob")
    assert code == 0, err
    assert PASSWORD not in out + err
    assert (await Passwords(database).check("bob", PASSWORD)).id == bob.id

    # at a terminal, from a prompt typed twice
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    typed = iter([PASSWORD + "2", PASSWORD + "2"])
    monkeypatch.setattr("sys.stdin", Tty())
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(typed))
    code, out, err = await tooti("accounts", "set-password", "bob")
    assert code == 0, err
    assert (await Passwords(database).check("bob", PASSWORD + "2")).id == bob.id
    typed = iter([PASSWORD + "3", "something else entirely"])
    code, _, err = await tooti("accounts", "set-password", "bob")
    assert code == 1 and "differ" in err
    with pytest.raises(LoginRefused):
        await Passwords(database).check("bob", PASSWORD + "3")

    code, _, err = await tooti("accounts", "set-password", "bob", PASSWORD + "4")
    assert code == 2 and "unrecognized arguments" in err  # never from argv
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    code, _, err = await tooti("accounts", "set-password", "bob")
    assert code == 1 and "password" in err

    sessions = ConsoleSessions(database)
    token, _ = await sessions.create(bob.id)
    code, out, err = await tooti("accounts", "logout", "bob")
    assert code == 0, err
    assert "ended 1 console session of" in out
    assert await sessions.lookup(token) is None
    answer: Any = await tooti.json("accounts", "logout", "bob")
    assert answer["revoked"] == 0
