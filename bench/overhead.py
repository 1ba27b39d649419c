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

CPU placement (Linux ``sched_setaffinity``, what ``taskset -c`` does): on two
CPUs the gateway (and LiteLLM, the process it competes with) gets CPU 0 and
the node and upstream share CPU 1; wrk runs on CPU 1 by default (see
``--wrk-cpu``). With four CPUs or more every process gets its own.

Run from the repository root with the project's venv::

    python bench/overhead.py [--duration 10] [--repeat 2] [--litellm] [--quick]
                             [--profile DIR] [--json FILE]

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

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
LITELLM_VENV = BENCH_DIR / ".litellm-venv"
LITELLM_CONFIG = BENCH_DIR / "litellm_config.yaml"
MODEL = "fake-model"
API_KEY = "sk-bench-1234"
LUA = {"non-stream": BENCH_DIR / "post_nostream.lua", "stream": BENCH_DIR / "post_stream.lua"}
MODES = ("non-stream", "stream")
CONCURRENCIES = (1, 16)
TARGET_NAMES = ("direct", "tooti", "litellm")

# docs/benchmarks.md targets (design.md section 7)
MIN_RPS_C16 = {"non-stream": 500.0, "stream": 160.0}
MAX_ADDED_P50_C1_MS = {"non-stream": 2.0, "stream": 6.0}
MIN_LITELLM_RATIO = 5.0


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


def _busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine since boot (0 if unknown)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / _CLK_TCK


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
        self._pids = [c.proc.pid for c in children.children]
        self._wall = time.monotonic()
        self._busy = _busy_seconds()
        self._own = _own_seconds(self._pids)

    def cpus(self) -> float:
        """Average number of CPUs busy with foreign processes since construction."""
        wall = time.monotonic() - self._wall
        busy = _busy_seconds() - self._busy
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

    def describe(self) -> str:
        """A one-line summary for the report."""
        def fmt(cpus: set[int] | None) -> str:
            return ",".join(map(str, sorted(cpus))) if cpus else "any"
        return (f"gateway cpu {fmt(self.gateway)}, node cpu {fmt(self.node)}, upstream cpu "
                f"{fmt(self.upstream)}, litellm cpu {fmt(self.litellm)}, wrk cpu {fmt(self.wrk)}")


def choose_layout(pin: bool, wrk_cpu: str) -> Layout:
    """Pin gateway and node apart; see the module docstring for the two-CPU layout."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not pin or len(cpus) < 2:
        return Layout()
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
    return Layout(gateway=a, node=b, upstream=c, litellm=a, wrk=wrk)


# --------------------------------------------------------------------- targets


@dataclass
class Target:
    """A URL to load, and the processes whose memory counts for it."""

    name: str
    url: str
    pids: dict[str, int] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

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


def start_tooti(
    children: Children, layout: Layout, upstream: Target, data_dir: Path,
    max_concurrency: int | None = None,
) -> Target:
    """Start a gateway and a node (separate processes, state under ``data_dir``).

    ``max_concurrency`` (the node's per-model slot count, tooti's default when
    None) is set through a generated config file, the only place it can be set.
    """
    port = free_port()
    tooti = [sys.executable, "-m", "tooti", "run", "--log-level", "warning"]
    gateway = children.start("gateway", [
        *tooti, "--role", "gateway", "--listen", f"127.0.0.1:{port}",
        "--data-dir", str(data_dir / "gateway"),  # the default usage ledger writes here
    ], layout.gateway)
    upstream_base = upstream.url.removesuffix("/chat/completions")
    backend = ["--backend", f"openai={upstream_base}"]
    if max_concurrency is not None:
        config = data_dir / "node.toml"
        config.write_text(f'[[node.backends]]\ntype = "openai"\nurl = "{upstream_base}"\n'
                          f"max_concurrency = {max_concurrency}\n")
        backend = ["--config", str(config)]
    node = children.start("node", [
        *tooti, "--role", "node", "--peer", f"ws://127.0.0.1:{port}", *backend,
        "--node-id", "bench-node", "--data-dir", str(data_dir / "node"),
    ], layout.node)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if node.proc.poll() is not None:
            raise RuntimeError(f"node exited ({node.proc.returncode}):\n{node.log_tail()}")
        return serves_model(f"{base}/v1/models")

    wait_until(ready, gateway, "the tooti gateway to list the node's model", 30)
    return Target("tooti", f"{base}/v1/chat/completions",
                  {"gateway": gateway.proc.pid, "node": node.proc.pid})


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
        if child.name not in ("gateway", "node") or child.log_path is None:
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
    duration: float,
) -> dict[str, float]:
    """Run one wrk load and return the fields of its RESULT line."""
    argv = [wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--latency",
            "--timeout", "30s", "-s", str(LUA[mode]), url]
    output = children.finish(children.start("wrk", argv, layout.wrk), duration + 60)
    for line in output.splitlines():
        if line.startswith("RESULT "):
            return {k: float(v) for k, v in (kv.split("=") for kv in line.split()[1:])}
    raise RuntimeError(f"wrk printed no RESULT line for {url}:\n{output}")


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
    fields = run_wrk(wrk, children, layout, target.url, mode, concurrency, duration)
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
    print(f"  run {run} {target.name:8} {mode:10} c={concurrency:<3} {m.rps:10.1f} req/s  "
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
    out_dir: Path, top: int,
) -> None:
    """Record the gateway and node with py-spy under c=16 load and print their hot spots.

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
        fields = run_wrk(wrk, children, layout, target.url, mode, 16, seconds + 1)
        print(f"profiled {mode} c=16: {fields['rps']:.0f} req/s under py-spy", flush=True)
        for proc, path, child in recorders:
            output = children.finish(child, 30)
            if not path.exists():
                print(f"py-spy recorded nothing for the {proc}:\n{output}", file=sys.stderr)
                continue
            print(summary(load(path, str(REPO_DIR)), f"{proc}, {mode}, c=16 ({path})", top))
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

    def added_p50(self, target: str, mode: str, c: int) -> list[float]:
        """p50 minus the direct p50 of the same run, per run."""
        direct = {m.run: m.p50_ms for m in self.runs("direct", mode, c)}
        return [m.p50_ms - direct[m.run] for m in self.runs(target, mode, c) if m.run in direct]


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


