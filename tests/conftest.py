"""Shared fixtures: real gateways and nodes on loopback sockets, in the test's trio run."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import trio

from tooti.backends.base import Backend
from tooti.backends.simulated import SimulatedBackend
from tooti.gateway.app import Gateway
from tooti.identity import Identity
from tooti.node.node import Node
from tooti.settings import BackendSettings, GatewaySettings, NodeSettings, TunnelSettings


@dataclass
class Network:
    """A gateway on a real port and the nodes dialled into it over WebSocket."""

    nursery: trio.Nursery
    gateway: Gateway
    url: str
    tunnel: TunnelSettings
    nodes: list[Node] = field(default_factory=list)
    scopes: dict[str, trio.CancelScope] = field(default_factory=dict)

    @property
    def tunnel_url(self) -> str:
        """The gateway's tunnel WebSocket URL."""
        return self.url.replace("http://", "ws://") + "/tooti/v1/tunnel"

    async def add_node(
        self, backends: list[Backend] | None = None, node_id: str = "node-a",
        wait: bool = True, identity: Identity | None = None, peers: list[str] | None = None,
        **node_kwargs: Any,
    ) -> Node:
        """Start a node dialling this gateway (or ``peers``, e.g. a relay); wait until
        this gateway can route to its models."""
        settings = NodeSettings(peers=peers or [self.tunnel_url], id=node_id, **node_kwargs)
        node = Node(settings, self.tunnel, backends or [simulated()], node_id,
                    identity=identity)
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await node.run(task_status=task_status)

        await self.nursery.start(run)
        self.nodes.append(node)
        self.scopes[node_id] = scope
        if wait:
            await self.wait_for_node(node_id)
        return node

    async def wait_for_node(self, node_id: str) -> None:
        """Wait until ``node_id`` is registered with its models."""
        registry = self.gateway.registry
        await registry.wait_until(
            lambda: node_id in registry.peers and bool(registry.peers[node_id].models)
        )

    def kill_node(self, node_id: str) -> None:
        """Cancel a node's whole task tree (as if its process died)."""
        self.scopes[node_id].cancel()

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An httpx client aimed at the gateway."""
        return httpx.AsyncClient(base_url=self.url, timeout=30, **kwargs)


def simulated(**options: Any) -> SimulatedBackend:
    """A simulated backend with the given options (model ``tooti-sim``)."""
    models = options.pop("models", [])
    return SimulatedBackend(BackendSettings(type="simulated", models=models, options=options))


NetworkFactory = Callable[..., Any]

pytest_plugins = ["tests.backend_fixtures"]


@pytest.fixture
async def network(nursery: trio.Nursery) -> AsyncIterator[Network]:
    """A gateway listening on an ephemeral loopback port (no nodes yet)."""
    tunnel = TunnelSettings(heartbeat_interval=0.5)
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0", first_byte_timeout=10), tunnel)
    urls = await nursery.start(gateway.serve)
    yield Network(nursery, gateway, urls[0], tunnel)
    gateway.shutdown()


# ------------------------------------------------------------ databases

@pytest.fixture(scope="session")
def postgres_cluster() -> Any:
    """One throwaway PostgreSQL cluster for the session (started on first use)."""
    import os

    from tests.postgres import ExternalCluster, cluster
    url = os.environ.get("TOOTI_TEST_POSTGRES")
    if url:
        yield ExternalCluster(url)
        return
    with cluster() as running:
        yield running


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """A fresh empty database of each kind: an SQLite file in the test's temporary
    directory, and a new database on the session's PostgreSQL cluster."""
    if request.param == "sqlite":
        return str(tmp_path / "tooti.sqlite3")
    return str(request.getfixturevalue("postgres_cluster").fresh_database())


@pytest.fixture
def database(database_url: str) -> Any:
    """An open :class:`tooti.accounts.database.Database` on :func:`database_url`."""
    from tooti.accounts.database import Database
    db = Database(database_url)
    yield db
    db.close()
