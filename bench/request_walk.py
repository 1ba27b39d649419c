"""The walk of one streamed chat request through the gateway's modules, measured.

Runs ``tooti run``'s roles (gateway + an in-process node on the simulated backend) in
this process, sends one warm-up request, then traces the second one: every call into a
``tooti`` module made by the gateway's HTTP request task (the one that serves the
request: parsing, picking a node, opening the stream, relaying the answer, billing).
The node's tasks and the tunnel's read and write loops are other tasks and are not
counted. Prints, for that task:

- ``modules``: distinct tooti modules a function was called in;
- ``returns``: calls that enter a module the walk had already left (the back-and-forth
  between modules; consecutive calls within one module count once);
- ``cross-module calls``: calls from one tooti module into another, and the module
  pairs they go between (the busiest are listed);
- ``calls back``: cross-module calls into a module that is still on the call stack
  further out (a callback up the layers, e.g. a lower module calling a closure of the
  module that called it);
- the sequence itself (``--show``) and the re-entries per module.

A measurement for ``docs/architecture.md``; run it on two commits to compare.

    python bench/request_walk.py [--show] [--stream | --no-stream]
"""

from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
from collections import Counter
from types import FrameType
from typing import Any

import httpx
import trio

from tooti import runner
from tooti.backends.simulated import SimulatedBackend
from tooti.settings import BackendSettings, GatewaySettings, Settings

_RESUMABLE = inspect.CO_COROUTINE | inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR


def _settings(data_dir: str) -> Settings:
    return Settings(roles=["gateway", "node"], data_dir=data_dir, drain_grace=0.1,
                    gateway=GatewaySettings(listen="127.0.0.1:0"))


class Tracer:
    """Records ``(task, module, function)`` of every call into a tooti module."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str, str]] = []
        self.crossings: list[tuple[int, str, str]] = []
        """``(task, caller module, callee module)`` of each call from one tooti module
        into another (a caller outside tooti, e.g. hypercorn, is not a crossing)."""
        self.callbacks: list[tuple[int, str, str]] = []
        """The crossings into a module that is still on the call stack further out (a
        call back up: the back-and-forth a layered walk avoids)."""
        self._resumable: dict[int, FrameType] = {}
        """Coroutine and generator frames already entered: resuming one after an
        ``await`` fires another call event, which is not a new call (the frames are
        kept so their ids are not reused)."""

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        if not module.startswith("tooti"):
            return
        if frame.f_code.co_flags & _RESUMABLE:
            if id(frame) in self._resumable:
                return
            self._resumable[id(frame)] = frame
        try:
            task = id(trio.lowlevel.current_task())
        except RuntimeError:
            return
        self.calls.append((task, module, frame.f_code.co_name))
        caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back else ""
        if caller.startswith("tooti") and caller != module:
            self.crossings.append((task, caller, module))
            outer = frame.f_back.f_back if frame.f_back else None
            while outer is not None:
                if outer.f_globals.get("__name__", "") == module:
                    self.callbacks.append((task, caller, module))
                    break
                outer = outer.f_back


def walk_of(calls: list[tuple[int, str, str]]) -> list[str]:
    """The modules entered by the request task from its ``_http`` call on (the task
    serving the traced request; the longest if another request's task shows up),
    consecutive repeats collapsed."""
    walks: dict[int, list[str]] = {}
    for task, module, name in calls:
        if name == "_http" and task not in walks:
            walks[task] = []
        walk = walks.get(task)
        if walk is not None and (not walk or walk[-1] != module):
            walk.append(module)
    return max(walks.values(), key=len, default=[])


async def measure(stream: bool, show: bool) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        backend = SimulatedBackend(BackendSettings(
            type="simulated", options={"ttft_ms": 0, "tokens_per_second": 0}))
        process = runner.Process(_settings(data_dir), [backend])
        async with trio.open_nursery() as nursery:
            await nursery.start(runner.serve, process)
            url = process.urls[0]
            body = {"model": "tooti-sim", "stream": stream,
                    "messages": [{"role": "user", "content": "walk"}], "max_tokens": 4}
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                (await http.post("/v1/chat/completions", json=body)).raise_for_status()
            await trio.sleep(0.2)  # the warm-up request's tasks have ended
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                tracer = Tracer()
                sys.setprofile(tracer)
                try:
                    response = await http.post("/v1/chat/completions", json=body)
                finally:
                    sys.setprofile(None)
                response.raise_for_status()
            await process.drain()
            nursery.cancel_scope.cancel()
    sequence = walk_of(tracer.calls)
    seen: set[str] = set()
    reentries: Counter[str] = Counter()
    for module in sequence:
        if module in seen:
            reentries[module] += 1
        seen.add(module)
    tasks = {task for task, _module, name in tracer.calls if name == "_http"}
    pairs: Counter[tuple[str, str]] = Counter(
        (a, b) for task, a, b in tracer.crossings if task in tasks)
    print(f"{'streamed' if stream else 'non-streamed'} request: modules {len(seen)}, "
          f"returns {sum(reentries.values())}, entries {len(sequence)}, "
          f"cross-module calls {sum(pairs.values())} over {len(pairs)} module pairs")
    for (a, b), count in pairs.most_common(8):
        print(f"  {a} -> {b}: {count}")
    backs: Counter[tuple[str, str]] = Counter(
        (a, b) for task, a, b in tracer.callbacks if task in tasks)
    print(f"  calls back into a module still on the stack: {sum(backs.values())}")
    for (a, b), count in backs.most_common(6):
        print(f"    {a} -> {b}: {count}")
    for module, count in reentries.most_common():
        print(f"  re-entered {module}: {count}")
    if show:
        print("  " + " -> ".join(m.removeprefix("tooti.") for m in sequence))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--show", action="store_true", help="print the whole sequence")
    parser.add_argument("--no-stream", dest="stream", action="store_false")
    args = parser.parse_args()
    trio.run(measure, args.stream, args.show)


if __name__ == "__main__":
    main()
