"""Real ``tooti run`` child processes for tests: start, watch, kill, restart, clean up.

Every child is ``python -m tooti run --config FILE --data-dir DIR`` with its own
TOML config, and its merged stdout/stderr is watched line by line: tests wait
for log lines (events), never for fixed sleeps.

* :class:`Tooti` — one child process and its accumulated output.
* :class:`Cluster` — a gateway process (port 0, its URL read from the log line
  ``gateway listening on http://...``) and node processes with fixed ids that
  dial ``ws://127.0.0.1:PORT``. Nodes are counted as registered when the
  gateway logs ``peer ID serves ...`` (the same moment the registry makes them
  routable). :func:`open_cluster` kills every child still running when the
  block exits, whether the test passed or failed, and prints their logs on
  failure.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

START_TIMEOUT = 30.0
"""Hang guard for a child to start (imports on a loaded 2-core machine are slow)."""
EXIT_TIMEOUT = 30.0
"""Hang guard for a child to exit after a signal."""


class Tooti:
    """A `tooti run` child process whose output is watched line by line."""

    def __init__(self, process: trio.Process, name: str = "tooti") -> None:
        self.process = process
        self.name = name
        self.text = ""
        self.eof = trio.Event()
        """Set when the child's output reached EOF (it exited, or closed its stdout)."""
        self._changed = trio.Event()

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.process.pid

    @property
    def alive(self) -> bool:
        """True until the child has exited."""
        return self.process.poll() is None

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        """Collect output until EOF, waking waiters on every chunk."""
        try:
            async for data in stream:
                self.text += data.decode(errors="replace")
                self._changed.set()
                self._changed = trio.Event()
        finally:
            self.eof.set()
            self._changed.set()

    def mark(self) -> int:
        """The current end of the output: pass it as ``since`` to look only at later lines."""
        return len(self.text)

    def search(self, pattern: str, since: int = 0) -> re.Match[str] | None:
        """The first match of ``pattern`` in the output from offset ``since``, if any."""
        return re.compile(pattern).search(self.text, since)

    async def wait_for(self, pattern: str, since: int = 0) -> re.Match[str]:
        """Wait until ``pattern`` appears in the output (after offset ``since``).

        Fails (AssertionError with the whole log) if the child exits first.
        """
        compiled = re.compile(pattern)
        while True:
            match = compiled.search(self.text, since)
            if match:
                return match
            if self.eof.is_set() or not self.alive:
                await self.eof.wait()  # collect the last words before giving up
                match = compiled.search(self.text, since)
                if match:
                    return match
                raise AssertionError(f"{self.name} exited before /{pattern}/:\n{self.text}")
            changed = self._changed
            await changed.wait()

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the child if it is still running."""
        if self.alive:
            self.process.send_signal(signum)

    async def wait(self) -> int:
        """Wait for the child to exit and its output to be read; return its exit code."""
        with trio.fail_after(EXIT_TIMEOUT):
            code = await self.process.wait()
            await self.eof.wait()
        return code

    async def kill(self) -> int:
        """SIGKILL the child (continuing it first if stopped) and wait for it."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        return await self.wait()


def _child_env() -> dict[str, str]:
    """The test's environment without ``TOOTI_*`` overrides (configs say everything)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOOTI_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def spawn(nursery: trio.Nursery, config: Path, data_dir: Path, name: str,
                extra_args: Sequence[str] = ()) -> Tooti:
    """Start ``python -m tooti run --config CONFIG --data-dir DATA_DIR`` and watch its output."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tooti", "run", "--config", str(config),
         "--data-dir", str(data_dir), *extra_args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=_child_env(),
    )
    assert process.stdout is not None
    tooti = Tooti(process, name)
    nursery.start_soon(tooti.pump, process.stdout)
    return tooti


# ---------------------------------------------------------------- TOML


