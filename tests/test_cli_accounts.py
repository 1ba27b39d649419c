"""The accounts commands (``tooti accounts / keys / groups / invites / join-tokens /
credits / earnings / ledger``) run against a real gateway on loopback with a database of
each kind. The CLI is synchronous (httpx), so it runs in a worker thread while the
gateway serves in the test's trio loop."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from tooti import cli
from tooti.accounts.database import Database
from tooti.accounts.service import AccountService
from tooti.gateway.app import Gateway
from tooti.settings import GatewaySettings, TunnelSettings

KEY = "adm-cli-secret"


class Cli:
    """``tooti …`` against one gateway: exit code, stdout and stderr of each run."""

    def __init__(self, url: str, capsys: pytest.CaptureFixture[str], gateway: Gateway
                 ) -> None:
        self.url = url
        self.capsys = capsys
        self.gateway = gateway

    async def __call__(self, *argv: str, key: str | None = KEY) -> tuple[int, str, str]:
        args = [*argv, "--gateway", self.url]
        if key is not None:
            args += ["--admin-key", key]
        self.capsys.readouterr()
        code = await trio.to_thread.run_sync(cli.main, args)
        out, err = self.capsys.readouterr()
        return code, out, err

    async def json(self, *argv: str) -> Any:
        code, out, err = await self(*argv, "--json")
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
async def tooti(nursery: trio.Nursery, database: Database,
                capsys: pytest.CaptureFixture[str],
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cli]:
    monkeypatch.delenv("TOOTI_ADMIN_KEY", raising=False)
    monkeypatch.delenv("TOOTI_GATEWAY", raising=False)
    await AccountService(database).ensure_admin()
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0", admin_key=KEY, auth="keys"),
                      TunnelSettings(), database=database)
    urls = await nursery.start(gateway.serve)
    yield Cli(urls[0], capsys, gateway)
    gateway.shutdown()


async def test_account_top_up_key_list_and_ledger_check(tooti: Cli, database: Database) -> None:
    code, out, err = await tooti("accounts", "create", "alice", "--role", "operator")
    assert code == 0, err
    header, row = out.strip().splitlines()
    assert header.split()[:4] == ["ID", "NAME", "ROLE", "STATUS"]
    assert row.split()[1:4] == ["alice", "operator", "active"]
    assert header.index("NAME") == row.index("alice")  # aligned columns

    code, out, err = await tooti("credits", "top-up", "alice", "12.5", "--idem-key", "first")
    assert code == 0, err
    assert "balance 12.5" in out
    code, out, _ = await tooti("credits", "top-up", "alice", "12.5", "--idem-key", "first")
    assert "balance 12.5" in out  # the retried top-up added nothing

    code, out, err = await tooti("keys", "create", "alice", "--name", "laptop", "--rpm", "30",
                                 "--budget-day", "2", "--expires-in", "30d")
    assert code == 0, err
    secret = next(word for line in out.splitlines() for word in line.split()
                  if word.startswith("sk-tooti-") and len(word) > 30)
    assert "shown this once" in out

    keys = await tooti.json("keys", "list", "--account", "alice")
    [key] = keys["data"]
    assert key["name"] == "laptop" and key["limits"]["rpm"] == 30
    assert key["limits"]["budget_day_micros"] == 2_000_000
    assert secret.startswith(key["prefix"])
    code, listed, _ = await tooti("keys", "list")
    assert code == 0 and key["id"] in listed and secret not in listed

    accounts = await tooti.json("accounts", "list")
    alice = next(a for a in accounts["data"] if a["name"] == "alice")
    assert (alice["balance_micros"], alice["balance"]) == (12_500_000, "12.5")

    code, out, err = await tooti("ledger", "check")
    assert (code, err) == (0, "")
    assert out.startswith("ledger ok") and "issued: 12.5" in out

    # The key the CLI made is stored hashed: the database never holds the secret.
    stored = database.read_sync(lambda tx: tx.all("SELECT hash, prefix FROM api_keys"))
    assert [tuple(r) for r in stored] != [] and all(secret not in map(str, r) for r in stored)


async def test_groups_invites_codes_and_revocation(tooti: Cli) -> None:
    await tooti("accounts", "create", "op", "--role", "operator")
    await tooti("accounts", "create", "bob")
    code, out, err = await tooti("groups", "create", "lab", "--owner", "op",
                                 "--no-public-nodes")
    assert code == 0, err
    assert "lab" in out
    invite = await tooti.json("invites", "create", "lab", "--max-uses", "2",
                              "--expires-in", "12h")
    assert invite["code"].startswith("ti-tooti-")
    joined = await tooti.json("invites", "redeem", invite["code"], "--account", "bob")
    assert joined["group"]["name"] == "lab"
    members = await tooti.json("groups", "members", "lab")
    assert {m["name"] for m in members["data"]} == {"op", "bob"}
    code, out, _ = await tooti("invites", "list", "lab")
    assert code == 0 and invite["id"] in out and invite["code"] not in out
    code, _, err = await tooti("groups", "remove-member", "lab", "bob")
    assert code == 0, err
    assert len((await tooti.json("groups", "members", "lab"))["data"]) == 1

    token = await tooti.json("join-tokens", "create", "op", "--group", "lab")
    assert token["token"].startswith("tj-tooti-")
    code, _, err = await tooti("join-tokens", "revoke", token["id"])
    assert code == 0, err
    [listed] = (await tooti.json("join-tokens", "list", "--account", "op"))["data"]
    assert listed["revoked_at"] is not None

    credit = await tooti.json("credits", "code", "3.5")
    code, out, err = await tooti("credits", "redeem", credit["code"], "--account", "bob")
    assert code == 0, err
    assert "balance 3.5" in out
    codes = await tooti.json("credits", "codes")
    assert codes["data"][0]["redeemed_by"] is not None

    code, out, err = await tooti("accounts", "suspend", "bob")
    assert code == 0 and "suspended" in out
    bob = await tooti.json("accounts", "show", "bob")
    assert bob["status"] == "suspended"
    limited = await tooti.json("accounts", "limits", "bob", "--rpm", "10")
    assert limited["limits"]["rpm"] == 10

    report = await tooti.json("earnings", "--since", "2020-01-01")
    assert report["operators"] == []
    code, out, err = await tooti("earnings")
    assert code == 0 and "by operator:" in out
    code, out, err = await tooti("earnings", "--export", "csv")
    assert code == 0 and out.startswith("owner_id,")


async def test_refusals_print_a_message_and_exit_1(tooti: Cli) -> None:
    code, out, err = await tooti("accounts", "list", key="wrong-key")
    assert (code, out) == (1, "")
    assert err.startswith("tooti: error:") and "401" in err and "admin key" in err
    assert "TOOTI_ADMIN_KEY or --admin-key" in err  # what to set
    assert "Traceback" not in err and "wrong-key" not in err

    code, _, err = await tooti("accounts", "show", "nobody")
    assert code == 1 and "404" in err and "Traceback" not in err
    code, _, err = await tooti("credits", "top-up", "nobody", "1")
    assert code == 1 and "404" in err
    await tooti("accounts", "create", "carl")
    code, _, err = await tooti("credits", "top-up", "carl", "1.1234567")
    assert code == 1 and "400" in err
    code, _, err = await tooti("earnings", "payout", "carl", "1")
    assert code == 1 and "409" in err
    code, _, err = await tooti("keys", "revoke", "key_nope")
    assert code == 1 and "404" in err
    # A usage error is argparse's exit 2, not a request.
    code, _, _ = await tooti("keys", "create", "carl", "--expires-in", "soon")
    assert code == 2


async def test_ledger_check_exits_1_with_the_first_violation(tooti: Cli,
                                                              database: Database) -> None:
    await tooti("accounts", "create", "dora")
    await tooti("credits", "top-up", "dora", "5")
    database.write_sync(lambda tx: tx.run(
        "UPDATE books SET balance = balance + 1 WHERE book = ?", ("issued",)))
    code, out, err = await tooti("ledger", "check")
    assert code == 1 and out == ""
    assert err.startswith("tooti: ledger check failed") and "Traceback" not in err


async def test_environment_gives_gateway_and_key(tooti: Cli,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TOOTI_GATEWAY", tooti.url)
    monkeypatch.setenv("TOOTI_ADMIN_KEY", KEY)
    capsys.readouterr()
    code = await trio.to_thread.run_sync(cli.main, ["accounts", "list", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert [a["name"] for a in json.loads(out)["data"]] == ["admin"]


async def test_money_moves_carry_a_client_side_idempotency_key(tooti: Cli) -> None:
    """Without --idem-key the CLI makes one and prints it before sending, so a failed
    or timed-out top-up can be repeated with it and credits at most once; the key
    reused for another amount is refused."""
    code, out, err = await tooti("accounts", "create", "idem-cli")
    assert code == 0, err
    code, out, err = await tooti("credits", "top-up", "idem-cli", "3")
    assert code == 0, err
    printed = re.match(r"idempotency key (cli-[0-9a-f]{24}) ", err)
    assert printed is not None, err
    key = printed.group(1)
    assert f"(idempotency key {key})" in out and "balance 3" in out
    # The "retry after a timeout": same key, nothing more is added.
    code, out, err = await tooti("credits", "top-up", "idem-cli", "3", "--idem-key", key)
    assert code == 0, err
    assert "balance 3" in out and "cli-" not in err
    code, out, err = await tooti("credits", "top-up", "idem-cli", "4", "--idem-key", key)
    assert code == 1 and "409" in err and "idempotency key" in err
    account = await tooti.json("accounts", "show", "idem-cli")
    assert account["balance_micros"] == 3_000_000
    # Another top-up without a key is a new movement with a new key.
    code, out, err = await tooti("credits", "top-up", "idem-cli", "1")
    assert code == 0 and "balance 4" in out
    assert key not in err and "cli-" in err


async def test_a_payout_carries_a_client_side_idempotency_key(
        tooti: Cli, database: Database) -> None:
    from tooti.accounts.journal import earnings_book, post

    code, out, err = await tooti("accounts", "create", "payee", "--role", "operator")
    assert code == 0, err
    payee = (await tooti.json("accounts", "show", "payee"))["id"]
    database.write_sync(lambda tx: post(tx, "settle:cli-payout", "settle", [
        ("lease:l-cli", -5_000_000), (earnings_book(payee), 5_000_000)]))
    code, out, err = await tooti("earnings", "payout", "payee", "2")
    assert code == 0, err
    printed = re.match(r"idempotency key (cli-[0-9a-f]{24}) ", err)
    assert printed is not None, err
    key = printed.group(1)
    code, out, err = await tooti("earnings", "payout", "payee", "2", "--idem-key", key)
    assert code == 0 and "3 unpaid left" in out, (out, err)
