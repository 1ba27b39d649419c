"""Child processes for the benchmarks: started in their own process group, killed with
the script (even on SIGKILL of the script, via PR_SET_PDEATHSIG on Linux), signal
handling that turns Ctrl-C / SIGTERM / SIGHUP into a clean shutdown, and the small
measuring helpers the scripts share (a child's CPU time and memory, a free port,
percentiles, the loopback addresses attackers dial from, waiting for a log line, the
open-file limit, a chunked body, whether a streamed answer ended cleanly, how busy the
whole machine was, and a minimal HTTP/1.1 client for streams: :func:`raw_answer`).
Shared by the scripts of ``bench/``."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import trio

from tooti.protocol.sse import SSEDecoder

T = TypeVar("T")
REPO_DIR = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0

def _libc_prctl() -> Callable[..., int] | None:
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
        return prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGKILL when this script dies (Linux)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass
class Child:
    """One started process and its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    def log(self) -> str:
        """Everything the child printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 25) -> str:
        """The last lines of the child's output."""
        return "\n".join(self.log().splitlines()[-lines:])


class Children:
    """Every process this script started; :meth:`stop_all` kills them all."""

    def __init__(self, root: Path) -> None:
        """Configs and logs go into ``root``."""
        self.root = root
        self.children: list[Child] = []

    def start(self, name: str, argv: Sequence[str]) -> Child:
        """Start ``argv`` in its own process group, logging to ``root/NAME.log``."""
        log_path = self.root / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOOTI_")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=REPO_DIR, env=env, start_new_session=True,
                preexec_fn=_die_with_parent,  # the script starts children from one thread
            )
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def stop_all(self) -> None:
        """SIGKILL every child's process group (continuing stopped ones) and reap them.

        Only children not yet reaped are signalled, so a recycled pid is never hit.
        """
        for child in self.children:
            if child.proc.poll() is not None:
                continue
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.pid, sig)
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(5)
        self.children.clear()


async def wait_for_log(child: Child, pattern: str, since: int = 0,
                       limit: float = START_TIMEOUT) -> re.Match[str]:
    """Poll ``child``'s log (from offset ``since``) until ``pattern`` appears; fail if the
    child exits first or ``limit`` seconds pass."""
    compiled = re.compile(pattern)
    with trio.move_on_after(limit):
        while True:
            match = compiled.search(child.log(), since)
            if match:
                return match
            if child.proc.poll() is not None:
                raise RuntimeError(f"{child.name} exited ({child.proc.returncode}) before "
                                   f"/{pattern}/:\n{child.tail()}")
            await trio.sleep(0.02)
    raise RuntimeError(f"timed out waiting for /{pattern}/ from {child.name}:\n{child.tail()}")


async def wait_for_models(client: httpx.AsyncClient, base: str, limit: float = 60.0) -> None:
    """Poll until the gateway at ``base`` lists a model (a node has registered)."""
    with trio.fail_after(limit):
        while True:
            try:
                if (await client.get(f"{base}/v1/models")).json()["data"]:
                    return
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            await trio.sleep(0.2)


@contextlib.contextmanager
def sigint_raises() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt even if SIGINT was inherited as ignored (as in
    background jobs), so ``finally`` blocks always stop the children; trio then
    delivers it at a safe point."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


