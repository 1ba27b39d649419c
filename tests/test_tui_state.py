"""The TUI's pure network model: snapshot + deltas, seq skipping, gone peers, request
timelines, in-flight bookkeeping and rates. No Textual, no sockets.

Streams are recorded through the gateway's real :class:`EventBus` (with a fixed
clock), so the snapshot's request summaries have exactly the gateway's shape.
"""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest

import tooti.mesh.events as gateway_events
from tooti.mesh.events import EventBus
from tooti.tui.columns import (
    PEER_COLUMNS,
    REQUEST_COLUMNS,
    age,
    key_label,
    ms,
    peer_matches,
    peer_state,
    rate,
    request_matches,
    request_tok_s,
    tokens,
)
from tooti.tui.state import NetworkState
from tooti.tui.views import PeerView

T0 = 1_750_000_000.0
"""Fixed gateway time zero of every recording."""


def describe(peer_id: str, *, models: tuple[str, ...] = ("tooti-sim",), in_flight: int = 0,
             capacity: int = 8, state: str = "live", ttft_ms: float | None = None,
             tok_s: float | None = None, samples: int = 0, rtt_ms: float | None = 1.5,
             role: str = "node", address: str | None = None, via: str | None = None,
             labels: dict[str, str] | None = None, cooldown: dict[str, Any] | None = None,
             connected_at: float = T0 - 600) -> dict[str, Any]:
    """A ``Peer.describe()`` dict (the gateway's shape), every model alike."""
    per_model: dict[str, Any] = {}
    for model in models:
        record: dict[str, Any] = {
            "in_flight": in_flight, "capacity": capacity,
            "price": {"input": 0.1, "output": 0.4},
            "ttft_ms": ttft_ms, "tokens_per_s": tok_s, "samples": samples,
            "state": "cooldown" if cooldown else "ok",
        }
        if cooldown:
            record["cooldown"] = cooldown
        per_model[model] = record
    described: dict[str, Any] = {
        "id": peer_id, "role": role,
        "address": address or f"10.0.0.{len(peer_id)}:4{len(peer_id)}00",
        "labels": labels or {}, "software": "tooti/0.1.0", "models": sorted(models),
        "in_flight": in_flight * len(models), "draining": state == "draining",
        "rtt_ms": rtt_ms, "connected_at": connected_at, "state": state, "failures": 0,
        "stats": {"in_flight": in_flight, "queued": 0, "capacity": capacity,
                  "healthy": True},
        "per_model": per_model,
    }
    if via:
        described["via"] = via
    return described


