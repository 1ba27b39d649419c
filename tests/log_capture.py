"""Capturing a logger's records in-process, and waiting for them without sleeping:
shared by the tests that read what tooti logs (the access log, TLS errors, ...)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import trio

TIMEOUT = 30.0
"""Hang guard of every wait (never reached when the code works)."""


class LogWatch(logging.Handler):
    """Collects the records of the logger it is added to (see :func:`watching`)."""

    def __init__(self, timeout: float = TIMEOUT) -> None:
        super().__init__(logging.DEBUG)
        self.timeout = timeout
        """Seconds any wait may take."""
        self.records: list[logging.LogRecord] = []
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Return once ``condition()`` holds, checked after each record."""
        with trio.fail_after(self.timeout):
            while not condition():
                await self._changed.wait()

    async def wait_count(self, count: int) -> None:
        """Return once ``count`` records have arrived."""
        await self.wait_until(lambda: len(self.records) >= count)

    def matching(self, pattern: str) -> list[str]:
        """The messages that match the regular expression ``pattern``."""
        return [r.getMessage() for r in self.records if re.search(pattern, r.getMessage())]

    async def wait_for(self, pattern: str) -> str:
        """The first message matching ``pattern``, once there is one."""
        await self.wait_until(lambda: bool(self.matching(pattern)))
        return self.matching(pattern)[0]

    def problems(self) -> list[str]:
        """Records at ERROR or above, and any that carry a traceback."""
        return [f"{r.levelname} {r.name}: {r.getMessage()}" for r in self.records
                if r.levelno >= logging.ERROR or r.exc_info]


@contextmanager
def watching(name: str = "tooti", level: int = logging.DEBUG,
             watch: LogWatch | None = None) -> Iterator[LogWatch]:
    """Collect the records of logger ``name`` at ``level`` and above in ``watch`` (a
    new :class:`LogWatch` by default) while the block runs."""
    logger = logging.getLogger(name)
    handler = watch if watch is not None else LogWatch()
    old_level = logger.level
    logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