async def exit_on_signals(work: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run ``work(*args)``; SIGTERM or SIGHUP cancels it and raises SystemExit(128 + N).

    (A plain signal handler raising SystemExit could fire inside trio's own machinery.)
    """
    async with trio.open_nursery() as nursery:
        async def watch() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
                async for signum in signals:
                    raise SystemExit(128 + signum)

        nursery.start_soon(watch)
        result = await work(*args)
        nursery.cancel_scope.cancel()
    return result


def interrupted(exc: BaseException) -> int | None:
    """The exit code if ``exc`` (or every exception in its group) is a Ctrl-C or a
    signal turned into SystemExit by :func:`exit_on_signals`; None otherwise."""
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    if isinstance(exc, BaseExceptionGroup):
        codes = [interrupted(inner) for inner in exc.exceptions]
        if codes and all(code is not None for code in codes):
            return codes[0]
    return None


def run_in_temp_dir(prefix: str, work: Callable[..., Awaitable[object]], *args: Any,
                    keep: bool = False) -> int:
    """Run ``work(*args, children, root)`` under trio in a temp dir named ``prefix...``
    (deleted after unless ``keep``: then its path is printed), stopping every child it
    started however it ends: the exit code of a Ctrl-C or a signal, 0 when it returns;
    on any other error the children's last lines go to stderr and the error is raised."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    children = Children(root)
    try:
        try:
            with sigint_raises():
                trio.run(exit_on_signals, work, *[*args, children, root])
        except BaseException as exc:
            code = interrupted(exc)
            if code is None:
                for child in children.children:
                    print(f"--- {child.name} ---\n{child.tail()}", file=sys.stderr)
                raise
            return code
        finally:
            children.stop_all()
    finally:
        if keep:
            print(f"logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def report_in_temp_dir(prefix: str, work: Callable[..., Awaitable[T]], *args: Any,
                       keep: bool = False) -> tuple[int, T | None]:
    """:func:`run_in_temp_dir` for a benchmark whose ``work`` returns its report:
    ``(0, report)``, or ``(exit code, None)`` once it has said on stderr what stopped
    it (1 for an error: the children's last lines are printed above it)."""
    reports: list[T] = []

    async def keep_report(*arguments: Any) -> None:
        reports.append(await work(*arguments))

    try:
        code = run_in_temp_dir(prefix, keep_report, *args, keep=keep)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1, None
    if code:
        print(f"interrupted: the children were stopped (exit {code})", file=sys.stderr)
        return code, None
    return 0, reports[0]


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def user_system_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid`` so far ((0, 0) once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used by ``pid`` so far (0 once it is gone)."""
    user, system = user_system_seconds(pid)
    return user + system


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (``/proc/stat``: every
    state but idle and iowait; 0 where it cannot be read). The difference over a run,
    less the run's own processes' CPU, is what other processes used meanwhile."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / _CLK_TCK


def proc_status_kib(pid: int, key: str) -> int:
    """A ``kB`` field (``VmRSS``, ``VmHWM``) of ``/proc/PID/status``; 0 if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def load_average() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def raise_fd_limit(needed: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (children inherit it); exits with a
    message if the hard limit is below ``needed``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SystemExit(f"need {needed} file descriptors but the hard limit is {hard}: "
                         "raise it (ulimit -Hn) or ask for fewer connections")
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a child to listen on)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


PER_SOURCE = 100
"""Most connections an attacker keeps from one loopback address: well within the
gateway's per-address limits (``gateway.max_connections_per_ip`` 256 open,
``gateway.connection_burst`` 200 new at once), so a spread attack measures the gateway,
not those limits."""


def loopback_sources(connections: int, at_least: int = 1,
                     per_source: int = PER_SOURCE) -> list[str]:
    """Loopback addresses for an attacker to bind its sockets to, enough that none
    carries more than ``per_source`` of ``connections`` (and at least ``at_least``):
    127.0.1.1, 127.0.1.2, ..., 127.0.2.1, ... The whole 127.0.0.0/8 is local on Linux;
    127.0.0.1, where the measuring clients and the honest node dial from, is never
    one of them. Exits with a message if the first cannot be bound."""
    count = max(at_least, -(-connections // per_source))
    if count > 254 * 254:
        raise ValueError(f"{connections} connections need more loopback addresses than "
                         "127.0.1.1-127.0.254.254")
    sources = [f"127.0.{1 + i // 254}.{1 + i % 254}" for i in range(count)]
    with socket.socket() as sock:
        try:
            sock.bind((sources[0], 0))
        except OSError as exc:
            raise SystemExit(f"cannot bind {sources[0]} ({exc}): the attacks need "
                             "127.0.0.0/8 to be local (Linux)") from None
    return sources


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def toml_value(value: object) -> str:
    """A scalar or list as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r} as TOML")


def toml_table(header: str, values: Mapping[str, object]) -> str:
    """``[header]`` (``[[header]]`` if given with brackets) and its ``key = value`` lines."""
    head = header if header.startswith("[") else f"[{header}]"
    return "\n".join([head, *(f"{k} = {toml_value(v)}" for k, v in values.items())]) + "\n"


def dechunk(body: bytes) -> bytes:
    """Decode an HTTP/1.1 chunked body (raises ValueError if malformed)."""
    out = bytearray()
    at = 0
    while True:
        line_end = body.index(b"\r\n", at)
        size = int(body[at:line_end].split(b";", 1)[0], 16)
        at = line_end + 2
        if size == 0:
            return bytes(out)
        out += body[at:at + size]
        at += size + 2


def sse_request(port: int, body: bytes, path: str = "/v1/chat/completions") -> bytes:
    """The bytes of a POST of JSON ``body`` to ``127.0.0.1:port`` asking for an event
    stream, ``connection: close`` (for :func:`raw_answer`)."""
    return (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n".encode()
            + b"content-type: application/json\r\naccept: text/event-stream\r\n"
            + f"content-length: {len(body)}\r\n".encode()
            + b"connection: close\r\n\r\n" + body)


@dataclass
class RawAnswer:
    """An answer as :func:`raw_answer` read it (times in seconds from just before
    connecting; None: not reached)."""

    status: int = 0
    payload: bytes = b""
    """The body, dechunked."""
    error: str = ""
    """What went wrong ('' if the status is 200 and the body was read whole)."""
    connect: float | None = None
    ttft: float | None = None
    """When the first ``data: `` of the body arrived."""
    total: float | None = None
    reads: int = 0
    """Socket reads that carried body bytes."""


async def raw_answer(port: int, request: bytes) -> RawAnswer:
    """Send ``request`` (its bytes whole, ``connection: close``) on a fresh connection to
    ``127.0.0.1:port`` and read the answer with a minimal HTTP/1.1 parser (a
    ``content-length`` or chunked body, or one that ends when the server closes): far
    less client CPU per event than a full client, so the client does not limit what a
    stream benchmark measures."""
    answer = RawAnswer()
    began = time.perf_counter()
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    answer.connect = time.perf_counter() - began
    async with sock:
        await sock.send_all(request)
        data = bytearray()
        while b"\r\n\r\n" not in data:
            chunk = await sock.receive_some(65536)
            if not chunk:
                answer.error = "connection closed before the response head"
                return answer
            data += chunk
        head, _, rest = bytes(data).partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = dict(line.lower().split(b": ", 1) for line in lines[1:] if b": " in line)
        chunked = headers.get(b"transfer-encoding") == b"chunked"
        length = int(headers.get(b"content-length", b"-1"))
        body = bytearray(rest)
        answer.reads = 1 if rest else 0
        while True:
            if answer.ttft is None and b"data: " in body:
                answer.ttft = time.perf_counter() - began
            if chunked and body.endswith(b"0\r\n\r\n"):
                break
            if not chunked and 0 <= length <= len(body):
                break
            chunk = await sock.receive_some(65536)
            if not chunk:
                break
            answer.reads += 1
            body += chunk
        answer.total = time.perf_counter() - began
    try:
        answer.payload = dechunk(bytes(body)) if chunked else bytes(body)
    except ValueError:
        answer.error = "malformed chunked body"
        return answer
    answer.status = status
    if status != 200:
        answer.error = f"HTTP {status}: {answer.payload[:160].decode(errors='replace')}"
    return answer


def sse_problem(payload: bytes) -> str:
    """'' if an SSE body's events carry no in-band error and end with ``data: [DONE]``,
    else what is wrong with it."""
    decoder = SSEDecoder()
    events = decoder.events(payload)
    for event in events:
        if '"error"' in event.data:
            return "in-band error: " + event.data[event.data.index('"error"'):][:160]
    if decoder.flush().strip():
        return "an unfinished last event"
    if not events or events[-1].data != "[DONE]":
        return "no final data: [DONE]"
    return ""