class Recorder:
    """Publishes on a real gateway :class:`EventBus` at chosen times and keeps the
    events as the admin stream would send them."""

    def __init__(self) -> None:
        self.bus = EventBus()
        self.events: list[dict[str, Any]] = []
        self.bus.listeners.append(lambda event: self.events.append(event.to_dict()))
        self.peers: dict[str, dict[str, Any]] = {}

    def at(self, offset: float, kind: str, **data: Any) -> dict[str, Any]:
        """Publish ``kind`` at ``T0 + offset``; returns the event as streamed."""
        with mock.patch.object(gateway_events.clock, "wall", lambda: T0 + offset):
            self.bus.publish(kind, **data)
        if kind in ("peer.joined", "peer.updated"):
            self.peers[data["peer"]["id"]] = data["peer"]
        elif kind == "peer.left":
            self.peers.pop(data["peer_id"], None)
        return self.events[-1]

    def request(self, offset: float, request_id: str, nodes: list[str], *,
                ttft: float = 0.1, duration: float = 0.5, status: str = "ok",
                prompt: int = 12, completion: int = 40, error: str | None = None,
                stream: bool = True, key_id: str = "anonymous", until: str = "finished",
                model: str = "tooti-sim") -> None:
        """A whole request life (or up to ``until``): received, routed to each of
        ``nodes`` in turn (failovers), first token, finished."""
        self.at(offset, "request.received", request_id=request_id, model=model,
                endpoint="chat/completions", stream=stream, key_id=key_id)
        for attempt, node in enumerate(nodes, 1):
            self.at(offset + 0.002 * attempt, "request.routed", request_id=request_id,
                    node=node, model=model, attempt=attempt)
        if until == "routed" or not nodes:
            if until == "finished":
                self.at(offset + duration, "request.finished", request_id=request_id,
                        status=status, node=None, model=None, attempts=0,
                        prompt_tokens=0, completion_tokens=0, estimated=False, ttft_ms=None,
                        tok_s=None, latency_ms=duration * 1000, error=error)
            return
        if status == "ok" or until != "finished":
            self.at(offset + ttft, "request.first_token", request_id=request_id,
                    node=nodes[-1], ttft_ms=ttft * 1000)
        if until != "finished":
            return
        served = status == "ok"
        self.at(offset + duration, "request.finished", request_id=request_id, status=status,
                node=nodes[-1], model=model, attempts=len(nodes),
                prompt_tokens=prompt if served else 0,
                completion_tokens=completion if served else 0, estimated=False,
                ttft_ms=ttft * 1000 if served else None,
                tok_s=round(completion / (duration - ttft), 2) if served else None,
                latency_ms=duration * 1000, error=error)

    def snapshot(self, queued: int = 0) -> dict[str, Any]:
        """What ``GET /admin/v1/events`` would open with now (``Gateway.snapshot``)."""
        return {"seq": self.bus.last_seq, "peers": list(self.peers.values()),
                "requests": self.bus.recent_requests(200), "queued": queued}

    def since(self, seq: int) -> list[dict[str, Any]]:
        """Events after ``seq``."""
        return [e for e in self.events if e["seq"] > seq]


def replay(state: NetworkState, events: list[dict[str, Any]]) -> None:
    """Apply ``events`` as if each arrived at its own gateway time."""
    for event in events:
        state.apply(event, received_at=event["ts"])


# ------------------------------------------------------------ snapshot and deltas


def test_snapshot_then_deltas_and_seq_skipping() -> None:
    rec = Recorder()
    rec.at(0, "peer.joined", peer=describe("gpu-a"))
    rec.request(1, "req_1", ["gpu-a"])
    snapshot = rec.snapshot()
    rec.at(2, "peer.joined", peer=describe("gpu-b"))
    rec.at(3, "peer.updated", peer=describe("gpu-a", in_flight=2, ttft_ms=80, tok_s=120,
                                            samples=3))
    state = NetworkState()
    state.apply_snapshot(snapshot, received_at=T0 + 1.6)
    assert set(state.peers) == {"gpu-a"} and state.seq == snapshot["seq"]
    assert state.requests["req_1"].state == "ok"

    skipped = [state.apply(event) for event in rec.events]  # the whole history again
    assert skipped.count(True) == 2  # only the two events after the snapshot
    assert set(state.peers) == {"gpu-a", "gpu-b"}
    peer = state.peers["gpu-a"]
    assert (peer.in_flight, peer.capacity, peer.ttft_ms, peer.tok_s) == (2, 8, 80.0, 120.0)
    version = state.version
    assert not state.apply(rec.events[-1])  # a duplicate changes nothing
    assert state.version == version


def test_a_restarted_gateway_numbers_from_one_again() -> None:
    old = Recorder()
    old.at(0, "peer.joined", peer=describe("gpu-a"))
    for i in range(5):
        old.request(1 + i, f"req_old{i}", ["gpu-a"])
    old.request(7, "req_cut", ["gpu-a"], until="first_token")
    state = NetworkState()
    state.apply_snapshot(old.snapshot(), received_at=T0 + 8)
    assert state.requests["req_cut"].state == "streaming"

    new = Recorder()  # the restarted gateway: empty, seq from 1
    state.apply_snapshot(new.snapshot(), received_at=T0 + 20)
    gone = state.peers["gpu-a"]
    assert gone.gone and gone.left_reason == "not connected after reconnect"
    cut = state.requests["req_cut"]
    assert cut.state == "lost" and not cut.active and cut.timeline[-1].kind == "lost"
    assert state.requests["req_old4"].state == "ok"  # history is kept
    event = new.at(21, "peer.joined", peer=describe("gpu-a"))
    assert state.apply(event, received_at=T0 + 21)  # seq 1 is new after the new snapshot
    assert state.peers["gpu-a"].state == "live"
    assert state.snapshots == 2


