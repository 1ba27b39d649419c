"""One ``tooti run`` per data dir: an exclusive lock on ``<data_dir>/tooti.lock``.

The data dir holds a process's identity (node and relay keys), its gateway id and its
SQLite ledger. Two processes sharing one would announce the same node id and replace
each other's session on the gateway every few seconds, so the runner takes this lock
before it first uses the dir and holds it for the life of the process.

The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on an open file descriptor: the kernel
releases it when the process exits, however it exits (a crash or ``kill -9`` included),
so a lock file left behind by a dead process never blocks the next start; the file itself
is not removed (removing it would race with a process that just opened it). The file
holds the owner's pid, for an operator's information only.

A second process on a locked dir gets a :class:`~tooti.config.ConfigError` naming the
dir and ``--data-dir`` (the CLI prints it in one line, exit 2).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "tooti.lock"
"""The lock file's name in the data dir."""


class DataDirLock:
    """An exclusive, process-lifetime lock on a data dir (see the module docstring)."""

    def __init__(self, data_dir: Path, fd: int) -> None:
        self.data_dir = data_dir
        self._fd: int | None = fd

    @property
    def path(self) -> Path:
        """The lock file."""
        return self.data_dir / LOCK_FILE

    @property
    def held(self) -> bool:
        """True until :meth:`release`."""
        return self._fd is not None

    def release(self) -> None:
        """Release the lock (idempotent). Process exit releases it too."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_data_dir(data_dir: str | os.PathLike[str]) -> DataDirLock:
    """Lock ``data_dir`` (``~`` expanded; created if missing) for this process.

    Raises :class:`~tooti.config.ConfigError` (key ``data_dir``) if another process holds
    it, or if the lock file cannot be opened."""
    from tooti.config import ConfigError

    path = Path(os.path.expanduser(os.fspath(data_dir)))
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot use the data dir {path}: {exc.strerror or exc}",
                          key="data_dir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = _read_owner(fd)
        os.close(fd)
        raise ConfigError(
            f"the data dir {path} is in use by another tooti process{owner}; each "
            f"process needs its own: pass --data-dir DIR (or TOOTI_DATA_DIR)",
            key="data_dir") from None
    except OSError as exc:
        os.close(fd)
        raise ConfigError(f"cannot lock the data dir {path}: {exc.strerror or exc}",
                          key="data_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return DataDirLock(path, fd)


def _read_owner(fd: int) -> str:
    """`` (pid N)`` from the lock file, or ``""`` if it holds no pid."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""
