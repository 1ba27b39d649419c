"""Measure what tooti adds on top of a backend: direct vs gateway -> tunnel -> node.

One invocation starts a fast fake OpenAI-compatible upstream
(``bench/fake_upstream.py``), a tooti gateway and a tooti node as separate
processes (the node dials the gateway over a WebSocket tunnel and forwards to
the upstream), and optionally a LiteLLM proxy on the same upstream. It then
drives the same requests with ``wrk`` at each target:

* ``direct``  - wrk -> fake upstream
* ``tooti``   - wrk -> gateway -> tunnel -> node -> fake upstream
* ``litellm`` - wrk -> LiteLLM proxy (1 worker) -> fake upstream (``--litellm``)

for non-streaming and 32-chunk streaming chat completions at concurrency 1 and
16, and prints req/s, p50, p99, the p50 latency added over ``direct``, the
tooti/LiteLLM ratios and the targets of ``docs/benchmarks.md`` as met / not met.

``tooti`` is an open gateway (loopback, no key: every request is anonymous, so
the built-in ``credits`` billing plugin only records its usage row). With
``--accounts`` the same run also measures the accounts layer switched on (see
docs/accounts.md), each with its own gateway and node:

* ``tooti-keys``    - a gateway started with ``--auth keys`` and an admin key, on
  its default SQLite database in its data dir, and a node whose backend is priced
  (``price_input`` / ``price_output`` > 0 in a generated node config, so every
  request reserves, settles and earns real micro-units);
* ``tooti-keys-pg`` - the same with ``--database postgresql://...`` on a
  throwaway PostgreSQL cluster (``tests/postgres.py``'s ``cluster(durable=True)``:
  fsync and synchronous_commit on, real commits), stopped at the end.
  ``--pg-synchronous-commit off`` turns synchronous_commit off for its database
  (the durability SQLite's ``synchronous=NORMAL`` gives ``tooti-keys``): at c=1
  each request's settle commit otherwise waits for one WAL flush, the disk's
  fdatasync time (``pg_test_fsync`` measures it).

Before measuring, the admin HTTP API (``/admin/v1/``) creates an account, tops it
up with enough credit for every request the run can make at the reservation
size, and creates a key whose limits (rpm, tpm, concurrency) are far above what
the run sends, so the limiter admits every request but still runs; wrk sends
that key (the lua scripts read ``TOOTI_BENCH_KEY``). The report then gives the
cost of auth + credits against ``tooti`` of the same run, per mode and
concurrency (throughput change, p50 added), the targets (cost <= 10 % of
throughput at c=16, <= 0.2 ms p50 added at c=1) as met / not met, and checks
that every wrk answer of every target was 2xx, the keys account's charged total
(its usage rows) and ``GET /admin/v1/ledger/check`` of each keys gateway.
PostgreSQL's processes count as the benchmark's own CPU (the ``postgres``
column), not as other load.

CPU placement (Linux ``sched_setaffinity``, what ``taskset -c`` does): on two
CPUs the gateway (and LiteLLM, the process it competes with) gets CPU 0 and
the node and upstream share CPU 1; wrk runs on CPU 1 by default (see
``--wrk-cpu``). With four CPUs or more every process gets its own. The gateways
of the several tooti targets share the gateway's CPU, their nodes the node's (only
one of them is loaded at a time). PostgreSQL gets a CPU of its own from five CPUs
up, and is left to the scheduler below that.

Run from the repository root with the project's venv::

    python bench/overhead.py [--duration 10] [--repeat 2] [--litellm] [--accounts]
                             [--only T,...] [--quick] [--profile DIR] [--json FILE]

Each figure is measured ``--repeat`` times (runs interleaved across targets).
Before each cell the script waits (up to ``--quiet-wait`` s) until processes
outside the benchmark use less than ``--quiet-below`` CPUs, re-measures a cell
they disturbed (up to ``--retries`` times, keeping the least disturbed
attempt) and reports how busy they were, because shared machines are noisy.
``--profile DIR`` afterwards records the gateway and node with py-spy under
c=16 load and prints their hot spots (see ``bench/profile_summary.py``).

Every child process runs in its own process group and is stopped on exit,
including on Ctrl-C, SIGTERM and (via ``PR_SET_PDEATHSIG``) on SIGKILL of this
script.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from children import machine_busy_seconds

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
LITELLM_VENV = BENCH_DIR / ".litellm-venv"
LITELLM_CONFIG = BENCH_DIR / "litellm_config.yaml"
MODEL = "fake-model"
API_KEY = "sk-bench-1234"
LUA = {"non-stream": BENCH_DIR / "post_nostream.lua", "stream": BENCH_DIR / "post_stream.lua"}
MODES = ("non-stream", "stream")
CONCURRENCIES = (1, 16)
TARGET_NAMES = ("direct", "tooti", "tooti-console", "tooti-keys", "tooti-keys-pg", "litellm")
ACCOUNT_TARGETS = ("tooti-keys", "tooti-keys-pg")
"""Targets with API keys and charged credits (``--accounts``), compared with ``tooti``."""
CONSOLE_TARGET = "tooti-console"
"""The open gateway with its web console on and idle (``--console``), compared with
``tooti``: the console must cost the ``/v1`` path nothing beyond noise."""
KEY_ENV = "TOOTI_BENCH_KEY"
"""The variable the lua scripts read the bearer key from (else :data:`API_KEY`)."""
PRICE_INPUT, PRICE_OUTPUT = 1.0, 2.0
"""What the keys targets' node advertises, in credits per million tokens."""
RPS_BOUND = 20_000
"""More requests per second than any target here serves (sizes the top-up)."""

# docs/benchmarks.md targets (design.md section 7)
MIN_RPS_C16 = {"non-stream": 500.0, "stream": 160.0}
MAX_ADDED_P50_C1_MS = {"non-stream": 2.0, "stream": 6.0}
MIN_LITELLM_RATIO = 5.0
# issue 13: auth + credits vs the open gateway of the same run
MAX_ACCOUNTS_COST_PCT_C16 = 10.0
MAX_ACCOUNTS_ADDED_P50_C1_MS = 0.2


# --------------------------------------------------------------------- processes


def _libc_prctl() -> Callable[..., int] | None:
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
        return prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()
_PR_SET_PDEATHSIG = 1


def _child_setup(cpus: set[int] | None) -> Callable[[], None]:
    """A ``preexec_fn``: pin to ``cpus`` and die with the parent (Linux)."""

    def setup() -> None:
        if _PRCTL is not None:
            _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