def test_reconnecting_to_the_same_gateway_does_not_count_requests_twice() -> None:
    rec = Recorder()
    rec.at(0, "peer.joined", peer=describe("gpu-a"))
    state = NetworkState()
    state.apply_snapshot(rec.snapshot(), received_at=T0)
    rec.request(1, "req_1", ["gpu-a"], completion=30)
    rec.request(1.5, "req_2", ["gpu-a"], until="routed")
    replay(state, rec.since(state.seq))
    assert state.rate(T0 + 2, 0) == 1 / state.average
    # the stream broke; the next snapshot holds req_1 (already counted) and req_2
    rec.at(2.5, "request.finished", request_id="req_2", status="ok", node="gpu-a",
           model="tooti-sim", attempts=1, prompt_tokens=3, completion_tokens=7,
           estimated=True, ttft_ms=None, tok_s=None, latency_ms=1000, error=None)
    state.apply_snapshot(rec.snapshot(), received_at=T0 + 3)
    assert state.rate(T0 + 3, 0) == 2 / state.average
    assert state.rate(T0 + 3, 1) == 37 / state.average
    assert tokens(state.requests["req_2"]) == "~3→7"


# ------------------------------------------------------------ peers


def test_departed_peers_are_shown_gone_then_forgotten() -> None:
    rec = Recorder()
    rec.at(0, "peer.joined", peer=describe("gpu-a"))
    rec.at(0, "peer.joined", peer=describe("gpu-b"))
    rec.at(5, "peer.left", peer_id="gpu-b", reason="tunnel lost: heartbeat timeout")
    state = NetworkState(gone_ttl=60)
    replay(state, rec.events)
    gone = state.peers["gpu-b"]
    assert gone.gone and gone.left_at == T0 + 5
    assert gone.left_reason == "tunnel lost: heartbeat timeout"
    assert peer_state(gone, T0 + 17) == "gone 12s"
    assert state.totals(T0 + 6).peers == 1 and state.totals(T0 + 6).live_peers == 1

    assert not state.prune(T0 + 60)
    rec.at(61, "peer.joined", peer=describe("gpu-b"))  # back again: live, not gone
    replay(state, rec.events[-1:])
    assert state.peers["gpu-b"].state == "live"
    rec.at(62, "peer.left", peer_id="gpu-b", reason="closed")
    replay(state, rec.events[-1:])
    assert not state.prune(T0 + 100) and "gpu-b" in state.peers
    assert state.prune(T0 + 123) and "gpu-b" not in state.peers
    assert "gpu-a" in state.peers


def test_cooldowns_change_the_peer_state() -> None:
    rec = Recorder()
    rec.at(0, "peer.joined", peer=describe("duo", models=("m1", "m2")))
    cooldown = {"reason": "node duo unavailable", "seconds_left": 5.0, "count": 1,
                "probing": False}
    rec.at(1, "peer.cooldown", peer_id="duo", model="m1", ttft_ms=None, tokens_per_s=None,
           samples=0, state="cooldown", cooldown=cooldown)
    state = NetworkState()
    replay(state, rec.events)
    duo = state.peers["duo"]
    assert duo.state == "live" and duo.cooldown_models == ["m1"]
    assert peer_state(duo, T0) == "live (1 cooldown)"
    rec.at(2, "peer.cooldown", peer_id="duo", model="m2", ttft_ms=None, tokens_per_s=None,
           samples=0, state="cooldown", cooldown=cooldown)
    replay(state, rec.events[-1:])
    assert duo.state == "cooldown"
    assert state.totals(T0 + 2).live_peers == 0
    rec.at(8, "peer.cooldown", peer_id="duo", model="m1", ttft_ms=50.0, tokens_per_s=None,
           samples=1, state="ok")
    replay(state, rec.events[-1:])
    assert duo.state == "live" and duo.cooldown_models == ["m2"]
    assert "cooldown" not in duo.per_model["m1"] and duo.ttft_ms == 50.0


