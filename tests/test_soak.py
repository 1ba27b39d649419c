"""The soak (``bench/soak.py``) in the suite: one minute of mixed load on a real gateway,
relay and six node processes, with a node killed -9 and restarted and the relay restarted
twice, must pass its verdicts (no unexpected failure, every restart back, nothing left
in flight, file descriptors and tasks of the gateway and the keepers not growing; RSS
growth is not judged in one minute and the script says so). The request classification
the verdicts rest on is checked on its own first.

The soak runs niced (:data:`NICE`, its processes inherit it), so on a loaded machine it
yields to other work and goes slower: nothing here depends on its speed. That the load
really ran (the verdicts are not vacuous) is judged by what any speed gives: every kind
of request answered, requests in flight across every chaos event and answered after
it, and at least one answer per client, not by a count of requests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import trio

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import soak  # noqa: E402  (bench/ is not a package)

SOAK_LIMIT = 600.0
"""Seconds the one-minute soak may take in all (start-up, restarts, checkpoints) on a
loaded machine before the test gives up."""
NICE = 15
"""Niceness of the soak and its processes (as the project runs its load generators):
eight processes for over a minute must not slow the rest of a shared machine."""
CLIENTS = 8


def _niced() -> None:
    os.nice(NICE)


def _failed(node: str = "", pinned: str = "", error: str = "", start: float = 10.0,
            end: float = 11.0) -> soak.Record:
    return soak.Record("chat", soak.SIM_MODEL, pinned, start, end, status=502, node=node,
                       outcome="failed", error=error)


def test_a_failure_is_allowed_only_if_it_touched_a_chaos_window() -> None:
    kill = soak.Window("kill", "node-d2", ("node-d2",), start=10.5, end=12.0)
    relay = soak.Window("relay-SIGTERM", "relay", soak.RELAYED, start=30.0, end=33.0)
    records = [
        _failed(node="node-d2"),                                  # answered by the victim
        _failed(error="node node-d2 unavailable: tunnel lost"),   # named in the error
        _failed(pinned="node-d2", start=12.5, end=13.0),          # pinned, in the slack
        _failed(node="node-r1", start=32.0, end=32.5),            # behind the relay
        _failed(node="node-d1"),                                  # a keeper: unexpected
        _failed(node="node-d2", start=20.0, end=21.0),            # long after: unexpected
        _failed(),                                                # no node: unexpected
        _failed(node="node-r1", start=20.0, end=21.0),            # relay fine then
        soak.Record("stream", soak.SIM_MODEL, "", 10.0, 11.0, 200, "node-d2", "ok"),
    ]
    soak.classify(records, [kill, relay])
    assert [r.verdict for r in records] == [
        "allowed", "allowed", "allowed", "allowed", "unexpected", "unexpected",
        "unexpected", "unexpected", "ok"]


def test_a_window_never_closed_allows_failures_until_the_end() -> None:
    open_window = soak.Window("kill", "node-o2", ("node-o2",), start=5.0)
    records = [_failed(node="node-o2", start=500.0, end=501.0)]
    soak.classify(records, [open_window])
    assert records[0].verdict == "allowed"


def test_a_short_run_still_kills_restarts_and_checks_twice() -> None:
    events = soak.schedule(60.0)
    kinds = [kind for _, kind in events]
    assert kinds.count("kill") == 1 and kinds.count("checkpoint") == 1
    assert [at for at, kind in events if kind.startswith("relay")] == [20.0, 40.0]
    long = soak.schedule(30 * 60.0)
    assert [kind for _, kind in long].count("kill") == 30
    assert [kind for _, kind in long].count("checkpoint") == 29  # + the final one


async def test_one_minute_soak_passes(tmp_path: Path) -> None:
    report = tmp_path / "soak.json"
    with trio.fail_after(SOAK_LIMIT):
        done = await trio.run_process(
            [sys.executable, str(BENCH / "soak.py"), "--minutes", "1", "--concurrency",
             str(CLIENTS), "--json", str(report)],
            capture_stdout=True, stderr=subprocess.STDOUT, check=False, preexec_fn=_niced)
    output = done.stdout.decode(errors="replace")
    assert done.returncode == 0, output
    assert "SOAK PASSED" in output
    assert "PASS no unexpected failure" in output
    assert "PASS fds and tasks not growing" in output
    assert "n/a  RSS growth" in output  # one minute cannot judge it, and says so
    data = json.loads(report.read_text())
    windows = data["windows"]
    assert sorted(w["kind"] for w in windows) == ["kill", "relay-SIGKILL", "relay-SIGTERM"]
    assert all(w["end"] is not None for w in windows)
    records = data["records"]
    assert [r for r in records if r["verdict"] == "unexpected"] == []
    ok = [r for r in records if r["verdict"] == "ok"]
    # The load ran, whatever the machine's speed: every kind of request was answered...
    assert {r["kind"] for r in ok} == set(soak.KINDS), output
    # ...at least one answer per client (each client ends a request at least every
    # REQUEST_TIMEOUT, and the load runs longer than that)...
    assert len(ok) >= CLIENTS, output
    # ...and every chaos event hit requests in flight and was followed by answers.
    for window in windows:
        assert any(r["start"] < window["end"] and r["end"] > window["start"]
                   for r in records), window
        assert any(r["start"] >= window["end"] for r in ok), window
    assert len(data["checkpoints"]) == 2
    assert data["checkpoints"][-1]["in_flight"] == 0


def _report(gateway_rss: list[float], gateway_tasks: list[int]) -> soak.Report:
    """A 30-minute run's report with one idle checkpoint a minute (the last the end)."""
    points = []
    for minute, (rss, tasks) in enumerate(zip(gateway_rss, gateway_tasks, strict=True), 1):
        samples = {name: soak.Sample(minute * 60.0, name, 1, 60.0, 13, 20)
                   for name in soak.KEEPERS}
        samples["gateway"] = soak.Sample(minute * 60.0, "gateway", 1, rss, 30, tasks)
        samples["relay"] = soak.Sample(minute * 60.0, "relay", 1 + (minute >= 20), 61.0,
                                       17, 24)
        points.append(soak.Checkpoint(minute * 60.0, f"{minute} min", samples, 0, []))
    records = [soak.Record(kind, soak.SIM_MODEL, "", 1.0, 2.0, 200, "node-d1", "ok", "",
                           "ok") for kind in ("stream", "stream-cut", "chat", "chat-cut")]
    return soak.Report(soak.Options(30, 12, 5, 1), records,
                       [soak.Window("kill", "node-d2", ("node-d2",), 30.0, 33.0, 3.0)],
                       points, [], [], "0 0 0", {})


def _verdict(report: soak.Report, starts: str) -> bool | None:
    return next(ok for name, ok, _ in soak.verdicts(report) if name.startswith(starts))


def test_a_long_run_judges_rss_from_minute_five() -> None:
    flat = _report([50.0] * 4 + [60.0] + [61.0] * 25, [37] * 30)  # warm-up growth is fine
    assert _verdict(flat, "RSS growth") is True
    assert _verdict(flat, "fds and tasks") is True
    creeping = _report([60.0 + 0.2 * m for m in range(30)], [37] * 30)  # +8 % after min 5
    assert _verdict(creeping, "RSS growth") is False
    leaking = _report([60.0] * 30, [37 + m for m in range(30)])
    assert _verdict(leaking, "fds and tasks") is False
    assert _verdict(leaking, "RSS growth") is True
