"""``kill -9`` of a gateway with credit reserved and streams in flight (issue 13).

A real ``tooti run`` process (gateway and a simulated node in one process, ``auth =
"keys"``, the ``credits`` billing plugin on ``gateway.database``: an SQLite file, and a
PostgreSQL database of the session's cluster; a fixed ``gateway_id``) serves a paying
key: some requests finish (their clients read ``[DONE]``), slow streams are still
running when the process is killed with SIGKILL. It is restarted with the same config,
data dir, database and gateway id; as it starts it reconciles the lease its previous run
left open (before it serves anything). Then:

* ``tooti ledger check`` (the CLI, against the restarted gateway's admin API) passes;
* every request whose client received ``[DONE]`` (or a whole non-streamed answer) is
  billed exactly once: one usage row and one ``settle`` journal entry;
* no request is billed twice, and the killed streams (whose answers never completed)
  are not billed at all — their reservations went back with the lease;
* the account's balance + what was charged + what its open leases hold == what was
  topped up: nothing lost, nothing created.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.processes import START_TIMEOUT, Tooti, spawn, toml_table, toml_value_lines
from tooti.accounts.database import Database
from tooti.accounts.journal import account_book, balance, lease_book

ADMIN_KEY = "crash-admin-key"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
GATEWAY_ID = "gw-crash"
COST = 5 * 1000
"""A finished request: 5 completion tokens at 1,000 µ each (prompts are free)."""
TOPPED_UP = 20_000_000
"""20 credits: the slow streams reserve 2 credits each (2,000 tokens)."""


def config(root: Path, database: str) -> Path:
    text = (
        toml_value_lines({"roles": ["gateway", "node"], "log_level": "info",
                          "drain_grace": 0.0})
        + toml_table("gateway", {"listen": "127.0.0.1:0", "auth": "keys",
                                 "admin_key": ADMIN_KEY, "gateway_id": GATEWAY_ID,
                                 "database": database, "first_byte_timeout": 10.0})
        + toml_table("billing.options", {"fee_bps": 1000})
        + toml_table("node", {"id": "crash-node"})
        + toml_table("[[node.backends]]", {"type": "simulated", "max_concurrency": 16,
                                           "price_output": 1000.0})
        + toml_table("node.backends.options", {"tokens": 100_000,
                                               "tokens_per_second": 40.0})
        + toml_table("tunnel", {"heartbeat_interval": 0.5})
    )
    path = root / "gateway.toml"
    path.write_text(text)
    return path


async def start(nursery: trio.Nursery, path: Path, data: Path) -> tuple[Tooti, str]:
    """Start the process; wait until it listens and its node serves. Its URL."""
    tooti = await spawn(nursery, path, data, "gateway")
    with trio.fail_after(START_TIMEOUT):
        match = await tooti.wait_for(r"gateway listening on (http://127\.0\.0\.1:\d+)")
        await tooti.wait_for(r"peer crash-node serves \S")
    return tooti, match.group(1)


def chat(max_tokens: int, stream: bool) -> dict[str, Any]:
    return {"model": "tooti-sim", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens, "stream": stream}


async def test_kill_9_with_streams_in_flight_bills_every_finished_request_once(
        tmp_path: Path, database_url: str) -> None:
    path, data = config(tmp_path, database_url), tmp_path / "data"
    done: set[str] = set()
    """Request ids whose client got the whole answer."""
    cut: set[str] = set()
    """Request ids of the streams in flight when the process was killed."""
    async with trio.open_nursery() as nursery:
        first, url = await start(nursery, path, data)
        restarted: Tooti | None = None
        try:
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                made = await http.post("/admin/v1/accounts", json={"name": "payer"},
                                       headers=ADMIN)
                assert made.status_code == 201, made.text
                account_id = made.json()["id"]
                key = (await http.post("/admin/v1/keys", json={"account": "payer"},
                                       headers=ADMIN)).json()["key"]
                topped = await http.post("/admin/v1/credits/top-up", json={
                    "account": "payer", "amount_micros": TOPPED_UP, "idem_key": "crash"},
                    headers=ADMIN)
                assert topped.status_code == 200, topped.text
                auth = {"authorization": f"Bearer {key}"}

                async def finished_stream() -> None:
                    async with http.stream("POST", "/v1/chat/completions",
                                           json=chat(5, True), headers=auth) as response:
                        assert response.status_code == 200
                        lines = [line async for line in response.aiter_lines()]
                    assert "data: [DONE]" in lines
                    done.add(response.headers["x-request-id"])

                async def finished_whole() -> None:
                    response = await http.post("/v1/chat/completions", json=chat(5, False),
                                               headers=auth)
                    assert response.status_code == 200, response.text
                    assert response.json()["usage"]["completion_tokens"] == 5
                    done.add(response.headers["x-request-id"])

                async with trio.open_nursery() as finishing:
                    for _ in range(4):
                        finishing.start_soon(finished_stream)
                    for _ in range(2):
                        finishing.start_soon(finished_whole)
                assert len(done) == 6

                streaming = 0
                all_streaming = trio.Event()

                async def slow_stream() -> None:
                    nonlocal streaming
                    try:
                        async with http.stream("POST", "/v1/chat/completions",
                                               json=chat(2000, True), headers=auth) as response:
                            assert response.status_code == 200
                            cut.add(response.headers["x-request-id"])
                            lines = response.aiter_lines()
                            async for line in lines:
                                if line == "data: [DONE]":
                                    raise AssertionError("a slow stream finished")
                                if line.startswith("data: ") and '"content"' in line:
                                    streaming += 1
                                    if streaming == 4:
                                        all_streaming.set()
                                    break
                            async for line in lines:
                                assert line != "data: [DONE]"
                    except (httpx.RemoteProtocolError, httpx.ReadError):
                        pass  # the gateway died under it

                async with trio.open_nursery() as flying:
                    for _ in range(4):
                        flying.start_soon(slow_stream)
                    with trio.fail_after(START_TIMEOUT):
                        await all_streaming.wait()
                    # credit reserved for four 2,000-token streams, tokens flowing: kill -9
                    assert await first.kill() == -signal.SIGKILL
            assert len(cut) == 4

            restarted, url = await start(nursery, path, data)
            # it reconciled the lease its previous run left open before serving
            assert restarted.search(r"gateway gw-crash: reconciled 1 lease\(s\)")

            env = {k: v for k, v in os.environ.items() if not k.startswith("TOOTI_")}
            env["TOOTI_ADMIN_KEY"] = ADMIN_KEY
            check = await trio.run_process(
                [sys.executable, "-m", "tooti", "ledger", "check", "--gateway", url],
                env=env, capture_stdout=True, capture_stderr=True, check=False)
            assert check.returncode == 0, check.stdout + check.stderr
            assert b"ledger ok" in check.stdout

            db = Database(database_url)
            try:
                def read(tx: Any) -> dict[str, Any]:
                    return {
                        "rows": {rid: (status, charged) for rid, status, charged in tx.all(
                            "SELECT request_id, status, charged FROM usage")},
                        "settles": dict(tx.all(
                            "SELECT request_id, COUNT(*) FROM journal WHERE kind = 'settle' "
                            "GROUP BY request_id")),
                        "balance": balance(tx, account_book(account_id)),
                        "charged": int(tx.value(
                            "SELECT SUM(charged) FROM usage WHERE account_id = ?",
                            (account_id,), default=0)),
                        "leased": sum(balance(tx, lease_book(lease_id)) for (lease_id,)
                                      in tx.all("SELECT id FROM leases WHERE account_id = ?",
                                                (account_id,))),
                        "open": tx.all("SELECT id FROM leases WHERE closed_at IS NULL"),
                    }

                found = await db.read(read)
            finally:
                db.close()
            for request_id in done:  # billed exactly once
                assert found["rows"][request_id] == ("ok", COST), request_id
                assert found["settles"].get(request_id) == 1, request_id
            assert all(count == 1 for count in found["settles"].values())  # never twice
            assert not cut & set(found["settles"])  # the killed streams: nothing charged
            assert found["charged"] == len(done) * COST
            assert found["open"] == []  # the killed run's lease is closed
            assert found["balance"] + found["charged"] + found["leased"] == TOPPED_UP
            assert found["balance"] == TOPPED_UP - len(done) * COST

            # the restarted gateway serves the same key
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                again = await http.post("/v1/chat/completions", json=chat(5, False),
                                        headers=auth)
            assert again.status_code == 200, again.text
        except BaseException:
            print(first.text)
            if restarted is not None:
                print(restarted.text)
            raise
        finally:
            for child in (first, restarted):
                if child is not None and child.alive:
                    await child.kill()