def test_peer_figures_and_relay_via() -> None:
    relayed = PeerView.from_describe(describe("behind", via="relay-1", samples=0,
                                              ttft_ms=None))
    assert relayed.via == "relay-1"
    relayed.stats["ttft_ms"] = 42.0  # the node's own figure until the gateway measures
    assert relayed.ttft_ms == 42.0
    mixed = PeerView.from_describe(describe("mixed", models=("a", "b")))
    mixed.per_model["a"].update(ttft_ms=100.0, samples=3)
    mixed.per_model["b"].update(ttft_ms=200.0, samples=1)
    assert mixed.ttft_ms == 125.0 and mixed.capacity == 16
    assert PeerView.from_describe(describe("direct")).via == "direct"


# ------------------------------------------------------------ requests


def test_a_request_timeline_with_failover_and_in_flight_bookkeeping() -> None:
    rec = Recorder()
    rec.at(0, "peer.joined", peer=describe("gpu-a"))
    rec.at(0, "peer.joined", peer=describe("gpu-b"))
    state = NetworkState()
    replay(state, rec.events)
    received = rec.at(1, "request.received", request_id="req_f", model="tooti-sim",
                      endpoint="chat/completions", stream=True, key_id="key-0123456789abcdef")
    replay(state, [received])
    request = state.requests["req_f"]
    assert request.state == "queued" and state.totals(T0 + 1).queued == 1
    replay(state, [rec.at(1.01, "request.routed", request_id="req_f", node="gpu-a",
                          model="tooti-sim", attempt=1)])
    assert request.state == "routed" and state.peers["gpu-a"].in_flight == 1
    replay(state, [rec.at(1.5, "request.routed", request_id="req_f", node="gpu-b",
                          model="tooti-sim", attempt=2)])
    assert request.state == "retrying" and request.attempts == 2
    assert (state.peers["gpu-a"].in_flight, state.peers["gpu-b"].in_flight) == (0, 1)
    replay(state, [rec.at(1.6, "request.first_token", request_id="req_f", node="gpu-b",
                          ttft_ms=100.0)])
    assert request.state == "streaming" and state.totals(T0 + 1.6).in_flight == 1
    rec.at(2.6, "request.finished", request_id="req_f", status="ok", node="gpu-b",
           model="tooti-sim", attempts=2, prompt_tokens=9, completion_tokens=50,
           estimated=False, ttft_ms=100.0, tok_s=50.0, latency_ms=1600.0, error=None)
    replay(state, rec.events[-1:])
    assert request.state == "ok" and state.peers["gpu-b"].in_flight == 0
    assert [(s.kind, s.node) for s in request.timeline] == [
        ("received", None), ("routed", "gpu-a"), ("routed", "gpu-b"),
        ("first_token", "gpu-b"), ("finished", "gpu-b")]
    assert request.nodes_tried == ["gpu-a", "gpu-b"]
    assert [s.ts - T0 for s in request.timeline] == pytest.approx([1, 1.01, 1.5, 1.6, 2.6],
                                                                  abs=1e-3)
    assert state.totals(T0 + 3).in_flight == 0

    # the same history, read from a snapshot instead of live
    fresh = NetworkState()
    fresh.apply_snapshot(rec.snapshot(), received_at=T0 + 3)
    again = fresh.requests["req_f"]
    assert [(s.kind, s.node) for s in again.timeline] == [
        (s.kind, s.node) for s in request.timeline]
    assert (again.attempts, again.node, again.completion_tokens, again.key_id) == (
        2, "gpu-b", 50, "key-0123456789abcdef")
    assert again.timeline[-1].detail == "ok" and again.timeline[3].detail == "ttft 100 ms"