@dataclass
class Child:
    """One started process, with its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path | None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the child's log (stdout and stderr)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


class Children:
    """Every process this script started; :meth:`stop_all` ends them all."""

    def __init__(self, log_dir: Path) -> None:
        """Children log into ``log_dir``."""
        self.log_dir = log_dir
        self.children: list[Child] = []
        self.adopted: list[int] = []
        """Processes started otherwise (PostgreSQL) whose CPU counts as the benchmark's."""

    def start(
        self, name: str, argv: Sequence[str | os.PathLike[str]], cpus: set[int] | None,
        env: dict[str, str] | None = None,
    ) -> Child:
        """Start ``argv`` in its own process group, pinned to ``cpus``, logging to a file."""
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [os.fspath(a) for a in argv], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, env=env, cwd=REPO_DIR, start_new_session=True,
                preexec_fn=_child_setup(cpus),  # single-threaded script
            )
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def finish(self, child: Child, timeout: float) -> str:
        """Wait up to ``timeout`` for ``child`` to exit (else kill it); return its output."""
        try:
            child.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(child.proc, signal.SIGKILL)
            child.proc.wait()
        finally:
            if child in self.children:
                self.children.remove(child)
        return child.log_path.read_text(errors="replace") if child.log_path else ""

    def stop_all(self, timeout: float = 5.0) -> None:
        """SIGTERM every process group, then SIGKILL what is left after ``timeout``."""
        alive = [c for c in self.children if c.proc.poll() is None]
        for child in alive:
            _signal_group(child.proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in alive:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for child in self.children:
            # the group may hold grandchildren (LiteLLM workers) even if the leader exited
            _signal_group(child.proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(2)
        self.children.clear()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


@contextlib.contextmanager
def _terminate_on_signals() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt (even if SIGINT was inherited as ignored, as in
    background jobs of a script) and SIGTERM/SIGHUP raise SystemExit, so that
    ``finally`` blocks stop the children."""

    def handler(signum: int, _frame: object) -> None:
        print(f"\n{signal.Signals(signum).name}: stopping children", file=sys.stderr)
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> bytes:
    """GET ``url`` and return its body (raises on errors and non-2xx)."""
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return bytes(response.read())


def wait_until(
    ready: Callable[[], bool], child: Child, what: str, timeout: float,
) -> None:
    """Poll ``ready`` until it is true; fail early if ``child`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited ({child.proc.returncode}) before {what}:\n"
                               + child.log_tail())
        try:
            if ready():
                return
        except (OSError, urllib.error.URLError, ValueError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}:\n" + child.log_tail())


def serves_model(url: str, headers: dict[str, str] | None = None) -> bool:
    """True once ``GET url`` (a /v1/models list) contains the benchmark model."""
    data = json.loads(http_get(url, headers))
    return any(m.get("id") == MODEL for m in data.get("data", []))


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _tree_pids(pid: int) -> list[int]:
    """``pid`` and its living descendants."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        with contextlib.suppress(OSError, ValueError):
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(p) for p in (task / "children").read_text().split()]
    return found


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid`` and its living descendants."""
    total = 0.0
    for current in _tree_pids(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{current}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            total += (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return total


def _own_seconds(pids: Sequence[int]) -> float:
    """CPU seconds of this script, its reaped children and the trees of ``pids``."""
    t = os.times()
    return (t.user + t.system + t.children_user + t.children_system
            + sum(tree_cpu_seconds(pid) for pid in pids))


class ForeignLoad:
    """Measures how many CPUs processes *not* started here kept busy (machine noise)."""

    def __init__(self, children: Children) -> None:
        """Start measuring now (the processes in ``children`` count as our own)."""
        self._pids = [c.proc.pid for c in children.children] + children.adopted
        self._wall = time.monotonic()
        self._busy = machine_busy_seconds()
        self._own = _own_seconds(self._pids)

    def cpus(self) -> float:
        """Average number of CPUs busy with foreign processes since construction."""
        wall = time.monotonic() - self._wall
        busy = machine_busy_seconds() - self._busy
        own = _own_seconds(self._pids) - self._own
        return max(0.0, (busy - own) / wall) if wall > 0 else 0.0


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants, in MiB (0 if unknown)."""
    total_kib = 0
    for current in _tree_pids(pid):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
    return total_kib / 1024


def wait_quiet(children: Children, threshold: float, max_wait: float) -> float:
    """Wait (up to ``max_wait`` s) for a 1-s window with at most ``threshold`` foreign CPUs."""
    deadline = time.monotonic() + max_wait
    announced = False
    while True:
        load = ForeignLoad(children)
        time.sleep(1.0)
        cpus = load.cpus()
        if cpus <= threshold or time.monotonic() >= deadline:
            return cpus
        if not announced:
            print(f"  (other processes busy {cpus:.2f} CPU; waiting up to {max_wait:.0f} s "
                  "for a quieter moment)", flush=True)
            announced = True


# --------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """Which CPUs each process is pinned to (None: not pinned)."""

    gateway: set[int] | None = None
    node: set[int] | None = None
    upstream: set[int] | None = None
    litellm: set[int] | None = None
    wrk: set[int] | None = None
    database: set[int] | None = None

    def describe(self) -> str:
        """A one-line summary for the report."""
        def fmt(cpus: set[int] | None) -> str:
            return ",".join(map(str, sorted(cpus))) if cpus else "any"
        return (f"gateway cpu {fmt(self.gateway)}, node cpu {fmt(self.node)}, upstream cpu "
                f"{fmt(self.upstream)}, litellm cpu {fmt(self.litellm)}, wrk cpu {fmt(self.wrk)}"
                f", postgres cpu {fmt(self.database)}")


def choose_layout(pin: bool, wrk_cpu: str) -> Layout:
    """Pin gateway and node apart; see the module docstring for the two-CPU layout."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not pin or len(cpus) < 2:
        return Layout()
    database = {cpus[4]} if len(cpus) >= 5 else None
    if len(cpus) >= 4:
        a, b, c, d = ({x} for x in cpus[:4])
        wrk = d
    else:
        a, b = {cpus[0]}, {cpus[1]}
        c = b
        wrk = b
    if wrk_cpu == "any":
        wrk = set(cpus)
    elif wrk_cpu != "auto":
        wrk = {int(x) for x in wrk_cpu.split(",")}
    return Layout(gateway=a, node=b, upstream=c, litellm=a, wrk=wrk, database=database)


# --------------------------------------------------------------------- targets


@dataclass
class Target:
    """A URL to load, and the processes whose memory counts for it."""

    name: str
    url: str
    pids: dict[str, int] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    key: str = API_KEY
    """The bearer key wrk sends (:data:`KEY_ENV`)."""
    admin: Admin | None = None
    """The admin API of a keys gateway, and the account the run charges."""
    requests: int = 0
    """Answers wrk counted over every load of this target (warm-up, cells, profile)."""
    non_2xx: int = 0
    """Of those, answers that were not 2xx/3xx (wrk's ``errors.status``)."""

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until the target lists the model again (a tunnel may be re-dialling)."""
        models = self.url.removesuffix("/chat/completions") + "/models"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
                if serves_model(models, self.headers):
                    time.sleep(0.3)
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} stopped serving {MODEL} for {timeout:.0f}s")


def start_upstream(children: Children, layout: Layout, chunks: int) -> Target:
    """Start the fake upstream; the ``direct`` target."""
    port = free_port()
    child = children.start("upstream", [
        sys.executable, BENCH_DIR / "fake_upstream.py", "--port", str(port),
        "--chunks", str(chunks), "--model", MODEL,
    ], layout.upstream)
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: serves_model(f"{base}/v1/models"), child, "the fake upstream", 15)
    return Target("direct", f"{base}/v1/chat/completions", {"upstream": child.proc.pid})


def _node_config(path: Path, upstream_base: str, max_concurrency: int | None,
                 priced: bool) -> Path:
    """Write a node config with one openai backend on ``upstream_base``."""
    lines = ["[[node.backends]]", 'type = "openai"', f'url = "{upstream_base}"']
    if max_concurrency is not None:
        lines.append(f"max_concurrency = {max_concurrency}")
    if priced:
        lines += [f"price_input = {PRICE_INPUT!r}", f"price_output = {PRICE_OUTPUT!r}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def start_tooti(
    children: Children, layout: Layout, upstream: Target, data_dir: Path,
    max_concurrency: int | None = None, *, name: str = "tooti", keys: bool = False,
    database: str = "", top_up: int = 0, console: bool = False,
) -> Target:
    """Start a gateway and a node (separate processes, state under ``data_dir/name``).

    ``max_concurrency`` (the node's per-model slot count, tooti's default when
    None) and the prices are set through a generated config file, the only place
    they can be set. ``keys``: the gateway runs ``--auth keys`` with a generated
    admin key (on ``database``, a ``postgresql://`` URL, or empty for SQLite in its
    data dir), its node's backend is priced, and :func:`open_account` makes the
    account (topped up with ``top_up`` micro-units) and the key wrk sends.
    ``console``: the gateway serves its web console (``--console``), idle.
    """
    port = free_port()
    state = data_dir / name
    state.mkdir(parents=True, exist_ok=True)
    suffix = name.removeprefix("tooti")  # "", "-keys", "-keys-pg": log file names
    tooti = [sys.executable, "-m", "tooti", "run", "--log-level", "warning"]
    argv = [*tooti, "--role", "gateway", "--listen", f"127.0.0.1:{port}",
            "--data-dir", str(state / "gateway")]  # the accounts/usage database is here
    if console:
        argv.append("--console")
    env = dict(os.environ)
    env.pop(KEY_ENV, None)
    admin_key = ""
    if keys:
        admin_key = "bench-admin-" + secrets.token_hex(16)
        env["TOOTI_ADMIN_KEY"] = admin_key  # not on the command line
        argv += ["--auth", "keys"]
        if database:
            argv += ["--database", database]
    gateway = children.start(f"gateway{suffix}", argv, layout.gateway, env)
    upstream_base = upstream.url.removesuffix("/chat/completions")
    backend = ["--backend", f"openai={upstream_base}"]
    if max_concurrency is not None or keys:
        config = _node_config(state / "node.toml", upstream_base, max_concurrency, keys)
        backend = ["--config", str(config)]
    node = children.start(f"node{suffix}", [
        *tooti, "--role", "node", "--peer", f"ws://127.0.0.1:{port}", *backend,
        "--node-id", f"bench-node{suffix}", "--data-dir", str(state / "node"),
    ], layout.node)
    base = f"http://127.0.0.1:{port}"
    target = Target(name, f"{base}/v1/chat/completions",
                    {"gateway": gateway.proc.pid, "node": node.proc.pid})
    if keys:
        target.admin = Admin(base, admin_key)
        wait_until(lambda: target.admin is not None and target.admin.ready(), gateway,
                   f"the {name} gateway's admin API", 30)
        target.key = open_account(target.admin, top_up)
        target.headers = {"Authorization": f"Bearer {target.key}"}

    def ready() -> bool:
        if node.proc.poll() is not None:
            raise RuntimeError(f"node exited ({node.proc.returncode}):\n{node.log_tail()}")
        return serves_model(f"{base}/v1/models", target.headers)

    wait_until(ready, gateway, f"the {name} gateway to list the node's model", 30)
    if keys:
        limit = probe(target).get("x-ratelimit-limit-requests")
        print(f"{name}: a probe answer says x-ratelimit-limit-requests: {limit} "
              f"({'the limiter admits' if limit else 'NO LIMITER HEADERS'})", flush=True)
    return target


def probe(target: Target) -> dict[str, str]:
    """POST one benchmark request (non-streamed) to ``target`` with its key; the answer's
    headers (lower-case names). Raises RuntimeError unless it is 2xx."""
    request = urllib.request.Request(
        target.url, lua_body("non-stream"), method="POST",
        headers={"Authorization": f"Bearer {target.key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
            return {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise RuntimeError(f"{target.name}: a probe request got {exc.code} {detail}") from None


# --------------------------------------------------------------------- accounts


@dataclass
class Admin:
    """The admin HTTP API (``/admin/v1/``) of a keys gateway, and the account the run
    charges there."""

    base: str
    admin_key: str
    account_id: str = ""
    topped_up: int = 0
    """Micro-units the account was given."""

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             key: str | None = None) -> Any:
        """``method path`` with the admin key (or ``key``); the decoded JSON answer.
        A non-2xx answer raises RuntimeError with its error object."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {key or self.admin_key}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.base + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise RuntimeError(f"{method} {path}: {exc.code} {detail}") from None

    def ready(self) -> bool:
        """True once the admin API answers."""
        self.call("GET", "/admin/v1/accounts")
        return True


def lua_body(mode: str) -> bytes:
    """The request body the wrk script of ``mode`` sends (its ``wrk.body`` line)."""
    match = re.search(r"^wrk\.body = '(.*)'$", LUA[mode].read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{LUA[mode]}: no wrk.body line")
    return match.group(1).encode()


def reservation_micros() -> int:
    """What one benchmark request reserves at the keys node's prices (micro-units): its
    prompt bound (body bytes + ``prompt_token_allowance``) and ``max_tokens``, as the
    gateway computes it (:func:`tooti.protocol.usage.limits_for`)."""
    from tooti.accounts.money import cost_micros, price_micros
    from tooti.protocol.usage import limits_for
    from tooti.settings import GatewaySettings

    settings = GatewaySettings()
    most = 0
    for mode in MODES:
        raw = lua_body(mode)
        limits = limits_for("chat", json.loads(raw), len(raw),
                            settings.prompt_token_allowance, settings.media_token_allowance)
        completion = (settings.reserve_completion_tokens if limits.completion is None
                      else limits.completion)
        most = max(most, cost_micros(limits.prompt, completion, price_micros(PRICE_INPUT),
                                     price_micros(PRICE_OUTPUT)))
    return most


def top_up_micros(args: argparse.Namespace) -> int:
    """Credit for every request the run can send to one keys target at the reservation
    size: :data:`RPS_BOUND` requests per second over every load of it (warm-up, each
    cell with its retries), doubled, plus a margin."""
    from tooti.accounts.money import MAX_AMOUNT

    cell = max(1, round(args.duration))
    seconds = (2 * len(MODES) + args.repeat * len(MODES) * len(CONCURRENCIES) * cell
               * (args.retries + 1) + 60)
    return min(MAX_AMOUNT, 2 * RPS_BOUND * seconds * reservation_micros())


def open_account(admin: Admin, top_up: int) -> str:
    """Create the benchmark account, give it ``top_up`` micro-units, and create its key,
    with limits the run never reaches (so the limiter admits and counts every request);
    return the key."""
    account = admin.call("POST", "/admin/v1/accounts", {"name": "bench", "role": "user"})
    admin.account_id = account["id"]
    admin.call("POST", "/admin/v1/credits/top-up", {
        "account": admin.account_id, "amount_micros": top_up, "idem_key": "bench-top-up",
        "memo": "bench/overhead.py"})
    admin.topped_up = top_up
    key = admin.call("POST", "/admin/v1/keys", {
        "account": admin.account_id, "name": "bench", "rpm": 10_000_000,
        "tpm": 10**12, "concurrency": 100_000})
    return str(key["key"])


@dataclass
class AccountCheck:
    """What a keys target's gateway says after the run."""

    target: str
    requests: int
    """Answers wrk counted at this target."""
    non_2xx: int
    usage_requests: int
    """Usage rows of the account (``GET /v1/me``: this UTC month)."""
    charged: int
    """Micro-units charged to the account (its usage rows)."""
    topped_up: int
    ledger_ok: bool
    violations: list[str]


def check_account(target: Target) -> AccountCheck:
    """The account's charged total and the ledger check of a keys target's gateway."""
    assert target.admin is not None
    me = target.admin.call("GET", "/v1/me", key=target.key)
    ledger = target.admin.call("GET", "/admin/v1/ledger/check")
    return AccountCheck(
        target=target.name, requests=target.requests, non_2xx=target.non_2xx,
        usage_requests=int(me["usage"]["requests"]),
        charged=int(me["usage"]["charged_micros"]), topped_up=target.admin.topped_up,
        ledger_ok=bool(ledger["ok"]), violations=[str(v) for v in ledger["violations"]])


@contextlib.contextmanager
def postgres(children: Children, layout: Layout, synchronous_commit: bool = True,
             ) -> Iterator[tuple[str, int]]:
    """A throwaway durable PostgreSQL cluster (tests/postgres.py: fsync and
    synchronous_commit on), stopped and deleted on exit; yields a fresh database's URL
    and the postmaster's pid, whose process tree counts as the benchmark's own CPU.

    ``synchronous_commit=False`` sets it off for that database only: a commit returns
    before its WAL is flushed (fsync stays on: a server crash loses the last few
    hundred milliseconds of commits, never consistency), the durability SQLite's
    ``synchronous=NORMAL`` in WAL mode gives the ``tooti-keys`` target."""
    if str(REPO_DIR) not in sys.path:
        sys.path.insert(0, str(REPO_DIR))
    from tests.postgres import PostgresMissing, cluster

    try:
        with cluster(durable=True) as running:
            pid_file = running.root / "data" / "postmaster.pid"
            postmaster = int(pid_file.read_text().split()[0])
            if layout.database:
                for pid in _tree_pids(postmaster):
                    with contextlib.suppress(OSError):
                        os.sched_setaffinity(pid, layout.database)
            children.adopted.append(postmaster)
            url = running.fresh_database()
            if not synchronous_commit:
                import psycopg

                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute(f"ALTER DATABASE {url.rsplit('/', 1)[1]} "
                                 "SET synchronous_commit = off")
            print(f"PostgreSQL {running.bindir.parent.name} on port {running.port} (fsync on, "
                  f"synchronous_commit {'on' if synchronous_commit else 'off'})", flush=True)
            try:
                yield url, postmaster
            finally:
                children.adopted.remove(postmaster)
    except PostgresMissing as exc:
        raise RuntimeError(f"tooti-keys-pg needs PostgreSQL: {exc}") from None


def ensure_litellm_venv() -> Path:
    """Create ``bench/.litellm-venv`` with ``litellm[proxy]`` once; return its ``litellm``."""
    exe = LITELLM_VENV / "bin" / "litellm"
    if exe.exists():
        return exe
    print(f"creating {LITELLM_VENV.relative_to(REPO_DIR)} and installing 'litellm[proxy]' "
          "(once; takes a few minutes)...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", LITELLM_VENV], check=True)
    subprocess.run([LITELLM_VENV / "bin" / "python", "-m", "pip", "install", "--quiet",
                    "litellm[proxy]"], check=True)
    if not exe.exists():
        raise RuntimeError(f"pip installed litellm but {exe} is missing")
    return exe


def start_litellm(children: Children, layout: Layout, upstream: Target) -> Target:
    """Start a one-worker LiteLLM proxy on the same upstream; the ``litellm`` target."""
    exe = ensure_litellm_venv()
    port = free_port()
    env = dict(os.environ)
    env.update({
        "LITELLM_LOG": "ERROR",
        "LITELLM_MODE": "PRODUCTION",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch from GitHub at start-up
        "BENCH_UPSTREAM_API_BASE": upstream.url.removesuffix("/chat/completions"),
    })
    child = children.start("litellm", [
        exe, "--config", LITELLM_CONFIG, "--host", "127.0.0.1", "--port", str(port),
        "--num_workers", "1",
    ], layout.litellm, env)
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {API_KEY}"}
    wait_until(lambda: serves_model(f"{base}/v1/models", auth), child, "the LiteLLM proxy", 180)
    return Target("litellm", f"{base}/v1/chat/completions", {"litellm": child.proc.pid}, auth)


_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \S+ ")
_NUMBER = re.compile(r"\d+")


def log_warnings(children: Children) -> Counter[str]:
    """WARNING/ERROR lines of the gateway and node logs, numbers blanked, counted."""
    found: Counter[str] = Counter()
    for child in children.children:
        if not child.name.startswith(("gateway", "node")) or child.log_path is None:
            continue
        for line in child.log_path.read_text(errors="replace").splitlines():
            if (" WARNING " in line or " ERROR " in line) and "no join token" not in line:
                message = _NUMBER.sub("N", _TIMESTAMP.sub("", line))
                found[f"{child.name}: {message[:150]}"] += 1
    return found


# --------------------------------------------------------------------- load


@dataclass
class Measurement:
    """One wrk run against one target."""

    target: str
    mode: str
    concurrency: int
    run: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    errors: int
    errors_status: int
    foreign_cpus: float
    cpu_percent: dict[str, float]


def find_wrk() -> str:
    """The wrk executable, or exit with a clear message."""
    wrk = shutil.which("wrk")
    if wrk is None:
        sys.exit("error: wrk is not installed (it is the load generator of this benchmark).\n"
                 "Install it with `sudo apt-get install wrk` (Debian/Ubuntu), "
                 "`brew install wrk` (macOS) or from https://github.com/wg/wrk, then re-run.")
    return wrk


def run_wrk(
    wrk: str, children: Children, layout: Layout, url: str, mode: str, concurrency: int,
    duration: float, key: str = API_KEY,
) -> dict[str, float]:
    """Run one wrk load sending ``key`` and return the fields of its RESULT line."""
    argv = [wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--latency",
            "--timeout", "30s", "-s", str(LUA[mode]), url]
    env = dict(os.environ)
    env[KEY_ENV] = key
    output = children.finish(children.start("wrk", argv, layout.wrk, env), duration + 60)
    for line in output.splitlines():
        if line.startswith("RESULT "):
            return {k: float(v) for k, v in (kv.split("=") for kv in line.split()[1:])}
    raise RuntimeError(f"wrk printed no RESULT line for {url}:\n{output}")


def load_target(
    wrk: str, children: Children, layout: Layout, target: Target, mode: str,
    concurrency: int, duration: float,
) -> dict[str, float]:
    """:func:`run_wrk` at ``target`` with its key; count its answers and non-2xx ones."""
    fields = run_wrk(wrk, children, layout, target.url, mode, concurrency, duration,
                     target.key)
    target.requests += int(fields["requests"])
    target.non_2xx += int(fields["errors_status"])
    return fields


def measure(
    wrk: str, children: Children, layout: Layout, target: Target, mode: str,
    concurrency: int, duration: float, run: int, quiet: tuple[float, float],
) -> Measurement:
    """Measure one cell (once the target serves and the machine is quiet); print a line."""
    target.settle()
    if quiet[1] > 0:
        wait_quiet(children, *quiet)
    load = ForeignLoad(children)
    cpu_before = {proc: tree_cpu_seconds(pid) for proc, pid in target.pids.items()}
    started = time.monotonic()
    fields = load_target(wrk, children, layout, target, mode, concurrency, duration)
    elapsed = time.monotonic() - started
    cpu = {proc: 100 * (tree_cpu_seconds(pid) - cpu_before[proc]) / elapsed
           for proc, pid in target.pids.items()}
    foreign = load.cpus()
    m = Measurement(
        target=target.name, mode=mode, concurrency=concurrency, run=run, rps=fields["rps"],
        p50_ms=fields["p50_ms"], p90_ms=fields["p90_ms"], p99_ms=fields["p99_ms"],
        requests=int(fields["requests"]),
        errors=int(fields["errors_status"] + fields["errors_socket"]),
        errors_status=int(fields["errors_status"]), foreign_cpus=foreign, cpu_percent=cpu,
    )
    print(f"  run {run} {target.name:13} {mode:10} c={concurrency:<3} {m.rps:10.1f} req/s  "
          f"p50 {m.p50_ms:8.3f} ms  p99 {m.p99_ms:8.3f} ms  other load {foreign:4.2f} CPU  "
          + " ".join(f"{proc} {pct:.0f}%" for proc, pct in cpu.items())
          + (f"  ERRORS {m.errors} ({m.errors_status} non-2xx)" if m.errors else ""), flush=True)
    return m


def measure_quietly(
    wrk: str, children: Children, layout: Layout, target: Target, mode: str,
    concurrency: int, duration: float, run: int, quiet: tuple[float, float], retries: int,
) -> Measurement:
    """Measure a cell; re-measure it up to ``retries`` times while other processes kept
    more than ``quiet[0]`` CPUs busy during it, and keep the least disturbed attempt."""
    best: Measurement | None = None
    for _attempt in range(retries + 1):
        if best is not None:
            print(f"  (re-measuring: other processes used {best.foreign_cpus:.2f} CPU)",
                  flush=True)
        m = measure(wrk, children, layout, target, mode, concurrency, duration, run, quiet)
        if best is None or m.foreign_cpus < best.foreign_cpus:
            best = m
        if best.foreign_cpus <= quiet[0]:
            break
    assert best is not None
    return best


def find_pyspy() -> str:
    """The py-spy executable (on PATH or next to this Python), or exit with a message."""
    found = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if found is None:
        sys.exit("error: --profile needs py-spy: `python -m pip install py-spy` into this venv")
    return found


def profile_tooti(
    wrk: str, children: Children, layout: Layout, target: Target, duration: float,
    out_dir: Path, top: int, concurrency: int = 16,
) -> None:
    """Record the gateway and node with py-spy under load (``concurrency`` clients, 16 by
    default) and print their hot spots.

    py-spy samples 100 times a second in its default blocking mode (exact
    stacks, the process pauses for each sample); these runs are not reported
    as figures.
    """
    from profile_summary import load, summary  # bench/ is sys.path[0]

    pyspy = find_pyspy()
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds = max(2, round(duration))
    for mode in MODES:
        recorders = []
        for proc, pid in target.pids.items():
            path = out_dir / f"{proc}-{mode}.txt"
            recorders.append((proc, path, children.start(f"py-spy-{proc}", [
                pyspy, "record", "-p", str(pid), "-d", str(seconds), "-r", "100",
                "-f", "raw", "-o", path,
            ], None)))
        time.sleep(0.5)  # let py-spy attach before the load starts
        fields = load_target(wrk, children, layout, target, mode, concurrency, seconds + 1)
        print(f"profiled {mode} c={concurrency}: {fields['rps']:.0f} req/s under py-spy",
              flush=True)
        for proc, path, child in recorders:
            output = children.finish(child, 30)
            if not path.exists():
                print(f"py-spy recorded nothing for the {proc}:\n{output}", file=sys.stderr)
                continue
            print(summary(load(path, str(REPO_DIR)), f"{proc}, {mode}, c={concurrency} ({path})",
                          top))
            print(flush=True)


# --------------------------------------------------------------------- report


class Results:
    """All measurements, indexed by (target, mode, concurrency)."""

    def __init__(self, measurements: list[Measurement]) -> None:
        """Index ``measurements``."""
        self.all = measurements

    def runs(self, target: str, mode: str, c: int) -> list[Measurement]:
        """The measurements of one cell, in run order."""
        return [m for m in self.all if (m.target, m.mode, m.concurrency) == (target, mode, c)]

    def mean(self, target: str, mode: str, c: int, attr: str) -> float | None:
        """The mean of ``attr`` over the runs of one cell (None if not measured)."""
        values = [getattr(m, attr) for m in self.runs(target, mode, c)]
        return statistics.fmean(values) if values else None

    def added_p50(self, target: str, mode: str, c: int, base: str = "direct") -> list[float]:
        """p50 minus the ``base`` p50 of the same run, per run."""
        direct = {m.run: m.p50_ms for m in self.runs(base, mode, c)}
        return [m.p50_ms - direct[m.run] for m in self.runs(target, mode, c) if m.run in direct]

    def rps_change(self, target: str, mode: str, c: int, base: str = "tooti") -> list[float]:
        """req/s relative to the ``base`` req/s of the same run, in percent, per run
        (negative: ``target`` served fewer)."""
        reference = {m.run: m.rps for m in self.runs(base, mode, c)}
        return [100 * (m.rps - reference[m.run]) / reference[m.run]
                for m in self.runs(target, mode, c) if reference.get(m.run)]


def _fmt_runs(values: Sequence[float], digits: int) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in values) if values else "-"


def _cpu_cell(runs: Sequence[Measurement]) -> str:
    """Mean CPU use of each server process: milliseconds per request and percent."""
    cells = []
    for proc in runs[0].cpu_percent:
        pct = statistics.fmean(m.cpu_percent.get(proc, 0.0) for m in runs)
        per_request = statistics.fmean(
            10 * m.cpu_percent.get(proc, 0.0) / m.rps for m in runs if m.rps > 0)
        cells.append(f"{proc} {per_request:.2f} ms ({pct:.0f}%)")
    return ", ".join(cells)


def report(
    results: Results, targets: list[str], rss: dict[str, dict[str, float]],
    answers: dict[str, tuple[int, int]] | None = None,
    accounts: Sequence[AccountCheck] = (),
) -> str:
    """The figures table, LiteLLM ratios, the cost of auth + credits, target verdicts,
    the answers check and the keys accounts' charges and ledger checks, as Markdown.
    ``answers``: per target, (answers wrk counted, of which non-2xx)."""
    lines = ["| path | mode | c | req/s | p50 ms | p99 ms | added p50 ms | errors | CPU "
             "| other CPU |", "|---|---|---|---|---|---|---|---|---|---|"]
    for target in targets:
        for mode in MODES:
            for c in CONCURRENCIES:
                runs = results.runs(target, mode, c)
                if not runs:
                    continue
                added = results.added_p50(target, mode, c) if target != "direct" else []
                lines.append(
                    f"| {target} | {mode} | {c} | {_fmt_runs([m.rps for m in runs], 0)} | "
                    f"{_fmt_runs([m.p50_ms for m in runs], 2)} | "
                    f"{_fmt_runs([m.p99_ms for m in runs], 2)} | "
                    f"{_fmt_runs(added, 2)} | {sum(m.errors for m in runs)} | "
                    f"{_cpu_cell(runs)} | {_fmt_runs([m.foreign_cpus for m in runs], 2)} |")
    out = ["", "Figures (runs separated by ' / '; added p50 = p50 minus the direct p50 of "
           "the same run; CPU = CPU time per request and CPU use of each server process, mean "
           "of the runs; other CPU = CPUs kept busy by processes outside this benchmark):",
           "", *lines, ""]
    if rss:
        out.append("RSS after the runs: " + "; ".join(
            f"{target} {name} {mib:.0f} MiB" for target, procs in rss.items()
            for name, mib in procs.items()))
        out.append("")
    if "litellm" in targets and "tooti" in targets:
        out += ["tooti / LiteLLM (same run; throughput ratio, and LiteLLM added p50 / "
                "tooti added p50):", "",
                "| mode | c | req/s ratio | added-p50 ratio |", "|---|---|---|---|"]
        for mode in MODES:
            for c in CONCURRENCIES:
                ratios = _paired(results, mode, c, "rps")
                t_add = results.added_p50("tooti", mode, c)
                l_add = results.added_p50("litellm", mode, c)
                lat = [b / a for a, b in zip(t_add, l_add, strict=False) if a > 0]
                out.append(f"| {mode} | {c} | {_fmt_runs(ratios, 1)} | {_fmt_runs(lat, 1)} |")
        out.append("")
    keyed = [t for t in (CONSOLE_TARGET, *ACCOUNT_TARGETS) if t in targets]
    if keyed and "tooti" in targets:
        out += ["The console (idle), or auth + credits, vs the open gateway (tooti) of the "
                "same run (req/s change: negative = slower; p50 added = p50 minus tooti's "
                "p50; per run):", "",
                "| path | mode | c | req/s change % | p50 added ms |", "|---|---|---|---|---|"]
        for target in keyed:
            for mode in MODES:
                for c in CONCURRENCIES:
                    if not results.runs(target, mode, c):
                        continue
                    out.append(
                        f"| {target} | {mode} | {c} | "
                        f"{_fmt_runs(results.rps_change(target, mode, c), 1)} | "
                        f"{_fmt_runs(results.added_p50(target, mode, c, 'tooti'), 3)} |")
        out.append("")
    out += ["Targets (mean over runs):", *verdicts(results, targets), ""]
    if answers:
        out.append("Answers (every wrk load: warm-up, cells, profile; wrk's non-2xx count):")
        for target, (count, bad) in answers.items():
            out.append(f"  {target}: {count} answers, {bad} non-2xx -> "
                       f"{'all 2xx' if bad == 0 else 'NOT ALL 2xx'}")
        out.append("")
    if accounts:
        out += ["Accounts (keys targets, read from each gateway after the run):",
                *account_lines(accounts), ""]
    return "\n".join(out)


def account_lines(checks: Sequence[AccountCheck]) -> list[str]:
    """Per keys target: what its account was charged, and its gateway's ledger check."""
    from tooti.accounts.money import format_credits

    lines = []
    for check in checks:
        per_request = check.charged // check.usage_requests if check.usage_requests else 0
        lines.append(
            f"  {check.target}: charged {format_credits(check.charged)} credits "
            f"({check.charged} micro-units) over {check.usage_requests} usage rows "
            f"({per_request} each; wrk counted {check.requests} answers, {check.non_2xx} "
            f"non-2xx); topped up {format_credits(check.topped_up)}")
        verdict = "ok" if check.ledger_ok else "FAILED: " + "; ".join(check.violations[:3])
        lines.append(f"  {check.target}: ledger check (GET /admin/v1/ledger/check): {verdict}")
        if check.charged <= 0:
            lines.append(f"  {check.target}: NOTHING CHARGED (is the node priced?)")
    return lines


def _paired(results: Results, mode: str, c: int, attr: str) -> list[float]:
    litellm = {m.run: getattr(m, attr) for m in results.runs("litellm", mode, c)}
    return [getattr(m, attr) / litellm[m.run] for m in results.runs("tooti", mode, c)
            if litellm.get(m.run)]


def verdicts(results: Results, targets: list[str]) -> list[str]:
    """One line per target of docs/benchmarks.md: figure, threshold, met / NOT MET."""
    lines: list[str] = []

    def line(label: str, value: float | None, bound: float, at_least: bool, unit: str) -> None:
        if value is None:
            lines.append(f"  {label}: not measured")
            return
        ok = value >= bound if at_least else value <= bound
        lines.append(f"  {label}: {value:.2f}{unit} -> {'met' if ok else 'NOT MET'}")

    if "tooti" not in targets:
        return ["  (tooti not measured)"]
    for mode in MODES:
        floor = MIN_RPS_C16[mode]
        line(f"{mode} req/s at c=16 >= {floor:g}", results.mean("tooti", mode, 16, "rps"),
             floor, True, " req/s")
    for mode in MODES:
        ceiling = MAX_ADDED_P50_C1_MS[mode]
        added = results.added_p50("tooti", mode, 1)
        line(f"{mode} added p50 at c=1 <= {ceiling:g} ms",
             statistics.fmean(added) if added else None, ceiling, False, " ms")
    for target in (t for t in ACCOUNT_TARGETS if t in targets):
        for mode in MODES:
            change = results.rps_change(target, mode, 16)
            line(f"{target} {mode} throughput cost at c=16 <= "
                 f"{MAX_ACCOUNTS_COST_PCT_C16:g} % of tooti's",
                 -statistics.fmean(change) if change else None, MAX_ACCOUNTS_COST_PCT_C16,
                 False, " %")
        for mode in MODES:
            added = results.added_p50(target, mode, 1, "tooti")
            line(f"{target} {mode} p50 added over tooti at c=1 <= "
                 f"{MAX_ACCOUNTS_ADDED_P50_C1_MS:g} ms",
                 statistics.fmean(added) if added else None, MAX_ACCOUNTS_ADDED_P50_C1_MS,
                 False, " ms")
    if "litellm" in targets:
        for mode in MODES:
            for c in CONCURRENCIES:
                ratios = _paired(results, mode, c, "rps")
                line(f"{mode} c={c} throughput >= {MIN_LITELLM_RATIO:g}x LiteLLM",
                     statistics.fmean(ratios) if ratios else None, MIN_LITELLM_RATIO, True,
                     "x")
        for mode in MODES:
            t_add = results.added_p50("tooti", mode, 1)
            l_add = results.added_p50("litellm", mode, 1)
            lat = [b / a for a, b in zip(t_add, l_add, strict=False) if a > 0]
            line(f"{mode} c=1 added p50 <= 1/{MIN_LITELLM_RATIO:g} of LiteLLM's (design.md)",
                 statistics.fmean(lat) if lat else None, MIN_LITELLM_RATIO, True, "x smaller")
    return lines


# --------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description="tooti overhead benchmark: direct vs gateway -> tunnel -> node "
                    "(and LiteLLM with --litellm), measured with wrk.")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds per measured cell (default 10)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs of every cell, interleaved across targets (default 2)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 s per cell, one run")
    parser.add_argument("--litellm", action="store_true",
                        help="also measure a LiteLLM proxy (installed into bench/.litellm-venv)")
    parser.add_argument("--accounts", action="store_true",
                        help="also measure auth + credits: tooti-keys (--auth keys, SQLite) "
                             "and tooti-keys-pg (--database on a throwaway durable "
                             "PostgreSQL), each against tooti of the same run")
    parser.add_argument("--console", action="store_true",
                        help="also measure tooti-console: the open gateway with its web "
                             "console on (--console) and idle, against tooti of the same run")
    parser.add_argument("--pg-synchronous-commit", choices=("on", "off"), default="on",
                        help="tooti-keys-pg: 'on' (default) waits for each commit's WAL "
                             "flush; 'off' matches the durability of SQLite's "
                             "synchronous=NORMAL (fsync stays on either way)")
    parser.add_argument("--chunks", type=int, default=32, help="SSE events per stream")
    parser.add_argument("--max-concurrency", type=int, metavar="N",
                        help="the node backend's max_concurrency (slots per model; default: "
                             "tooti's own default, 8, so c=16 queues at the gateway)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--wrk-cpu", default="auto",
                        help="CPU list for wrk, 'any', or 'auto' (default: shares the node's "
                             "CPU on two-CPU machines)")
    parser.add_argument("--only", default="",
                        help="comma-separated subset of targets: direct,tooti,tooti-console,"
                             "tooti-keys,tooti-keys-pg,litellm (direct always runs; "
                             "tooti-console needs --console, tooti-keys* --accounts, litellm "
                             "--litellm)")
    parser.add_argument("--quiet-below", type=float, default=0.3, metavar="CPUS",
                        help="before each cell wait for other processes to use at most this "
                             "many CPUs (default 0.3)")
    parser.add_argument("--quiet-wait", type=float, default=60.0, metavar="S",
                        help="longest wait for that, per cell; 0 disables (default 60)")
    parser.add_argument("--retries", type=int, default=2,
                        help="re-measure a cell up to this many times when other processes "
                             "used more than --quiet-below CPUs during it, keeping the least "
                             "disturbed attempt (default 2)")
    parser.add_argument("--json", type=Path, help="also write every measurement to this file")
    parser.add_argument("--from-json", type=Path, metavar="FILE",
                        help="print the report of a run saved with --json; run nothing")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="after the runs, record the gateway and node with py-spy under "
                             "load (raw profiles into DIR) and print their hot spots")
    parser.add_argument("--profile-concurrency", type=int, default=16, metavar="N",
                        help="clients of the profiled load (default 16)")
    parser.add_argument("--profile-top", type=int, default=15,
                        help="rows per hot-spot table (default 15)")
    args = parser.parse_args(argv)
    unknown = set(filter(None, args.only.split(","))) - set(TARGET_NAMES)
    if unknown:
        parser.error(f"--only: unknown target(s) {', '.join(sorted(unknown))}; "
                     f"known: {', '.join(TARGET_NAMES)}")
    if args.quick:
        args.duration, args.repeat, args.retries = 3.0, 1, 0
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit status 0 even when targets are not met."""
    args = parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        loaded = [Measurement(**m) for m in saved["measurements"]]
        names = [t for t in TARGET_NAMES if any(m.target == t for m in loaded)]
        print(f"{args.from_json}: {saved['layout']}; {saved['duration']:g} s per cell")
        saved_answers = {t: (a[0], a[1]) for t, a in saved.get("answers", {}).items()}
        saved_checks = [AccountCheck(**c) for c in saved.get("accounts", [])]
        print(report(Results(loaded), names, saved.get("rss_mib", {}), saved_answers,
                     saved_checks))
        return 0
    wrk = find_wrk()
    if args.profile:
        find_pyspy()
    try:
        import tooti
    except ImportError:
        sys.exit("error: tooti is not importable; run with the project's venv python")
    targets = [t for t in TARGET_NAMES if (t != "litellm" or args.litellm)
               and (t not in ACCOUNT_TARGETS or args.accounts)
               and (t != CONSOLE_TARGET or args.console)]
    if args.only:
        wanted = set(args.only.split(","))
        targets = [t for t in targets if t in wanted or t == "direct"]
    layout = choose_layout(not args.no_pin, args.wrk_cpu)
    print(f"tooti {tooti.__version__} from {Path(tooti.__file__).parent}; python "
          f"{sys.version.split()[0]}; {os.cpu_count()} CPUs; {layout.describe()}")
    print(f"{args.duration:g} s per cell, {args.repeat} run(s), {args.chunks}-chunk streams, "
          f"targets: {', '.join(targets)}", flush=True)
    measurements: list[Measurement] = []
    warnings: Counter[str] = Counter()
    rss: dict[str, dict[str, float]] = {}
    answers: dict[str, tuple[int, int]] = {}
    checks: list[AccountCheck] = []
    with (tempfile.TemporaryDirectory(prefix="tooti-bench-") as tmp, _terminate_on_signals(),
          contextlib.ExitStack() as databases):
        children = Children(Path(tmp))
        try:
            if "litellm" in targets:
                ensure_litellm_venv()  # before anything runs: the install is slow
            upstream = start_upstream(children, layout, args.chunks)
            started = {"direct": upstream}
            if "tooti" in targets:
                started["tooti"] = start_tooti(children, layout, upstream, Path(tmp),
                                               args.max_concurrency)
            if CONSOLE_TARGET in targets:
                started[CONSOLE_TARGET] = start_tooti(
                    children, layout, upstream, Path(tmp), args.max_concurrency,
                    name=CONSOLE_TARGET, console=True)
            top_up = 0
            if any(t in targets for t in ACCOUNT_TARGETS):
                top_up = top_up_micros(args)
                print(f"keys targets: node priced {PRICE_INPUT:g} / {PRICE_OUTPUT:g} credits "
                      f"per 1M prompt / completion tokens, {reservation_micros()} micro-units "
                      f"reserved per request, account topped up with {top_up}", flush=True)
            if "tooti-keys" in targets:
                started["tooti-keys"] = start_tooti(
                    children, layout, upstream, Path(tmp), args.max_concurrency,
                    name="tooti-keys", keys=True, top_up=top_up)
            if "tooti-keys-pg" in targets:
                url, postmaster = databases.enter_context(postgres(
                    children, layout, args.pg_synchronous_commit == "on"))
                keys_pg = start_tooti(
                    children, layout, upstream, Path(tmp), args.max_concurrency,
                    name="tooti-keys-pg", keys=True, database=url, top_up=top_up)
                keys_pg.pids["postgres"] = postmaster
                started["tooti-keys-pg"] = keys_pg
            if "litellm" in targets:
                started["litellm"] = start_litellm(children, layout, upstream)
            print("warming up...", flush=True)
            for target in started.values():
                for mode in MODES:
                    load_target(wrk, children, layout, target, mode, 16, 2)
            for run in range(1, args.repeat + 1):
                for target in started.values():
                    for mode in MODES:
                        for c in CONCURRENCIES:
                            measurements.append(measure_quietly(
                                wrk, children, layout, target, mode, c, args.duration, run,
                                (args.quiet_below, args.quiet_wait), args.retries))
            for name, target in started.items():
                rss[name] = {proc: rss_mib(pid) for proc, pid in target.pids.items()}
            warnings = log_warnings(children)
            if args.profile and "tooti" in started:
                profile_tooti(wrk, children, layout, started["tooti"], args.duration,
                              args.profile, args.profile_top, args.profile_concurrency)
            answers = {name: (t.requests, t.non_2xx) for name, t in started.items()}
            checks = [check_account(t) for t in started.values() if t.admin is not None]
        except KeyboardInterrupt:
            print("\ninterrupted; stopping children", file=sys.stderr)
            return 130
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                children.stop_all()
            finally:
                signal.signal(signal.SIGINT, signal.default_int_handler)
    results = Results(measurements)
    print(report(results, targets, rss, answers, checks))
    if warnings:
        print("Warnings logged by tooti during the run (count, message):")
        print("\n".join(f"  {n:5d}  {line}" for line, n in warnings.most_common(12)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "layout": layout.describe(), "duration": args.duration, "chunks": args.chunks,
            "rss_mib": rss, "measurements": [asdict(m) for m in measurements],
            "answers": answers, "accounts": [asdict(c) for c in checks],
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
