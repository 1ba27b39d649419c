"""Finding 8c: ``kill -9`` of a gateway under load lost 0.5 % of the requests its
clients saw complete from the usage ledger, because rows waited in a batch. Now a
completed answer is settled (its row committed) before its last bytes leave, so every
request a client saw complete (``data: [DONE]``, or a whole JSON body) has its row.

The gateway and the node are real ``tooti run`` processes; the gateway gets SIGKILL
the moment the test's clients have seen 200 more answers complete, with dozens more in
flight, three times over (restarted on the same port and data dir in between)."""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path

import httpx
import trio

from tests.processes import Tooti, open_cluster
from tooti.billing.ledger import FILENAME

CLIENTS = 48
KILL_AFTER = 200
"""Completed answers seen in a round before the gateway is killed."""
ROUNDS = 3
"""Kills (the gateway restarts on the same port and data dir between them)."""
LIMIT = 60.0


def ledger_ids(path: Path) -> set[str]:
    """Request ids in a ledger left by a killed process (its WAL is recovered)."""
    db = sqlite3.connect(path)
    try:
        return {row[0] for row in db.execute("SELECT request_id FROM usage")}
    finally:
        db.close()


async def burst_then_kill(gateway: Tooti, url: str, completed: set[str]) -> None:
    """Requests from ``CLIENTS`` clients at once (half streamed) until ``KILL_AFTER``
    more have completed; SIGKILL the gateway the moment the last of them completes."""
    target = len(completed) + KILL_AFTER
    killed = trio.Event()

    def saw_complete(request_id: str) -> None:
        completed.add(request_id)
        if len(completed) >= target and not killed.is_set():
            gateway.signal(signal.SIGKILL)  # at once, from the client that saw it
            killed.set()

    async def client(index: int, http: httpx.AsyncClient) -> None:
        stream = index % 2 == 1
        body = {"model": "tooti-sim", "stream": stream,
                "messages": [{"role": "user", "content": f"client {index}"}]}
        while not killed.is_set():
            try:
                if stream:
                    async with http.stream("POST", "/v1/chat/completions",
                                           json=body) as response:
                        async for line in response.aiter_lines():
                            if line == "data: [DONE]":
                                saw_complete(response.headers["x-request-id"])
                else:
                    response = await http.post("/v1/chat/completions", json=body)
                    json.loads(response.content)  # the whole body arrived
                    assert response.status_code == 200, response.text
                    saw_complete(response.headers["x-request-id"])
            except (httpx.TransportError, json.JSONDecodeError):
                assert killed.is_set()  # only the kill may cut an answer
                return

    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=LIMIT, limits=limits) as http:
        async with trio.open_nursery() as clients:
            for index in range(CLIENTS):
                clients.start_soon(client, index, http)
    assert await gateway.wait() == -signal.SIGKILL


async def test_every_answer_a_client_saw_complete_survives_kill_9(tmp_path: Path) -> None:
    completed: set[str] = set()
    async with open_cluster(tmp_path) as cluster:
        with trio.fail_after(LIMIT * ROUNDS):
            gateway = await cluster.start_gateway()
            await cluster.start_node("node-a", {"tokens": 8}, max_concurrency=CLIENTS)
            for round_ in range(ROUNDS):
                if round_:  # the node re-dials the same port
                    gateway = await cluster.start_gateway(port=cluster.port)
                    await cluster.wait_registered("node-a")
                await burst_then_kill(gateway, cluster.url, completed)
    missing = completed - ledger_ids(cluster.gateway_data / FILENAME)
    assert len(completed) >= KILL_AFTER * ROUNDS
    assert not missing, f"{len(missing)} of {len(completed)} completed requests lost"