def test_failed_requests_and_the_bound_on_requests_kept() -> None:
    rec = Recorder()
    rec.at(0, "peer.joined", peer=describe("gpu-a"))
    rec.request(1, "req_none", [], status="failed", error="no live node serves model 'x'",
                model="x")
    for i in range(6):
        rec.request(2 + i, f"req_{i}", ["gpu-a"])
    rec.request(9, "req_live", ["gpu-a"], until="first_token")
    state = NetworkState(max_requests=4)
    replay(state, rec.events)
    assert list(state.requests) == ["req_3", "req_4", "req_5", "req_live"]
    assert state.requests["req_live"].active


def test_rates_and_sparkline_series() -> None:
    rec = Recorder()
    rec.request(0, "req_a", ["n"], duration=0.5, completion=10)   # finishes in second 0
    rec.request(0.2, "req_b", ["n"], duration=0.9, completion=20)  # second 1
    rec.request(3, "req_c", ["n"], ttft=0.05, duration=0.1, completion=30)  # second 3
    state = NetworkState(window=5, average=2)
    offset = 100.0  # the TUI's clock runs 100 s ahead of the gateway's
    for event in rec.events:
        state.apply(event, received_at=event["ts"] + offset)
    now = T0 + offset + 3.5
    assert state.series(now, 0) == [0, 1, 1, 0, 1]
    assert state.series(now, 1) == [0, 10, 20, 0, 30]
    assert state.rate(now, 0) == 0.5 and state.rate(now, 1) == 15
    totals = state.totals(now)
    assert totals.req_series == [0, 1, 1, 0, 1] and totals.tok_rate == 15
    state.prune(now + 10)
    assert state.series(now + 10, 0) == [0] * 5


# ------------------------------------------------------------ what the tables show


def test_cell_text_and_filters() -> None:
    assert (ms(None), ms(4.25), ms(85.2), ms(1234), ms(45_000)) == (
        "-", "4.2 ms", "85 ms", "1.2 s", "45 s")
    assert (rate(None), rate(7.25), rate(312.4)) == ("-", "7.2", "312")
    assert (age(4), age(150), age(7300)) == ("4s", "2m", "2h")
    assert (key_label("anonymous"), key_label("key-0123456789abcdef"), key_label("")) == (
        "anon", "01234567", "-")
    rec = Recorder()
    rec.at(0, "peer.joined", peer=describe("gpu-eu", labels={"region": "eu"}, ttft_ms=80,
                                           samples=2, in_flight=1))
    rec.request(1, "req_streamed", ["gpu-eu"], duration=1.1, completion=100)
    rec.request(1, "req_whole", ["gpu-eu"], stream=False, error=None)
    state = NetworkState()
    replay(state, rec.events)
    peer = state.peers["gpu-eu"]
    cells = {c.key: c.text(peer, T0 + 2) for c in PEER_COLUMNS}
    assert cells["load"] == "1/8" and cells["ttft"] == "80 ms" and cells["state"] == "live"
    streamed, whole = state.requests["req_streamed"], state.requests["req_whole"]
    cells = {c.key: c.text(streamed, T0 + 3) for c in REQUEST_COLUMNS}
    assert cells["age"] == "2s" and cells["tokens"] == "12→100" and cells["tok_s"] == "100"
    assert request_tok_s(whole) is None  # no decode phase visible for a whole answer
    assert peer_matches(peer, "region=eu") and not peer_matches(peer, "us")
    assert request_matches(streamed, "gpu-eu") and request_matches(streamed, "ok")
    assert not request_matches(streamed, "error")


def test_the_model_client_and_columns_do_not_import_textual() -> None:
    import subprocess
    import sys

    code = ("import sys, tooti.cli, tooti.tui.state, tooti.tui.client, tooti.tui.columns; "
            "sys.exit('textual' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
