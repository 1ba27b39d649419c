"""The TUI against a real gateway with real nodes.

Textual runs on asyncio, the gateway and nodes on trio: the network lives in a trio
run on its own thread (:class:`TrioNetwork`), driven from the asyncio side with
``trio.from_thread``. The tests are plain ``def`` functions calling ``asyncio.run``,
so they coexist with the project's ``trio_mode``. Every wait polls the app with
``pilot.pause()`` in a bounded loop.

Run as a script (``python -m tests.test_tui docs/tui.svg``) to regenerate the
screenshot in the docs from a live network of three simulated nodes.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any, TypeVar

import httpx
import pytest
import trio

from tests.conftest import Network, simulated
from tooti.backoff import Backoff
from tooti.cli import main
from tooti.gateway.app import Gateway
from tooti.settings import GatewaySettings, TunnelSettings
from tooti.tui.app import DetailScreen, TootiApp

R = TypeVar("R")
CHAT = {"model": "tooti-sim", "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 5}
AUTH_RETRY = 0.3
"""Seconds before a test app tries a refused admin key again."""


def fast() -> Backoff:
    """Reconnection delays for a test app: 0.05 s doubling to 0.2 s, no jitter."""
    return Backoff(0.05, 0.2)


WAIT = 15.0
"""Upper bound on any one wait (they normally take tens of milliseconds)."""


class TrioNetwork:
    """A gateway and its nodes in a trio run on a background thread."""

    def __init__(self, admin_key: str = "") -> None:
        self.admin_key = admin_key
        self.tunnel = TunnelSettings(heartbeat_interval=0.3)
        self.network: Network | None = None
        self.port = 0
        self._gateway_scope: trio.CancelScope | None = None
        self._gateway_done: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def __enter__(self) -> TrioNetwork:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None and self._token is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(10)

    async def call(self, fn: Callable[..., Awaitable[R]], *args: Any) -> R:
        """Run trio coroutine function ``fn`` in the network's thread; await its result
        from asyncio without blocking the event loop."""
        return await asyncio.to_thread(trio.from_thread.run, fn, *args,
                                       trio_token=self._token)

    @property
    def url(self) -> str:
        """The gateway's base URL."""
        return f"http://127.0.0.1:{self.port}"

    # -------------------------------------------------- trio side

    async def start_gateway(self) -> str:
        """Start a gateway (on the same port as the last one, if there was one)."""
        assert self._nursery is not None
        settings = GatewaySettings(listen=f"127.0.0.1:{self.port}", admin_key=self.admin_key,
                                   first_byte_timeout=10)
        gateway = Gateway(settings, self.tunnel)
        scope = trio.CancelScope()
        done = trio.Event()

        async def serve(task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                with scope:
                    await gateway.serve(task_status=task_status, grace=0.1)
            finally:
                done.set()

        urls: list[str] = await self._nursery.start(serve)
        self.port = int(urls[0].rsplit(":", 1)[1])
        self._gateway_scope, self._gateway_done = scope, done
        if self.network is None:
            self.network = Network(self._nursery, gateway, urls[0], self.tunnel)
        else:
            self.network.gateway = gateway
        return urls[0]

    async def stop_gateway(self) -> None:
        """Kill the gateway abruptly (as if its process died); nodes keep running."""
        assert self._gateway_scope is not None and self._gateway_done is not None
        self._gateway_scope.cancel()
        await self._gateway_done.wait()

    async def add_node(self, node_id: str, options: dict[str, Any] | None = None,
                       labels: dict[str, str] | None = None) -> None:
        """Start a simulated node (backend ``options``) and wait until the gateway
        routes to it."""
        assert self.network is not None
        await self.network.add_node([simulated(**options or {})], node_id=node_id,
                                    labels=labels or {}, reconnect_initial=0.05,
                                    reconnect_max=0.2)

    async def kill_node(self, node_id: str) -> None:
        """Cancel a node's tasks (as if its process died)."""
        assert self.network is not None
        self.network.kill_node(node_id)

    async def wait_for_node(self, node_id: str) -> None:
        """Wait until ``node_id`` is registered with the current gateway."""
        assert self.network is not None
        await self.network.wait_for_node(node_id)


@contextmanager
def trio_network(admin_key: str = "") -> Iterator[TrioNetwork]:
    """A :class:`TrioNetwork`, stopped on exit."""
    with TrioNetwork(admin_key) as net:
        yield net


async def until(pilot: Any, condition: Callable[[], object], what: str) -> None:
    """Let the app run until ``condition()`` holds (at most :data:`WAIT` seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.02)


def status_line(app: TootiApp) -> str:
    """The header's connection line, as shown."""
    return str(app.query_one("#status").render())


def test_nodes_and_requests_appear_live_and_a_dead_node_is_gone() -> None:
    async def scenario(net: TrioNetwork) -> None:
        await net.call(net.start_gateway)
        app = TootiApp(net.url, backoff=fast(), tick=0.05)
        async with app.run_test(size=(160, 40)) as pilot:
            await until(pilot, lambda: app.status.state == "live", "the first snapshot")
            assert "● live" in status_line(app)
            await net.call(net.add_node, "alpha")
            peers = app.peers_table
            # peer.joined comes before the node's MODELS frame (a peer.updated)
            await until(pilot, lambda: peers.cell("alpha", "models") == "tooti-sim",
                        "alpha and its model to appear")
            assert peers.cell("alpha", "via") == "direct"
            assert peers.cell("alpha", "state") == "live"

            async with httpx.AsyncClient(base_url=net.url, timeout=10) as http:
                response = await http.post("/v1/chat/completions", json=CHAT)
            assert response.status_code == 200
            request_id = response.headers["x-request-id"]
            usage = response.json()["usage"]
            requests = app.requests_table
            await until(pilot, lambda: requests.cell(request_id, "state") == "ok",
                        "the request to finish")
            assert requests.cell(request_id, "node") == "alpha"
            assert requests.cell(request_id, "tokens") == (
                f"{usage['prompt_tokens']}→{usage['completion_tokens']}")
            assert requests.cell(request_id, "attempts") == "1"
            view = app.state.requests[request_id]
            assert [s.kind for s in view.timeline] == [
                "received", "routed", "first_token", "finished"]

            await pilot.press("tab")
            assert app.focused is requests
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, DetailScreen), "the details")
            body = str(app.screen.query_one("#body").render())
            assert "first token" in body and "→ alpha" in body and "finished" in body
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, DetailScreen), "closing")

            await net.call(net.kill_node, "alpha")
            await until(pilot, lambda: (peers.cell("alpha", "state") or "").startswith("gone"),
                        "alpha shown gone")
            assert app.state.peers["alpha"].left_reason

    with trio_network() as net:
        asyncio.run(scenario(net))