def report(results: Results, targets: list[str], rss: dict[str, dict[str, float]]) -> str:
    """The figures table, LiteLLM ratios and target verdicts, as Markdown."""
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
            f"{name} {mib:.0f} MiB" for t in rss.values() for name, mib in t.items()))
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
    out += ["Targets (mean over runs):", *verdicts(results, targets), ""]
    return "\n".join(out)


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
    parser.add_argument("--chunks", type=int, default=32, help="SSE events per stream")
    parser.add_argument("--max-concurrency", type=int, metavar="N",
                        help="the node backend's max_concurrency (slots per model; default: "
                             "tooti's own default, 8, so c=16 queues at the gateway)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--wrk-cpu", default="auto",
                        help="CPU list for wrk, 'any', or 'auto' (default: shares the node's "
                             "CPU on two-CPU machines)")
    parser.add_argument("--only", default="",
                        help="comma-separated subset of targets: direct,tooti,litellm")
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
                             "c=16 load (raw profiles into DIR) and print their hot spots")
    parser.add_argument("--profile-top", type=int, default=15,
                        help="rows per hot-spot table (default 15)")
    args = parser.parse_args(argv)
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
        print(report(Results(loaded), names, saved.get("rss_mib", {})))
        return 0
    wrk = find_wrk()
    if args.profile:
        find_pyspy()
    try:
        import tooti
    except ImportError:
        sys.exit("error: tooti is not importable; run with the project's venv python")
    targets = [t for t in TARGET_NAMES if t != "litellm" or args.litellm]
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
    with tempfile.TemporaryDirectory(prefix="tooti-bench-") as tmp, _terminate_on_signals():
        children = Children(Path(tmp))
        try:
            if "litellm" in targets:
                ensure_litellm_venv()  # before anything runs: the install is slow
            upstream = start_upstream(children, layout, args.chunks)
            started = {"direct": upstream}
            if "tooti" in targets:
                started["tooti"] = start_tooti(children, layout, upstream, Path(tmp),
                                               args.max_concurrency)
            if "litellm" in targets:
                started["litellm"] = start_litellm(children, layout, upstream)
            print("warming up...", flush=True)
            for target in started.values():
                for mode in MODES:
                    run_wrk(wrk, children, layout, target.url, mode, 16, 2)
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
                              args.profile, args.profile_top)
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
    print(report(results, targets, rss))
    if warnings:
        print("Warnings logged by tooti during the run (count, message):")
        print("\n".join(f"  {n:5d}  {line}" for line, n in warnings.most_common(12)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "layout": layout.describe(), "duration": args.duration, "chunks": args.chunks,
            "rss_mib": rss, "measurements": [asdict(m) for m in measurements],
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
