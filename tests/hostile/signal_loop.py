"""``tooti run``'s main (its signal loop) in the test's own process: the tests send it
real signals with ``os.kill`` and watch what it does."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from tooti import runner
from tooti.reload import Rebuild
from tooti.runner import Process
from tooti.settings import Settings


@dataclass
class Running:
    process: Process
    """The running process (its roles, URLs)."""
    exit_codes: list[int]
    """``runner.main``'s exit code, once it has returned."""


@asynccontextmanager
async def signal_loop(monkeypatch: pytest.MonkeyPatch, settings: Settings,
                      reload: Rebuild | None = None
                      ) -> AsyncIterator[Running]:
    """Run ``runner.main(settings, reload=...)`` until it returns (the body sends it
    SIGTERM at the end; the caller bounds it with ``trio.fail_after``); yields once
    its process is ready. SIGHUP and SIGTERM are
    ignored around it, so should the loop end early a signal cannot kill the test run."""
    started: list[Process] = []

    @dataclass
    class Recorded(Process):
        def __post_init__(self) -> None:
            started.append(self)

    monkeypatch.setattr(runner, "Process", Recorded)
    exit_codes: list[int] = []

    async def run() -> None:
        exit_codes.append(await runner.main(settings, reload=reload))

    previous = {signum: signal.signal(signum, signal.SIG_IGN)
                for signum in (signal.SIGHUP, signal.SIGTERM)}
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await trio.testing.wait_all_tasks_blocked()
            await started[0].ready.wait()
            yield Running(started[0], exit_codes)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