def test_reconnects_after_the_gateway_restarts() -> None:
    async def scenario(net: TrioNetwork) -> None:
        await net.call(net.start_gateway)
        await net.call(net.add_node, "steady")
        app = TootiApp(net.url, backoff=fast(), tick=0.05)
        async with app.run_test(size=(160, 40)) as pilot:
            peers = app.peers_table
            await until(pilot, lambda: peers.cell("steady", "state") == "live", "steady live")

            await net.call(net.stop_gateway)
            await until(pilot, lambda: app.status.state == "reconnecting", "reconnecting")
            await until(pilot, lambda: "reconnecting…" in status_line(app), "the header")

            await net.call(net.start_gateway)  # same port, a fresh gateway
            await net.call(net.wait_for_node, "steady")
            await until(pilot, lambda: app.state.snapshots >= 2 and app.status.state == "live"
                        and peers.cell("steady", "state") == "live", "steady live again")
            assert "● live" in status_line(app)

    with trio_network() as net:
        asyncio.run(scenario(net))


def test_a_wrong_admin_key_is_a_message_not_a_crash() -> None:
    async def scenario(net: TrioNetwork) -> None:
        await net.call(net.start_gateway)
        await net.call(net.add_node, "secret-node")
        wrong = TootiApp(net.url, admin_key="nope", backoff=fast(), auth_retry=AUTH_RETRY,
                         tick=0.05)
        async with wrong.run_test(size=(160, 40)) as pilot:
            await until(pilot, lambda: wrong.status.state == "unauthorized", "refusal")
            attempts = wrong.status.attempt
            assert "refused the admin API" in status_line(wrong)
            notice = str(wrong.query_one("#notice").render())
            assert "admin key rejected" in notice and "TOOTI_ADMIN_KEY" in notice
            assert wrong.query_one("#notice").display
            await until(pilot, lambda: wrong.status.attempt > attempts, "a slow retry")
            assert wrong.state.peers == {}
        right = TootiApp(net.url, admin_key="s3cret", backoff=fast(), tick=0.05)
        async with right.run_test(size=(160, 40)) as pilot:
            await until(pilot, lambda: "secret-node" in right.peers_table.shown_keys(),
                        "the peer with the right key")

    with trio_network(admin_key="s3cret") as net:
        asyncio.run(scenario(net))


def test_cli_tui_reads_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import tooti.tui.app as tui_app

    calls: list[tuple[str, str]] = []

    def fake_run(gateway: str, admin_key: str) -> int:
        calls.append((gateway, admin_key))
        return 0

    monkeypatch.setattr(tui_app, "run", fake_run)
    monkeypatch.setenv("TOOTI_GATEWAY", "http://gw.example:9000")
    monkeypatch.setenv("TOOTI_ADMIN_KEY", "from-env")
    assert main(["tui"]) == 0
    assert main(["tui", "--gateway", "http://other:1", "--admin-key", "flag"]) == 0
    monkeypatch.delenv("TOOTI_GATEWAY")
    monkeypatch.delenv("TOOTI_ADMIN_KEY")
    assert main(["tui"]) == 0
    assert calls == [("http://gw.example:9000", "from-env"), ("http://other:1", "flag"),
                     ("http://127.0.0.1:8080", "")]