def toml_value(value: Any) -> str:
    """Render a scalar or list as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r} as TOML")


def toml_table(header: str, values: Mapping[str, Any]) -> str:
    """Render ``[header]`` (or ``[[header]]`` if it is given with brackets) and its keys."""
    head = header if header.startswith("[") else f"[{header}]"
    return "\n".join([head, *(f"{k} = {toml_value(v)}" for k, v in values.items())]) + "\n"


# ---------------------------------------------------------------- cluster


@dataclass
class NodeSpec:
    """How to (re)start one node process."""

    node_id: str
    options: dict[str, Any]
    """``[node.backends.options]`` of its one simulated backend."""
    max_concurrency: int = 8
    node: dict[str, Any] = field(default_factory=dict)
    """Extra ``[node]`` keys (e.g. ``reconnect_max``)."""


@dataclass
class Cluster:
    """A gateway process and node processes dialling it, all children of this test."""

    nursery: trio.Nursery
    root: Path
    heartbeat_interval: float = 0.5
    """``tunnel.heartbeat_interval`` written into every config."""
    reconnect_initial: float = 0.1
    reconnect_max: float = 1.0
    gateway: Tooti | None = None
    url: str = ""
    """The gateway's ``http://127.0.0.1:PORT``."""
    port: int = 0
    nodes: dict[str, Tooti] = field(default_factory=dict)
    specs: dict[str, NodeSpec] = field(default_factory=dict)
    children: list[Tooti] = field(default_factory=list)
    """Every child ever started (for cleanup)."""

    @property
    def gateway_data(self) -> Path:
        """The gateway's data dir (holds ``usage.sqlite3``)."""
        return self.root / "gateway-data"

    @property
    def tunnel_url(self) -> str:
        """The tunnel URL nodes dial."""
        return f"ws://127.0.0.1:{self.port}"

    def _write(self, name: str, text: str) -> Path:
        path = self.root / f"{name}.toml"
        path.write_text(text)
        return path

    async def start_gateway(self, port: int = 0, **gateway: Any) -> Tooti:
        """Start a gateway process on ``port`` (0 = any free one); wait until it listens.

        ``gateway`` adds ``[gateway]`` keys (e.g. ``first_byte_timeout=2.0``).
        """
        config = (
            toml_value_lines({"roles": ["gateway"], "log_level": "info", "drain_grace": 5.0})
            + toml_table("gateway", {"listen": f"127.0.0.1:{port}", **gateway})
            + toml_table("tunnel", {"heartbeat_interval": self.heartbeat_interval})
        )
        return await self.start_gateway_from(
            self._write(f"gateway-{len(self.children)}", config))

    async def start_gateway_from(self, path: Path) -> Tooti:
        """Start a gateway process with the configuration file ``path`` (which must
        listen on 127.0.0.1 over plain HTTP); wait until it listens."""
        tooti = await spawn(self.nursery, path, self.gateway_data, "gateway")
        self.children.append(tooti)
        self.gateway = tooti
        with trio.fail_after(START_TIMEOUT):
            match = await tooti.wait_for(r"gateway listening on (http://127\.0\.0\.1:(\d+))")
        self.url, self.port = match.group(1), int(match.group(2))
        return tooti

    async def start_node(self, node_id: str, options: Mapping[str, Any] | None = None, *,
                         max_concurrency: int = 8, wait: bool = True,
                         **node: Any) -> Tooti:
        """Start node ``node_id`` with a simulated backend; by default wait until the
        gateway has registered its models. ``node`` adds ``[node]`` keys."""
        spec = NodeSpec(node_id, dict(options or {}), max_concurrency, dict(node))
        self.specs[node_id] = spec
        return await self._spawn_node(spec, wait)

    async def _spawn_node(self, spec: NodeSpec, wait: bool) -> Tooti:
        assert self.gateway is not None, "start the gateway first"
        node_keys = {
            "id": spec.node_id, "peers": [self.tunnel_url],
            "reconnect_initial": self.reconnect_initial, "reconnect_max": self.reconnect_max,
            **spec.node,
        }
        config = (
            toml_value_lines({"roles": ["node"], "log_level": "info", "drain_grace": 0.0})
            + toml_table("node", node_keys)
            + toml_table("[[node.backends]]",
                         {"type": "simulated", "max_concurrency": spec.max_concurrency})
            + toml_table("node.backends.options", spec.options)
            + toml_table("tunnel", {"heartbeat_interval": self.heartbeat_interval})
        )
        index = len(self.children)
        path = self._write(f"{spec.node_id}-{index}", config)
        since = self.gateway.mark()
        tooti = await spawn(self.nursery, path, self.root / f"{spec.node_id}-data",
                            spec.node_id)
        self.children.append(tooti)
        self.nodes[spec.node_id] = tooti
        if wait:
            await self.wait_registered(spec.node_id, since=since)
        return tooti

    async def start_nodes(self, specs: Sequence[tuple[str, Mapping[str, Any]]],
                          **node: Any) -> None:
        """Start several nodes at once and wait until every one is registered."""
        assert self.gateway is not None
        since = self.gateway.mark()
        async with trio.open_nursery() as starting:
            for node_id, options in specs:
                spec = NodeSpec(node_id, dict(options), node=dict(node))
                self.specs[node_id] = spec
                starting.start_soon(self._spawn_node, spec, False)
        await self.wait_registered(*(node_id for node_id, _ in specs), since=since)

    async def wait_registered(self, *node_ids: str, since: int = 0) -> None:
        """Wait until the gateway logged ``peer ID serves`` for every id (after ``since``)."""
        assert self.gateway is not None
        with trio.fail_after(START_TIMEOUT):
            for node_id in node_ids:
                await self.gateway.wait_for(rf"peer {re.escape(node_id)} serves \S", since)

    async def wait_left(self, node_id: str, since: int = 0) -> re.Match[str]:
        """Wait until the gateway logged ``peer ID left (REASON)``; the match has the reason."""
        assert self.gateway is not None
        with trio.fail_after(START_TIMEOUT):
            return await self.gateway.wait_for(rf"peer {re.escape(node_id)} left \(([^)]*)\)",
                                               since)

    async def kill_node(self, node_id: str) -> int:
        """SIGKILL a node process and wait for it to die."""
        return await self.nodes[node_id].kill()

    async def restart_node(self, node_id: str, wait: bool = True) -> Tooti:
        """Start a fresh process for ``node_id`` with its original config (kill it first)."""
        old = self.nodes[node_id]
        if old.alive:
            await old.kill()
        return await self._spawn_node(self.specs[node_id], wait)

    async def stop_gateway(self) -> int:
        """SIGTERM the gateway (drain, flush the ledger) and wait for it to exit."""
        assert self.gateway is not None
        self.gateway.signal(signal.SIGTERM)
        return await self.gateway.wait()

    async def peers(self) -> dict[str, Any]:
        """The gateway's ``GET /admin/v1/peers`` peers by id (loopback needs no key)."""
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as http:
            response = await http.get("/admin/v1/peers")
        response.raise_for_status()
        return {peer["id"]: peer for peer in response.json()["data"]}

    async def wait_routed(self, node_id: str, count: int = 1) -> set[str]:
        """Wait until ``count`` requests are routed to ``node_id`` and have no first
        token yet; return their request ids.

        Event-driven: reads the gateway's ``GET /admin/v1/events`` stream (a snapshot
        of recent requests, then every ``request.*`` event as it happens), so a
        request routed before the call is seen in the snapshot.
        """
        waiting: set[str] = set()
        async with httpx.AsyncClient(base_url=self.url, timeout=None) as http:
            with trio.fail_after(START_TIMEOUT):
                async with http.stream("GET", "/admin/v1/events") as response:
                    response.raise_for_status()
                    kind = ""
                    async for line in response.aiter_lines():
                        if line.startswith("event: "):
                            kind = line[len("event: "):]
                            continue
                        if not line.startswith("data: "):
                            continue
                        data = json.loads(line[len("data: "):])
                        if kind == "snapshot":
                            for request in data["requests"]:
                                if request.get("state") == "routed" and (
                                        request.get("node") == node_id):
                                    waiting.add(request["request_id"])
                        elif kind.startswith("request."):
                            event = data["data"]
                            if kind == "request.routed" and event.get("node") == node_id:
                                waiting.add(event["request_id"])
                            else:
                                waiting.discard(event.get("request_id", ""))
                        if len(waiting) >= count:
                            return waiting
        raise AssertionError(f"the gateway's event stream ended before {count} requests "
                             f"were routed to {node_id}")

    def logs(self) -> str:
        """Every child's output, headed by its name and pid."""
        return "\n".join(f"===== {c.name} (pid {c.pid}, "
                         f"{'running' if c.alive else f'exit {c.process.returncode}'})"
                         f" =====\n{c.text}" for c in self.children)

    async def aclose(self) -> None:
        """SIGKILL every child still running and reap it (shielded: runs on failure too)."""
        with trio.CancelScope(shield=True):
            for child in self.children:
                if child.alive:
                    child.signal(signal.SIGCONT)
                    child.signal(signal.SIGKILL)
            for child in self.children:
                with trio.move_on_after(EXIT_TIMEOUT):
                    await child.process.wait()


def toml_value_lines(values: Mapping[str, Any]) -> str:
    """Top-level ``key = value`` lines (must come before any table)."""
    return "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())


@asynccontextmanager
async def open_cluster(root: Path, **settings: Any) -> AsyncIterator[Cluster]:
    """A :class:`Cluster` whose children are all killed when the block exits.

    On an exception the children's logs are printed (pytest shows them with
    the failure).
    """
    await trio.Path(root).mkdir(parents=True, exist_ok=True)
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, root, **settings)
        try:
            yield cluster
        except BaseException:
            print(cluster.logs())
            raise
        finally:
            await cluster.aclose()
            nursery.cancel_scope.cancel()
