"""A throwaway PostgreSQL cluster for the test session (and the benchmarks): Debian's
``postgresql`` package (``scripts/install-postgres.sh`` installs it), ``initdb`` into a
temporary directory, ``pg_ctl`` on a free loopback port, removed at the end.

PostgreSQL refuses to run as root, so as root the cluster runs as the ``postgres``
user the package creates. Set ``TOOTI_TEST_POSTGRES=postgresql://…`` to use a server
of your own instead (each test still gets its own fresh database)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class PostgresMissing(RuntimeError):
    pass


def bin_dir() -> Path:
    """Where ``initdb`` and ``pg_ctl`` are (the newest installed major version)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise PostgresMissing("PostgreSQL is not installed: run scripts/install-postgres.sh "
                          "(Debian's postgresql package)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cluster:
    """A running cluster: :attr:`url` reaches its ``postgres`` database as ``tooti``."""

    def __init__(self, root: Path, port: int, bindir: Path, user: str | None) -> None:
        self.root, self.port, self.bindir, self.user = root, port, bindir, user
        self.url = f"postgresql://tooti@127.0.0.1:{port}/postgres"

    def fresh_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg
        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url.rsplit("/", 1)[0] + "/" + name


class ExternalCluster(Cluster):
    """A server of your own (``TOOTI_TEST_POSTGRES``): fresh databases on it."""

    def __init__(self, url: str) -> None:
        self.url = url


def _run(cmd: list[str], user: str | None, **kwargs: object) -> None:
    if user is not None:
        cmd = ["runuser", "-u", user, "--", *cmd]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   **kwargs)  # type: ignore[call-overload]


@contextmanager
def cluster(durable: bool = False) -> Iterator[Cluster]:
    """Start a throwaway cluster; stop and delete it after. ``durable=False`` turns
    fsync off (tests); benchmarks pass True to measure real commits."""
    bindir = bin_dir()
    user = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresMissing("running as root needs the 'postgres' user (Debian's "
                                  "postgresql package creates it)") from None
        user = "postgres"
    root = Path(tempfile.mkdtemp(prefix="tooti-pg-"))
    if user is not None:
        shutil.chown(root, user)
    data = root / "data"
    try:
        _run([str(bindir / "initdb"), "-D", str(data), "-U", "tooti", "-A", "trust",
              "--no-sync", "-E", "UTF8", "--locale=C"], user)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {exc.stderr.decode()[-2000:]}") from None
    for attempt in range(3):  # a free port can be taken by another process meanwhile
        port = _free_port()
        settings = [f"-p {port}", f"-k {root}", "-c listen_addresses=127.0.0.1",
                    "-c max_connections=100", "-c shared_buffers=64MB"]
        if not durable:
            settings += ["-c fsync=off", "-c synchronous_commit=off",
                         "-c full_page_writes=off"]
        try:
            _run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w",
                  "-t", "60", "-o", " ".join(settings), "start"], user)
            break
        except subprocess.CalledProcessError as exc:
            if attempt == 2:
                log = (root / "log").read_text(errors="replace")[-2000:] \
                    if (root / "log").exists() else ""
                shutil.rmtree(root, ignore_errors=True)
                raise RuntimeError(f"starting PostgreSQL failed: "
                                   f"{exc.stderr.decode()[-1000:]}\n{log}") from None
    try:
        yield Cluster(root, port, bindir, user)
    finally:
        try:
            _run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                 user)
        finally:
            shutil.rmtree(root, ignore_errors=True)