def test_cli_tui_without_textual_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    import tooti.cli

    real = importlib.import_module

    def without_textual(name: str, package: str | None = None) -> ModuleType:
        if name == "tooti.tui.app":
            raise ModuleNotFoundError("No module named 'textual'", name="textual")
        return real(name, package)

    monkeypatch.setattr(tooti.cli.importlib, "import_module", without_textual)
    assert main(["tui"]) == 1
    assert "pip install 'tooti[tui]'" in capsys.readouterr().err


# ------------------------------------------------------------ the docs screenshot


async def _screenshot(net: TrioNetwork, path: str) -> None:
    """A live network of three simulated nodes with traffic, saved as an SVG."""
    await net.call(net.start_gateway)
    nodes = (("gpu-eu-1", "eu", 0.05, 400, 0.0), ("gpu-us-1", "us", 0.12, 250, 0.0),
             ("cpu-edge-7", "eu", 0.3, 60, 0.0), ("flaky-9", "us", 0.08, 300, 0.5))
    for node_id, region, ttft, speed, fail_rate in nodes:
        options = {"ttft": ttft, "tokens_per_second": speed, "tokens": 1000,
                   "fail_rate": fail_rate, "seed": 3}
        await net.call(net.add_node, node_id, options, {"region": region})
    app = TootiApp(net.url, backoff=fast(), tick=0.1)
    async with app.run_test(size=(150, 40)) as pilot:
        await until(pilot, lambda: len(app.peers_table.shown_keys()) == 4, "the peers")
        async with httpx.AsyncClient(base_url=net.url, timeout=30) as http:

            async def ask(max_tokens: int, stream: bool = True) -> None:
                body = {**CHAT, "max_tokens": max_tokens, "stream": stream}
                await http.post("/v1/chat/completions", json=body)

            for round_ in range(10):
                await asyncio.gather(*(ask(10 + 7 * i, i % 4 != 3) for i in range(3 + round_)))
                await pilot.pause(0.3)
            await net.call(net.kill_node, "cpu-edge-7")
            pending = [asyncio.create_task(ask(700 + 100 * i)) for i in range(4)]
            await until(pilot, lambda: app.state.totals(app.clock()).in_flight >= 4
                        and sum(p.in_flight for p in app.state.peers.values()) >= 4,
                        "requests in flight")
            await pilot.press("tab")  # the requests pane, where the action is
            await pilot.pause(0.3)
            app.save_screenshot(path.rsplit("/", 1)[-1], path.rsplit("/", 1)[0] or ".")
            await asyncio.gather(*pending)


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "docs/tui.svg"
    with trio_network() as network:
        asyncio.run(_screenshot(network, target))
    print(f"wrote {target}")


def test_escape_clears_the_filter_after_enter_kept_it() -> None:
    """``/`` filter, Enter keeps it (the panes show only matches, the focus back on a
    pane), then Escape — pressed in the pane, not the box — clears it: every row is back
    and the box is hidden. Before the fix Escape only cleared a filter being typed.
    Escape in the details screen still only closes that screen."""
    from tests.test_tui_snapshots import SIZE, make_app

    async def scenario() -> None:
        app = make_app()
        async with app.run_test(size=SIZE) as pilot:
            every_peer = list(app.peers_table.shown_keys())
            every_request = list(app.requests_table.shown_keys())
            await pilot.press("slash", *"gpu-b", "enter")
            box = app.query_one("#filter")
            assert app.filter_text == "gpu-b" and box.has_class("visible")
            assert app.focused is app.peers_table
            assert app.peers_table.shown_keys() == ["gpu-b"]
            await pilot.press("tab")  # the requests pane, still filtered
            assert app.focused is app.requests_table
            assert 0 < len(app.requests_table.shown_keys()) < len(every_request)
            await pilot.press("enter")  # a request's details: Escape closes them only
            assert isinstance(app.screen, DetailScreen)
            await pilot.press("escape")
            await pilot.pause()
            assert not isinstance(app.screen, DetailScreen)
            assert app.filter_text == "gpu-b"
            await pilot.press("escape")  # now in the pane: clears the kept filter
            await pilot.pause()
            assert app.filter_text == ""
            assert not box.has_class("visible")
            assert app.focused is app.requests_table  # the pane keeps the focus
            assert app.peers_table.shown_keys() == every_peer
            assert sorted(app.requests_table.shown_keys()) == sorted(every_request)

    asyncio.run(scenario())
