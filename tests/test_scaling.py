"""Past one process: HAProxy in front of two gateway processes sharing PostgreSQL, and
two nodes dialling both gateways (issue 17, docs/scaling.md).

Everything is a real process on loopback:

* PostgreSQL: a fresh database on the session's throwaway cluster
  (:mod:`tests.postgres`). Before any gateway starts, the test seeds it the way an
  operator would with ``tooti accounts`` / ``tooti join-tokens`` (through
  :class:`~tooti.accounts.service.AccountService`, in this process): an operator
  account and one join token for its nodes. Seeding first means both gateways load the
  token when they start, so the nodes' first dial is admitted by both (a token minted
  while a gateway runs reaches it within a second, by its poll; a node refused meanwhile
  would wait a minute before re-dialling).
* Two gateways (``tooti run --role gateway``, ``auth = "keys"``, an admin key, their
  own ``gateway_id`` and data dir, the same ``gateway.database``).
* Two nodes (simulated backend, priced) whose ``node.peers`` lists BOTH gateways'
  tunnel URLs, presenting the operator's join token to each.
* HAProxy (Debian's ``haproxy``, ``scripts/install-haproxy.sh``; the test skips only
  when ``/usr/sbin/haproxy`` is missing) with a configuration the test writes
  (:func:`haproxy_config`): round robin over the two gateways, ``option httpchk GET
  /readyz``, ``option redispatch``, retries on connection failures, and an
  ``x-served-by`` response header naming the gateway that answered.

What it shows:

1. The admin API through HAProxy (whichever gateway answers) creates a user, tops it
   up and makes one API key; that key is then served through either gateway: requests
   through HAProxy are answered by both (``x-served-by``), and each answer's
   ``x-request-id`` is in the recent requests (``/admin/v1/requests``) of exactly the
   gateway HAProxy named and not of the other. Streamed answers pass through too.
2. The admin view of each gateway (``GET /admin/v1/peers``, asked directly) lists both
   nodes.
3. Shared state: ``/v1/me`` through HAProxy counts every request either gateway served
   and charged, exactly once each; the ledger check passes.
4. Failover: gateway A is killed with SIGKILL; requests sent from that moment on
   (back-to-back, no pause) are all answered, by B; HAProxy logs A as DOWN, and after
   that every answer still comes from B.
5. Recovery: A restarted on its port with its ``gateway_id`` gets both nodes back (they
   re-dial it), HAProxy logs it UP, both gateways serve again, and ``/v1/me`` and the
   ledger check (through either gateway) count every answered request exactly once.

No fixed sleeps: the test waits on log lines (the gateways' ``listening`` and ``peer X
serves``, HAProxy's ``Loading success.``, ``Server gws/a is DOWN`` and ``... is UP``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.processes import (
    EXIT_TIMEOUT,
    START_TIMEOUT,
    Tooti,
    spawn,
    toml_table,
    toml_value_lines,
)
from tooti.accounts.database import Database
from tooti.accounts.service import AccountService

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import scaling

HAPROXY = "/usr/sbin/haproxy"
INSTALL_HINT = "bash scripts/install-haproxy.sh installs it (Debian's haproxy package)"
ADMIN_KEY = "scaling-admin-key"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
GATEWAYS = ("a", "b")
NODES = ("node-1", "node-2")
TOKENS = 5
"""Completion tokens of every request (the simulated node's answer length)."""
COST = TOKENS * 1000
"""What one request costs in micro-units: 5 tokens at 1,000 credits per million."""
TOP_UP = 100_000_000
"""The user's credit: 100 credits."""
ROUND = 24
"""Requests sent through HAProxy while both gateways are up."""
AFTER_DOWN = 20
"""Requests sent after HAProxy logged gateway A down."""
MAX_FAILOVER_REQUESTS = 5000
"""Hang guard: requests sent while waiting for HAProxy to mark A down."""


def haproxy_config(port: int, backends: dict[str, int]) -> str:
    """``bench/scaling.py``'s HAProxy configuration (docs/scaling.md's shape), with fast
    health checks, its log on stdout and ``x-served-by`` naming the server that
    answered."""
    return scaling.haproxy_config(port, backends, check_interval_ms=200, log=True,
                                  served_by=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Deployment:
    """The processes of the test and what it learned about them."""

    nursery: trio.Nursery
    root: Path
    gateways: dict[str, Tooti] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    """Gateway name → ``http://127.0.0.1:PORT``."""
    nodes: dict[str, Tooti] = field(default_factory=dict)
    haproxy: Tooti | None = None
    lb_url: str = ""
    children: list[Tooti] = field(default_factory=list)

    async def start_gateway(self, name: str, database: str, port: int = 0) -> None:
        """Start gateway ``name`` on ``port`` (0: a free one); wait until it listens."""
        config = self.root / f"gateway-{name}.toml"
        config.write_text(
            toml_value_lines({"roles": ["gateway"], "log_level": "info",
                              "drain_grace": 0.0})
            + toml_table("gateway", {"listen": f"127.0.0.1:{port}", "auth": "keys",
                                     "admin_key": ADMIN_KEY, "gateway_id": f"gw-{name}",
                                     "database": database, "first_byte_timeout": 10.0})
            + toml_table("billing.options", {"fee_bps": 1000})
            + toml_table("tunnel", {"heartbeat_interval": 0.5}))
        tooti = await spawn(self.nursery, config, self.root / f"gateway-{name}-data",
                            f"gateway-{name}")
        self.children.append(tooti)
        self.gateways[name] = tooti
        with trio.fail_after(START_TIMEOUT):
            match = await tooti.wait_for(r"gateway listening on (http://127\.0\.0\.1:\d+)")
        self.urls[name] = match.group(1)

    async def start_node(self, node_id: str, join_token: str) -> None:
        peers = [url.replace("http://", "ws://") + "/tooti/v1/tunnel"
                 for url in self.urls.values()]
        config = self.root / f"{node_id}.toml"
        config.write_text(
            toml_value_lines({"roles": ["node"], "log_level": "info", "drain_grace": 0.0})
            + toml_table("node", {"id": node_id, "peers": peers, "join_token": join_token,
                                  "reconnect_initial": 0.1, "reconnect_max": 1.0})
            + toml_table("[[node.backends]]", {"type": "simulated", "max_concurrency": 16,
                                               "price_output": 1000.0})
            + toml_table("node.backends.options", {"tokens": TOKENS})
            + toml_table("tunnel", {"heartbeat_interval": 0.5}))
        tooti = await spawn(self.nursery, config, self.root / f"{node_id}-data", node_id)
        self.children.append(tooti)
        self.nodes[node_id] = tooti

    async def start_haproxy(self) -> None:
        """Start HAProxy (master-worker, foreground) on a free port; wait until it has
        bound it and started its worker (``Loading success.``)."""
        backends = {name: int(url.rsplit(":", 1)[1]) for name, url in self.urls.items()}
        for attempt in range(3):  # the free port may be taken meanwhile
            port = free_port()
            config = self.root / "haproxy.cfg"
            config.write_text(haproxy_config(port, backends))
            process = await trio.lowlevel.open_process(
                [HAPROXY, "-W", "-db", "-f", str(config)], stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            assert process.stdout is not None
            haproxy = Tooti(process, "haproxy")
            self.nursery.start_soon(haproxy.pump, process.stdout)
            self.children.append(haproxy)
            try:
                with trio.fail_after(START_TIMEOUT):
                    await haproxy.wait_for(r"Loading success\.")
            except AssertionError:
                if attempt == 2 or "cannot bind" not in haproxy.text:
                    raise
                continue
            self.haproxy, self.lb_url = haproxy, f"http://127.0.0.1:{port}"
            return

    def logs(self) -> str:
        return "\n".join(f"===== {c.name} (pid {c.pid}, "
                         f"{'running' if c.alive else f'exit {c.process.returncode}'})"
                         f" =====\n{c.text[-20000:]}" for c in self.children)

    async def aclose(self) -> None:
        """SIGKILL every child still running (HAProxy's worker exits with its master)."""
        with trio.CancelScope(shield=True):
            for child in self.children:
                if child.alive:
                    child.signal(signal.SIGKILL)
            for child in self.children:
                with trio.move_on_after(EXIT_TIMEOUT):
                    await child.process.wait()


@asynccontextmanager
async def deployment(root: Path) -> AsyncIterator[Deployment]:
    async with trio.open_nursery() as nursery:
        deployed = Deployment(nursery, root)
        try:
            yield deployed
        except BaseException:
            print(deployed.logs())
            raise
        finally:
            await deployed.aclose()
            nursery.cancel_scope.cancel()


async def seed(database: str) -> str:
    """The operator's account and its nodes' join token in the shared database (what
    ``tooti accounts create ops --role operator`` and ``tooti join-tokens create ops``
    do through any gateway); the token."""
    db = Database(database)
    try:
        service = AccountService(db)
        operator = await service.create_account("ops", role="operator")
        token, _ = await service.create_join_token(operator.id, name="scaling")
        return token
    finally:
        db.close()


def chat(stream: bool = False) -> dict[str, Any]:
    return {"model": "tooti-sim", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": TOKENS, "stream": stream}


async def recent_ids(http: httpx.AsyncClient, url: str) -> set[str]:
    """The request ids in a gateway's ``/admin/v1/requests`` (its own recent requests)."""
    answer = await http.get(f"{url}/admin/v1/requests", params={"limit": 1000},
                            headers=ADMIN)
    assert answer.status_code == 200, answer.text
    return {item["request_id"] for item in answer.json()["data"]}


@pytest.mark.skipif(not os.access(HAPROXY, os.X_OK),
                    reason=f"{HAPROXY} is missing: {INSTALL_HINT}")
async def test_haproxy_two_gateways_on_postgres_two_nodes_and_failover(
        tmp_path: Path, postgres_cluster: Any) -> None:
    database = str(postgres_cluster.fresh_database())
    join_token = await seed(database)
    async with deployment(tmp_path) as d:
        async with trio.open_nursery() as starting:
            for name in GATEWAYS:
                starting.start_soon(d.start_gateway, name, database)
        marks = {name: d.gateways[name].mark() for name in GATEWAYS}
        for node_id in NODES:
            await d.start_node(node_id, join_token)
        with trio.fail_after(START_TIMEOUT):
            for name in GATEWAYS:  # each gateway registered each node
                for node_id in NODES:
                    await d.gateways[name].wait_for(rf"peer {node_id} serves \S", marks[name])
        await d.start_haproxy()
        assert d.haproxy is not None

        async with httpx.AsyncClient(base_url=d.lb_url, timeout=30) as lb, \
                httpx.AsyncClient(timeout=30) as direct:
            # 1. The admin API through the load balancer: a user, credit, one key.
            made = await lb.post("/admin/v1/accounts", json={"name": "user"}, headers=ADMIN)
            assert made.status_code == 201, made.text
            topped = await lb.post("/admin/v1/credits/top-up", json={
                "account": "user", "amount_micros": TOP_UP, "idem_key": "scaling"},
                headers=ADMIN)
            assert topped.status_code == 200, topped.text
            made_key = await lb.post("/admin/v1/keys", json={"account": "user"},
                                     headers=ADMIN)
            assert made_key.status_code == 201, made_key.text
            auth = {"authorization": f"Bearer {made_key.json()['key']}"}

            served: dict[str, str] = {}
            """Request id → the HAProxy server (gateway) that answered it."""
            for i in range(ROUND):
                stream = i % 4 == 3
                if stream:
                    async with lb.stream("POST", "/v1/chat/completions", json=chat(True),
                                         headers=auth) as answer:
                        body = b"".join([chunk async for chunk in answer.aiter_bytes()])
                    assert answer.status_code == 200, body
                    assert body.rstrip().endswith(b"data: [DONE]"), body
                else:
                    answer = await lb.post("/v1/chat/completions", json=chat(),
                                           headers=auth)
                    assert answer.status_code == 200, answer.text
                    assert answer.json()["usage"]["completion_tokens"] == TOKENS
                assert answer.headers["x-tooti-node"] in NODES
                served[answer.headers["x-request-id"]] = answer.headers["x-served-by"]
            by_gateway = Counter(served.values())
            assert set(by_gateway) == set(GATEWAYS), by_gateway  # both served the key
            for name in GATEWAYS:  # ... and each one's own records say which it served
                known = await recent_ids(direct, d.urls[name])
                mine = {rid for rid, server in served.items() if server == name}
                assert mine <= known, (name, mine - known)
                assert not (set(served) - mine) & known, name

            # 2. The admin view of each gateway lists both nodes.
            for name in GATEWAYS:
                peers = await direct.get(f"{d.urls[name]}/admin/v1/peers", headers=ADMIN)
                assert peers.status_code == 200, peers.text
                assert {p["id"] for p in peers.json()["data"]} >= set(NODES), peers.text

            # 3. One account, one ledger: every request either gateway served is
            # charged once, and the books balance.
            me = await lb.get("/v1/me", headers=auth)
            assert me.status_code == 200, me.text
            assert me.json()["usage"]["requests"] == ROUND, me.text
            assert me.json()["usage"]["charged_micros"] == ROUND * COST, me.text
            check = await lb.get("/admin/v1/ledger/check", headers=ADMIN)
            assert check.status_code == 200 and check.json()["ok"], check.text

            # 4. Failover: kill -9 gateway A; requests keep being answered, by B.
            assert d.haproxy.search(r"Server gws/\w+ is DOWN") is None, d.haproxy.text
            down_mark = d.haproxy.mark()
            assert await d.gateways["a"].kill() == -signal.SIGKILL
            after_kill: list[tuple[int, str]] = []
            after_down = 0
            with trio.fail_after(START_TIMEOUT):
                while after_down < AFTER_DOWN:
                    down = d.haproxy.search(r"Server gws/a is DOWN", down_mark) is not None
                    answer = await lb.post("/v1/chat/completions", json=chat(),
                                           headers=auth)
                    after_kill.append((answer.status_code,
                                       answer.headers.get("x-served-by", "")))
                    assert answer.status_code == 200, (len(after_kill), answer.text)
                    if down:
                        after_down += 1
                    assert len(after_kill) < MAX_FAILOVER_REQUESTS
            print(f"served before the kill: {dict(by_gateway)}; after it: {len(after_kill)} "
                  f"requests, {len(after_kill) - after_down} before HAProxy marked A down")
            assert {server for _, server in after_kill} == {"b"}, Counter(after_kill)
            assert d.haproxy.search(r"Server gws/b is DOWN") is None, d.haproxy.text
            # B still sees both nodes (their tunnels to A are gone, not those to B).
            peers = await direct.get(f"{d.urls['b']}/admin/v1/peers", headers=ADMIN)
            assert {p["id"] for p in peers.json()["data"]} >= set(NODES), peers.text

            # 5. A restarts (same port, gateway id and database): it reconciles the lease
            # its killed run held, the nodes dial it again, HAProxy puts it back, and
            # the one ledger still counts every answered request exactly once.
            up_mark = d.haproxy.mark()
            await d.start_gateway("a", database, int(d.urls["a"].rsplit(":", 1)[1]))
            with trio.fail_after(START_TIMEOUT):
                for node_id in NODES:
                    await d.gateways["a"].wait_for(rf"peer {node_id} serves \S")
                await d.haproxy.wait_for(r"Server gws/a is UP", up_mark)
            again: Counter[str] = Counter()
            for _ in range(ROUND):
                answer = await lb.post("/v1/chat/completions", json=chat(), headers=auth)
                assert answer.status_code == 200, answer.text
                again[answer.headers["x-served-by"]] += 1
            assert set(again) == set(GATEWAYS), again
            answered = ROUND + len(after_kill) + ROUND
            me = await lb.get("/v1/me", headers=auth)
            assert me.json()["usage"]["requests"] == answered, me.text
            assert me.json()["usage"]["charged_micros"] == answered * COST, me.text
            check = await lb.get("/admin/v1/ledger/check", headers=ADMIN)
            assert check.status_code == 200 and check.json()["ok"], check.text
