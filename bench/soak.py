"""The soak: minutes of mixed load on a real network with nodes killed and a relay
restarted, and the verdicts that say whether anything failed or leaked.

Processes (each its own process group, on 127.0.0.1 only):

* a gateway (``--role gateway``, open: loopback, no key);
* a relay (``--role relay``) dialling the gateway, on a fixed port so that it can be
  restarted where its nodes dial;
* a fake OpenAI-compatible upstream (``bench/fake_upstream.py``, 16-event streams);
* six nodes, each with ``node.admin_listen`` (so its ``/metrics`` gives its trio task
  count): ``node-d1`` and ``node-d2`` (simulated backend, model ``soak-sim``, 40 tokens
  a second after a 50 ms first token) and ``node-o1``, ``node-o2`` (``openai`` backend on
  the fake upstream, model ``fake-model``) dial the gateway; ``node-r1`` and ``node-r2``
  (simulated, ``soak-sim``) dial the relay.

``node-d1``, ``node-o1`` and ``node-r1`` are the *keepers*: never killed, so their
memory, file descriptors and tasks can be followed over the whole run (``node-r1``
reconnects through both relay restarts). ``node-d2``, ``node-o2`` and ``node-r2`` are
the *victims*: one of them, a different one each time, is killed with SIGKILL and
restarted (same data dir, so the same identity) every minute, at second 30 of the
minute. The relay is restarted twice, at 1/3 of the run (SIGTERM, a graceful stop)
and at 2/3 (SIGKILL), on the same port.

The load (``--concurrency`` client tasks, each with its own keep-alive connection pool,
a random think time of 0-200 ms between requests): streamed chat completions read to
their ``data: [DONE]``, streams the client walks away from after 1-5 events,
non-streamed completions, non-streamed ones the client abandons after 50-500 ms,
and ``GET /v1/models``; either model; 30 % of the chat requests pinned to one node
(``provider.only``), the rest routed by the gateway.

Every request is classified:

* ``ok``: a complete, well-formed answer (an intended client disconnect counts as ok
  when everything before it was well-formed);
* ``allowed``: a failure that touched a killed node or the restarting relay. The node is
  the answer's ``x-tooti-node``, else the node an error message names, else the
  request's pinned node; the failure is allowed if that node (or, for the relay, one of
  its nodes) was in a *chaos window* while the request ran: from just before the kill
  (or the relay's stop) until the gateway lists the node (every relayed node) live
  again, plus :data:`WINDOW_SLACK` seconds;
* ``unexpected``: every other failure.

Measured: every ``--sample-every`` seconds each process's RSS (``/proc``), open file
descriptors (``/proc/PID/fd``) and trio tasks (``tooti_tasks`` of its ``/metrics``; the
fake upstream has none). At *idle checkpoints* (the end of every minute, the first one
earlier in runs shorter than 4 minutes, and the end) the load pauses, the script waits
until the gateway has no stream in flight and every node is live, and samples (each
``/metrics`` on a fresh connection) until two samples in a row agree (the same fds,
tasks within one: hypercorn, serving a node's ``/metrics``, starts an idle timer for the
scrape's own connection or not; the smaller count is kept), at most 10 s (the table
marks a checkpoint that did not settle and names the processes still changing): those
are the figures the table prints and the verdicts compare. The table also gives, per
minute, the requests by verdict and the median latency of the paced ``soak-sim``
requests; ``--json`` writes every record, chaos window, checkpoint and sample.

Verdicts (the script prints which apply to the run's length):

1. no unexpected failure;
2. no stream left in flight at the gateway after the load stopped, every process alive
   (victims and the relay as restarted), every kill and restart done;
3. file descriptors and tasks of the gateway and the keepers (and of the relay's last
   incarnation when it saw two checkpoints) not growing: the last idle checkpoint
   exceeds the baseline (minute 5 in runs of 10 minutes or more, else the first
   checkpoint) by at most :data:`FD_TASK_SLACK` plus 2 %;
4. RSS flat after warm-up: growth from minute 5 to the end <= 5 % for the gateway and
   the keepers (the relay's last incarnation from its own 5th minute if it lived 10);
   judged only in runs of 10 minutes or more.

Exit status 0 when every applicable verdict passes, 1 otherwise (130 / 128+N on Ctrl-C
or a signal). Every child is killed however the script ends: on exit, on Ctrl-C and
SIGTERM, and on SIGKILL of the script (``PR_SET_PDEATHSIG``, Linux).

Run from the repository root with the project's venv (under ``nice`` on a shared
machine)::

    nice -n 15 python bench/soak.py --minutes 30 [--concurrency 12] [--json FILE] [--keep]

``tests/test_soak.py`` runs ``--minutes 1`` in the suite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
from children import (
    Child,
    Children,
    load_average,
    proc_status_kib,
    report_in_temp_dir,
    sse_problem,
    toml_table,
    wait_for_log,
)

REPO_DIR = Path(__file__).resolve().parent.parent
SIM_MODEL = "soak-sim"
UPSTREAM_MODEL = "fake-model"
KEEPERS = ("node-d1", "node-o1", "node-r1")
VICTIMS = ("node-d2", "node-o2", "node-r2")
RELAYED = ("node-r1", "node-r2")
NODE_MODEL = {"node-d1": SIM_MODEL, "node-d2": SIM_MODEL, "node-r1": SIM_MODEL,
              "node-r2": SIM_MODEL, "node-o1": UPSTREAM_MODEL, "node-o2": UPSTREAM_MODEL}
WINDOW_SLACK = 2.0
"""Seconds a chaos window lasts after the gateway lists the node live again (the script
polls the gateway's peer list, so it learns of the return a little late)."""
FD_TASK_SLACK = 3
"""File descriptors or tasks an idle checkpoint may exceed the baseline by (plus 2 %):
idle pooled upstream connections and keep-alive sockets vary a little."""
RSS_GROWTH_LIMIT = 0.05
RSS_JUDGED_FROM_MINUTES = 10
"""Runs at least this long judge RSS growth (from minute 5)."""
CHAOS_TIMEOUT = 60.0
"""Seconds a restarted node (or relay) has to be listed live again."""
IDLE_TIMEOUT = 30.0
"""Seconds an idle checkpoint waits for the gateway's in-flight streams to end."""
REQUEST_TIMEOUT = 30.0
KINDS = {"stream": 35, "stream-cut": 15, "chat": 35, "chat-cut": 10, "models": 5}
"""The kinds of request the clients send, and their weights."""
NODE_ERROR = re.compile(r"node (node-[a-z0-9]+)")


# --------------------------------------------------------------------- processes


def stable_port() -> int:
    """A free loopback port below the ephemeral range, so nothing else is likely to take
    it while the process listening on it restarts."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1025, low - 12000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def open_fds(pid: int) -> int | None:
    """The open file descriptors of ``pid`` (None once it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


@dataclass
class Slot:
    """One role in the network (a node id, the relay, ...) across its incarnations."""

    name: str
    kind: str
    metrics_url: str = ""
    child: Child | None = None
    incarnation: int = 0
    started: float = 0.0
    port: int = 0


@dataclass
class Sample:
    """One process's figures at one moment (seconds from the load's start)."""

    at: float
    slot: str
    incarnation: int
    rss_mib: float
    fds: int | None
    tasks: int | None


@dataclass
class Checkpoint:
    """Idle figures of every process at one moment of the run."""

    at: float
    label: str
    samples: dict[str, Sample]
    in_flight: int
    unsettled: list[str]
    """Processes whose fds or tasks still changed between the last two samples."""

    @property
    def settled(self) -> bool:
        return not self.unsettled


@dataclass
class Window:
    """A chaos event: ``nodes`` were gone (or unreachable) from ``start`` to ``end``."""

    kind: str
    target: str
    nodes: tuple[str, ...]
    start: float
    end: float | None = None
    back_after: float | None = None


@dataclass
class Record:
    """One client request and how it ended."""

    kind: str
    model: str
    pinned: str
    start: float
    end: float = 0.0
    status: int = 0
    node: str = ""
    outcome: str = ""  # ok | failed
    error: str = ""
    verdict: str = ""  # ok | allowed | unexpected


class Network:
    """The gateway, relay, upstream and nodes of the soak, and how to restart them."""

    def __init__(self, children: Children, root: Path) -> None:
        self.children = children
        self.root = root
        self.slots: dict[str, Slot] = {}
        self.gateway_port = 0
        self.relay_port = stable_port()
        self.upstream_port = stable_port()
        self.sampling = trio.Lock()
        """Held while the processes are sampled: one scrape at a time, so a checkpoint's
        figures are not disturbed by the periodic sampler's connections."""

    def write(self, name: str, text: str) -> Path:
        path = self.root / f"{name}.toml"
        path.write_text(text)
        return path

    def _start(self, slot: Slot, argv: list[str]) -> Child:
        slot.incarnation += 1
        slot.started = time.monotonic()
        suffix = f"-{slot.incarnation}" if slot.incarnation > 1 else ""
        slot.child = self.children.start(slot.name + suffix, argv)
        return slot.child

    async def start_upstream(self) -> None:
        slot = self.slots["upstream"] = Slot("upstream", "upstream")
        child = self._start(slot, [sys.executable, str(REPO_DIR / "bench/fake_upstream.py"),
                                   "--port", str(self.upstream_port), "--chunks", "16"])
        await wait_for_log(child, r"fake upstream on http")

    async def start_gateway(self) -> None:
        slot = self.slots["gateway"] = Slot("gateway", "gateway")
        config = self.write("gateway", 'log_level = "info"\ndrain_grace = 0.0\n'
                            + toml_table("gateway", {"listen": "127.0.0.1:0"}))
        child = self._start(slot, [
            sys.executable, "-m", "tooti", "run", "--role", "gateway", "--config", str(config),
            "--data-dir", str(self.root / "gateway-data")])
        match = await wait_for_log(child, r"gateway listening on http://127\.0\.0\.1:(\d+)")
        self.gateway_port = int(match.group(1))
        slot.metrics_url = f"http://127.0.0.1:{self.gateway_port}/metrics"

    async def start_relay(self) -> None:
        slot = self.slots.setdefault("relay", Slot("relay", "relay"))
        config = self.write("relay", 'log_level = "info"\ndrain_grace = 0.0\n'
                            + toml_table("gateway", {"listen": f"127.0.0.1:{self.relay_port}"}))
        child = self._start(slot, [
            sys.executable, "-m", "tooti", "run", "--role", "relay", "--config", str(config),
            "--peer", f"ws://127.0.0.1:{self.gateway_port}",
            "--data-dir", str(self.root / "relay-data")])
        await wait_for_log(child, r"relay listening on http://127\.0\.0\.1:\d+")
        slot.metrics_url = f"http://127.0.0.1:{self.relay_port}/metrics"

    def start_node(self, name: str) -> None:
        slot = self.slots.setdefault(name, Slot(name, "node"))
        if not slot.port:
            slot.port = stable_port()
        if NODE_MODEL[name] == SIM_MODEL:
            backend: dict[str, object] = {"type": "simulated", "max_concurrency": 32,
                                          "models": [SIM_MODEL]}
            options: dict[str, object] = {"ttft": 0.05, "tokens_per_second": 40.0,
                                          "tokens": 16}
        else:
            backend = {"type": "openai", "url": f"http://127.0.0.1:{self.upstream_port}/v1",
                       "max_concurrency": 32}
            options = {}
        text = ('log_level = "warning"\ndrain_grace = 0.0\n'
                + toml_table("node", {"id": name, "reconnect_initial": 0.1,
                                      "reconnect_max": 1.0,
                                      "admin_listen": f"127.0.0.1:{slot.port}"})
                + toml_table("[[node.backends]]", backend))
        if options:
            text += toml_table("node.backends.options", options)
        config = self.write(name, text)
        peer = self.relay_port if name in RELAYED else self.gateway_port
        self._start(slot, [
            sys.executable, "-m", "tooti", "run", "--role", "node",
            "--peer", f"ws://127.0.0.1:{peer}", "--config", str(config),
            "--data-dir", str(self.root / f"{name}-data")])
        slot.metrics_url = f"http://127.0.0.1:{slot.port}/metrics"

    async def stop(self, name: str, sig: signal.Signals) -> None:
        """Send ``sig`` to ``name``'s process and wait until it has exited (SIGKILL after
        15 s)."""
        child = self.slots[name].child
        assert child is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, sig)
        try:
            await trio.to_thread.run_sync(child.proc.wait, 15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            await trio.to_thread.run_sync(child.proc.wait, 10)

    def dead(self) -> list[str]:
        """Slots whose current process has exited."""
        return [s.name for s in self.slots.values()
                if s.child is not None and s.child.proc.poll() is not None]


# --------------------------------------------------------------------- observing


async def live_nodes(admin: httpx.AsyncClient) -> tuple[dict[str, float], int]:
    """The nodes the gateway lists live with models (id: when their session began), and
    its streams in flight."""
    peers = (await admin.get("/admin/v1/peers")).json()["data"]
    live = {p["id"]: p["connected_at"] for p in peers if p["state"] == "live" and p["models"]}
    return live, sum(p["in_flight"] for p in peers)


async def sessions_of(admin: httpx.AsyncClient) -> dict[str, float]:
    """When the session of each live node began ({} if the gateway does not answer)."""
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        return (await live_nodes(admin))[0]
    return {}


async def wait_live(admin: httpx.AsyncClient, nodes: Sequence[str], limit: float,
                    old: dict[str, float] | None = None) -> bool:
    """Wait until the gateway lists every one of ``nodes`` live; with ``old`` (their
    sessions before a kill), in a new session: one that began at another time, or after
    the gateway was seen not listing the node live."""
    old = dict(old or {})
    with trio.move_on_after(limit):
        while True:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                live, _ = await live_nodes(admin)
                for node in list(old):
                    if node not in live or live[node] != old[node]:
                        del old[node]  # the old session is gone
                if not old and set(nodes) <= set(live):
                    return True
            await trio.sleep(0.05)
    return False


async def tasks_of(metrics: httpx.AsyncClient, url: str) -> int | None:
    """``tooti_tasks`` from a ``/metrics`` page (None if unreachable)."""
    if not url:
        return None
    try:
        # a connection of its own: a kept-alive one's idle timer task would come and go
        text = (await metrics.get(url, headers={"connection": "close"})).text
    except httpx.HTTPError:
        return None
    match = re.search(r"^tooti_tasks (\S+)$", text, re.MULTILINE)
    return int(float(match.group(1))) if match else None


async def sample(network: Network, metrics: httpx.AsyncClient, at: float) -> dict[str, Sample]:
    """Every live process's RSS, fds and tasks now."""
    out = {}
    for slot in network.slots.values():
        child = slot.child
        if child is None or child.proc.poll() is not None:
            continue
        tasks = await tasks_of(metrics, slot.metrics_url)
        out[slot.name] = Sample(round(at, 1), slot.name, slot.incarnation,
                                round(proc_status_kib(child.pid, "VmRSS") / 1024, 1),
                                open_fds(child.pid), tasks)
    return out


# --------------------------------------------------------------------- load


@dataclass
class Load:
    """The client side: request records and the gate that pauses new requests."""

    port: int
    rng: random.Random
    records: list[Record] = field(default_factory=list)
    gate: trio.Event = field(default_factory=trio.Event)
    active: int = 0
    stopped: bool = False
    idle: trio.Event = field(default_factory=trio.Event)
    t0: float = 0.0

    def now(self) -> float:
        return trio.current_time() - self.t0

    def pause(self) -> None:
        self.gate = trio.Event()

    def resume(self) -> None:
        self.gate.set()

    async def worker(self, index: int) -> None:
        """Requests until stopped; between phases (checkpoints) its connections close."""
        rng = random.Random(self.rng.random())
        while not self.stopped:
            await self.gate.wait()
            if self.stopped:
                return
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}",
                                         timeout=REQUEST_TIMEOUT) as client:
                while self.gate.is_set() and not self.stopped:
                    self.active += 1
                    try:
                        await self.one(client, rng)
                    finally:
                        self.active -= 1
                        if self.active == 0:
                            self.idle.set()
                    await trio.sleep(rng.uniform(0, 0.2))

    async def one(self, client: httpx.AsyncClient, rng: random.Random) -> None:
        """One request of a random kind; its record is appended."""
        kind = rng.choices(list(KINDS), list(KINDS.values()))[0]
        model = rng.choice([SIM_MODEL, UPSTREAM_MODEL])
        pinned = ""
        body: dict[str, Any] = {"model": model, "max_tokens": 16,
                                "messages": [{"role": "user", "content": "soak"}]}
        if kind != "models" and rng.random() < 0.3:
            pinned = rng.choice([n for n, m in NODE_MODEL.items() if m == model])
            body["provider"] = {"only": [pinned]}
        record = Record(kind, model if kind != "models" else "", pinned, self.now())
        self.records.append(record)
        try:
            if kind == "models":
                answer = await client.get("/v1/models")
                record.status = answer.status_code
                ok = answer.status_code == 200 and bool(answer.json().get("data"))
                record.outcome = "ok" if ok else "failed"
                if not ok:
                    record.error = answer.text[:200]
            elif kind.startswith("stream"):
                await self.stream(client, body, record, rng.randint(1, 5)
                                  if kind == "stream-cut" else 0)
            else:
                with trio.move_on_after(rng.uniform(0.05, 0.5) if kind == "chat-cut"
                                        else float("inf")) as cut:
                    answer = await client.post("/v1/chat/completions", json=body)
                if cut.cancelled_caught:
                    record.outcome = "ok"  # walked away: intended
                else:
                    record.status = answer.status_code
                    record.node = answer.headers.get("x-tooti-node", "")
                    ok = answer.status_code == 200 and bool(answer.json().get("choices"))
                    record.outcome = "ok" if ok else "failed"
                    if not ok:
                        record.error = answer.text[:300]
        except (httpx.HTTPError, ValueError) as exc:
            record.outcome = "failed"
            record.error = f"{type(exc).__name__}: {exc}"[:300]
        record.end = self.now()

    async def stream(self, client: httpx.AsyncClient, body: dict[str, Any], record: Record,
                     cut_after: int) -> None:
        """A streamed completion read to its end (or walked away from after
        ``cut_after`` events)."""
        body = {**body, "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as answer:
            record.status = answer.status_code
            record.node = answer.headers.get("x-tooti-node", "")
            if answer.status_code != 200:
                record.outcome = "failed"
                record.error = (await answer.aread()).decode(errors="replace")[:300]
                return
            payload = bytearray()
            events = 0
            async for chunk in answer.aiter_raw():
                payload += chunk
                if cut_after:
                    events = payload.count(b"\n\n")
                    if events >= cut_after:
                        break
        if cut_after and events >= cut_after:
            problem = "in-band error" if b'"error"' in payload else ""
        else:
            problem = sse_problem(bytes(payload))
        record.outcome = "failed" if problem else "ok"
        record.error = problem[:300]


def attributed_node(record: Record) -> str:
    """The node a failed request touched: its answer's, an error's, or its pinned one."""
    if record.node:
        return record.node
    match = NODE_ERROR.search(record.error)
    if match:
        return match.group(1)
    return record.pinned


def classify(records: Sequence[Record], windows: Sequence[Window]) -> None:
    """Set every record's verdict: ok, allowed (touched a chaos window) or unexpected."""
    for record in records:
        if record.outcome == "ok":
            record.verdict = "ok"
            continue
        node = attributed_node(record)
        record.verdict = "unexpected"
        for window in windows:
            end = (window.end if window.end is not None else float("inf")) + WINDOW_SLACK
            if node in window.nodes and record.start <= end and record.end >= window.start:
                record.verdict = "allowed"
                break


# --------------------------------------------------------------------- the run


@dataclass
class Options:
    minutes: float
    concurrency: int
    sample_every: float
    seed: int


@dataclass
class Report:
    """Everything the run produced."""

    options: Options
    records: list[Record]
    windows: list[Window]
    checkpoints: list[Checkpoint]
    samples: list[Sample]
    dead: list[str]
    cpu_load: str
    log_problems: dict[str, int]


def schedule(duration: float) -> list[tuple[float, str]]:
    """The director's timeline: idle checkpoints, kills, relay restarts (seconds)."""
    events: list[tuple[float, str]] = []
    minute = 60.0
    checkpoints = [m * minute for m in range(1, int(duration // minute) + 1)
                   if m * minute < duration]
    if duration < 4 * minute:
        checkpoints.insert(0, min(15.0, duration / 4))
    events += [(t, "checkpoint") for t in checkpoints]
    kills = [30.0 + k * minute for k in range(int(duration // minute) + 1)
             if 30.0 + k * minute <= duration - 10]
    events += [(t, "kill") for t in kills]
    events += [(duration / 3, "relay-term"), (2 * duration / 3, "relay-kill")]
    return sorted(events)


async def checkpoint(label: str, network: Network, load: Load, admin: httpx.AsyncClient,
                     metrics: httpx.AsyncClient) -> Checkpoint:
    """Pause the load, wait until idle (no request in flight, every node live), sample
    until two samples in a row agree, resume unless the run is over."""
    load.pause()
    with trio.move_on_after(IDLE_TIMEOUT):
        while load.active:
            load.idle = trio.Event()
            if load.active:
                await load.idle.wait()
    in_flight = -1
    nodes = list(NODE_MODEL)
    with trio.move_on_after(IDLE_TIMEOUT):
        while True:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                live, in_flight = await live_nodes(admin)
                if in_flight == 0 and set(nodes) <= set(live):
                    break
            await trio.sleep(0.1)
    previous: dict[str, Sample] = {}
    samples: dict[str, Sample] = {}
    unsettled = ["?"]
    with trio.move_on_after(10):
        while True:
            async with network.sampling:
                samples = await sample(network, metrics, load.now())
            unsettled = [n for n, s in samples.items() if n != "upstream" and (
                n not in previous or not _agree(s, previous[n]))]
            if not unsettled:
                for name, now in samples.items():
                    before = previous[name].tasks
                    if now.tasks is not None and before is not None:
                        now.tasks = min(now.tasks, before)
                break
            previous = samples
            await trio.sleep(0.3)
    if not load.stopped:
        load.resume()
    return Checkpoint(round(load.now(), 1), label, samples, in_flight, unsettled)


def _agree(a: Sample, b: Sample) -> bool:
    """Two idle samples of a process agree: the same fds, tasks within one (hypercorn,
    serving a node's ``/metrics``, starts its idle-timeout task for the scrape's own
    connection or not, by a race; the smaller count is kept)."""
    if a.fds != b.fds:
        return False
    if a.tasks is None or b.tasks is None:
        return a.tasks == b.tasks
    return abs(a.tasks - b.tasks) <= 1


async def chaos_kill(victim: str, network: Network, load: Load, admin: httpx.AsyncClient,
                     windows: list[Window]) -> None:
    """SIGKILL ``victim``, restart it, wait until the gateway lists it live again."""
    before = {k: v for k, v in (await sessions_of(admin)).items() if k == victim}
    window = Window("kill", victim, (victim,), load.now())
    windows.append(window)
    await network.stop(victim, signal.SIGKILL)
    network.start_node(victim)
    if await wait_live(admin, [victim], CHAOS_TIMEOUT, before):
        window.end = load.now()
        window.back_after = round(window.end - window.start, 2)


async def chaos_relay(sig: signal.Signals, network: Network, load: Load,
                      admin: httpx.AsyncClient, windows: list[Window]) -> None:
    """Stop the relay with ``sig``, start it again on its port, wait until the gateway
    lists its nodes live again."""
    before = {k: v for k, v in (await sessions_of(admin)).items() if k in RELAYED}
    window = Window("relay-" + sig.name, "relay", RELAYED, load.now())
    windows.append(window)
    await network.stop("relay", sig)
    await network.start_relay()
    if await wait_live(admin, RELAYED, CHAOS_TIMEOUT, before):
        window.end = load.now()
        window.back_after = round(window.end - window.start, 2)


async def run(opts: Options, children: Children, root: Path) -> Report:
    """Start the network, run the load and the director, return the report."""
    network = Network(children, root)
    await network.start_upstream()
    await network.start_gateway()
    await network.start_relay()
    for name in NODE_MODEL:
        network.start_node(name)
    base = f"http://127.0.0.1:{network.gateway_port}"
    duration = opts.minutes * 60
    async with httpx.AsyncClient(base_url=base, timeout=10) as admin, \
            httpx.AsyncClient(timeout=10) as metrics:
        if not await wait_live(admin, list(NODE_MODEL), CHAOS_TIMEOUT):
            raise RuntimeError("the nodes did not all register with the gateway")
        print(f"gateway 127.0.0.1:{network.gateway_port}, relay 127.0.0.1:"
              f"{network.relay_port}, upstream 127.0.0.1:{network.upstream_port}; "
              f"6 nodes live; load for {opts.minutes:g} min, {opts.concurrency} clients",
              flush=True)
        load = Load(network.gateway_port, random.Random(opts.seed))
        windows: list[Window] = []
        checkpoints: list[Checkpoint] = []
        samples: list[Sample] = []
        victims = list(VICTIMS)
        random.Random(opts.seed).shuffle(victims)
        load.t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            for index in range(opts.concurrency):
                nursery.start_soon(load.worker, index)
            load.resume()

            async def sampler() -> None:
                while True:
                    await trio.sleep(opts.sample_every)
                    async with network.sampling:
                        samples.extend((await sample(network, metrics, load.now())).values())

            nursery.start_soon(sampler)
            kills = 0
            for at, action in schedule(duration):
                await trio.sleep_until(load.t0 + at)
                if action == "checkpoint":
                    point = await checkpoint(f"{at / 60:.2f} min", network, load, admin,
                                             metrics)
                    checkpoints.append(point)
                    progress(point, load, windows)
                elif action == "kill":
                    await chaos_kill(victims[kills % len(victims)], network, load, admin,
                                     windows)
                    kills += 1
                elif action == "relay-term":
                    await chaos_relay(signal.SIGTERM, network, load, admin, windows)
                else:
                    await chaos_relay(signal.SIGKILL, network, load, admin, windows)
            await trio.sleep_until(load.t0 + duration)
            load.stopped = True
            point = await checkpoint("end", network, load, admin, metrics)
            checkpoints.append(point)
            progress(point, load, windows)
            load.gate.set()  # let paused workers see that the run is over
            nursery.cancel_scope.cancel()
    classify(load.records, windows)
    dead = [n for n in network.dead()]
    problems = {child.name: len(re.findall(r"Traceback|CRITICAL", child.log()))
                for child in children.children}
    return Report(opts, load.records, windows, checkpoints, samples, dead, load_average(),
                  {k: v for k, v in problems.items() if v})


def progress(point: Checkpoint, load: Load, windows: list[Window]) -> None:
    """One line per checkpoint while the run goes on."""
    counts = Counter(r.outcome for r in load.records)
    gw = point.samples.get("gateway")
    print(f"[{point.at:7.1f} s] {point.label:>9}: requests {len(load.records)} "
          f"(failed {counts['failed']}), chaos events {len(windows)}, gateway "
          + (f"RSS {gw.rss_mib} MiB fds {gw.fds} tasks {gw.tasks}" if gw else "gone")
          + ("" if point.settled else f" (not settled: {', '.join(point.unsettled)})"),
          flush=True)


# --------------------------------------------------------------------- report


def minute_table(report: Report) -> list[str]:
    """Requests per minute and the idle figures of every checkpoint."""
    lines = ["requests per minute (ok = complete or an intended client disconnect):",
             f"  {'minute':>6} {'total':>6} {'ok':>6} {'allowed':>8} {'unexpected':>10} "
             f"{'chat p50 ms':>11} {'stream p50 ms':>13} (p50: {SIM_MODEL}, 16 tokens at "
             "40/s)"]
    duration = report.options.minutes * 60
    for minute in range(int(-(-duration // 60))):
        rows = [r for r in report.records if minute * 60 <= r.start < (minute + 1) * 60]
        verdicts = Counter(r.verdict for r in rows)

        def p50(kind: str, rows: list[Record] = rows) -> str:
            values = [(r.end - r.start) * 1000 for r in rows
                      if r.kind == kind and r.verdict == "ok" and r.model == SIM_MODEL]
            return f"{statistics.median(values):.0f}" if values else "-"

        lines.append(f"  {minute + 1:>6} {len(rows):>6} {verdicts['ok']:>6} "
                     f"{verdicts['allowed']:>8} {verdicts['unexpected']:>10} "
                     f"{p50('chat'):>11} {p50('stream'):>13}")
    names = ["gateway", "relay", *KEEPERS, *VICTIMS, "upstream"]
    lines.append("idle checkpoints: RSS MiB / open fds / trio tasks "
                 "(#N = the process's incarnation)")
    lines.append("  " + f"{'at':>9} " + " ".join(f"{n:>17}" for n in names))
    for point in report.checkpoints:
        cells = []
        for name in names:
            s = point.samples.get(name)
            if s is None:
                cells.append(f"{'-':>17}")
                continue
            inc = f"#{s.incarnation}" if s.incarnation > 1 else ""
            cell = f"{s.rss_mib:.0f}/{s.fds}/{'-' if s.tasks is None else s.tasks}{inc}"
            cells.append(f"{cell:>17}")
        mark = "" if point.settled and point.in_flight == 0 else " *"
        lines.append("  " + f"{point.label:>9} " + " ".join(cells) + mark)
    for point in report.checkpoints:
        if not point.settled or point.in_flight:
            lines.append(f"  * {point.label}: in flight {point.in_flight}; still changing "
                         f"after 10 s: {', '.join(point.unsettled) or 'none'}")
    return lines


def judged_names(report: Report) -> list[str]:
    """Processes whose figures are compared: the gateway, the keepers, the relay."""
    return ["gateway", *KEEPERS, "relay"]


def baseline_index(report: Report) -> int:
    """The checkpoint the growth verdicts compare with."""
    if report.options.minutes >= RSS_JUDGED_FROM_MINUTES:
        for index, point in enumerate(report.checkpoints):
            if point.at >= 5 * 60 - 1:
                return index
    return 0


def verdicts(report: Report) -> list[tuple[str, bool | None, str]]:
    """(verdict, passed or None when it does not apply, details)."""
    out: list[tuple[str, bool | None, str]] = []
    unexpected = [r for r in report.records if r.verdict == "unexpected"]
    detail = f"{len(unexpected)} unexpected of {len(report.records)} requests"
    if unexpected:
        reasons = Counter(f"{r.kind} {r.status} node={attributed_node(r) or '?'} "
                          f"{r.error[:100]}" for r in unexpected)
        detail += "; " + "; ".join(f"{n}x {why}" for why, n in reasons.most_common(5))
    out.append(("no unexpected failure", not unexpected, detail))
    kinds = Counter(r.kind for r in report.records if r.verdict == "ok")
    out.append(("every kind of request served",
                all(kinds[k] for k in ("stream", "stream-cut", "chat", "chat-cut")),
                ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))))
    unfinished = [f"{w.kind} {w.target}" for w in report.windows if w.end is None]
    last = report.checkpoints[-1] if report.checkpoints else None
    out.append(("every restart came back, nothing stuck, nothing died",
                not unfinished and not report.dead and last is not None
                and last.in_flight == 0,
                f"{len(report.windows)} chaos events, not back: {unfinished or 'none'}; "
                f"dead: {report.dead or 'none'}; in flight at the end: "
                f"{last.in_flight if last else '?'}"))
    base = baseline_index(report)
    growth: list[str] = []
    ok = True
    applies = False
    for name in judged_names(report):
        points = [p.samples[name] for p in report.checkpoints[base:] if name in p.samples]
        if name == "relay":
            last_inc = max((s.incarnation for s in points), default=0)
            points = [s for s in points if s.incarnation == last_inc]
        if len(points) < 2:
            growth.append(f"{name} not judged (one checkpoint)")
            continue
        applies = True
        first, final = points[0], points[-1]
        for what in ("fds", "tasks"):
            a, b = getattr(first, what), getattr(final, what)
            if a is None or b is None:
                continue
            limit = a + FD_TASK_SLACK + 0.02 * a
            good = b <= limit
            ok &= good
            growth.append(f"{name} {what} {a}->{b}{'' if good else ' GREW'}")
    since = report.checkpoints[base].label if report.checkpoints else "?"
    out.append((f"fds and tasks not growing (checkpoint {since} -> end)",
                ok if applies else None, "; ".join(growth)))
    if report.options.minutes < RSS_JUDGED_FROM_MINUTES:
        out.append(("RSS growth minute 5 -> end <= 5 %", None,
                    f"not judged: the run is shorter than {RSS_JUDGED_FROM_MINUTES} min"))
    else:
        rss: list[str] = []
        ok = True
        for name in judged_names(report):
            points = [p.samples[name] for p in report.checkpoints if name in p.samples]
            if name == "relay":
                last_inc = max((s.incarnation for s in points), default=0)
                own = [p for p in report.checkpoints
                       if name in p.samples and p.samples[name].incarnation == last_inc]
                started = own[0].at if own else 0
                points = [p.samples[name] for p in own if p.at >= started + 5 * 60 - 61]
                if not own or own[-1].at - started < RSS_JUDGED_FROM_MINUTES * 60 - 61:
                    rss.append("relay not judged (its last incarnation lived < 10 min)")
                    continue
            else:
                points = [s for s in points if s.at >= 5 * 60 - 1]
            if len(points) < 2:
                continue
            a, b = points[0].rss_mib, points[-1].rss_mib
            good = b <= a * (1 + RSS_GROWTH_LIMIT)
            ok &= good
            rss.append(f"{name} {a:.1f}->{b:.1f} MiB ({(b - a) / a * 100:+.1f} %)"
                       f"{'' if good else ' GREW'}")
        out.append(("RSS growth minute 5 -> end <= 5 %", ok, "; ".join(rss)))
    return out


def print_report(report: Report) -> bool:
    """Print the tables and the verdicts; True when every applicable verdict passed."""
    print()
    for line in minute_table(report):
        print(line)
    print("chaos events (seconds from the load's start; back = listed live again):")
    for w in report.windows:
        print(f"  {w.start:7.1f} {w.kind:<14} {w.target:<8} back after "
              f"{'NEVER' if w.back_after is None else f'{w.back_after:.2f} s'}")
    allowed = Counter(f"{r.kind} {r.status or r.error.split(':')[0]}"
                      for r in report.records if r.verdict == "allowed")
    if allowed:
        print("allowed failures: " + ", ".join(f"{n}x {k}" for k, n in allowed.most_common()))
    if report.log_problems:
        print("tracebacks or CRITICAL lines in the logs: "
              + ", ".join(f"{k} {v}" for k, v in report.log_problems.items()))
    print(f"load average at the end: {report.cpu_load}")
    print("verdicts:")
    passed = True
    for name, ok, detail in verdicts(report):
        mark = "n/a " if ok is None else ("PASS" if ok else "FAIL")
        passed &= ok is not False
        print(f"  {mark} {name}: {detail}")
    print("SOAK PASSED" if passed else "SOAK FAILED")
    return passed


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the soak, always stop the children."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="load duration (5)")
    parser.add_argument("--concurrency", type=int, default=12, help="client tasks (12)")
    parser.add_argument("--sample-every", type=float, default=5.0,
                        help="seconds between samples under load (5)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write every record and sample here")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args(argv)
    if args.minutes < 0.5:
        parser.error("--minutes must be at least 0.5")
    opts = Options(args.minutes, args.concurrency, args.sample_every, args.seed)
    code, report = report_in_temp_dir("tooti-soak-", run, opts, keep=args.keep)
    if report is None:
        return code
    passed = print_report(report)
    if args.json:
        args.json.write_text(json.dumps({
            "options": asdict(opts), "records": [asdict(r) for r in report.records],
            "windows": [asdict(w) for w in report.windows],
            "checkpoints": [asdict(c) for c in report.checkpoints],
            "samples": [asdict(s) for s in report.samples], "dead": report.dead,
        }, indent=1))
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
