"""The ``peer X serves ...`` line (tooti/mesh/serves_log.py): once per change of what a
peer serves, loading models marked, and a budget against a peer that changes at will."""

from __future__ import annotations

import pytest

from tests.test_routing_index import make_peer
from tooti.backends.base import ModelInfo
from tooti.mesh.serves_log import ServesLog


def test_changes_are_logged_within_a_budget_and_the_held_back_ones_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="tooti")
    now = [0.0]
    serves = ServesLog(burst=2, every=30.0, clock=lambda: now[0])
    peer = make_peer("n01")

    def state(value: str) -> None:
        peer.models = {"m": ModelInfo(id="m", state=value)}
        serves.note(peer)

    state("loading")
    state("loading")  # the same again: nothing
    state("ready")
    for flip in range(50):
        state(("loading", "ready")[flip % 2])
    now[0] += 30.0  # one line earned
    state("loading")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["peer n01 serves m (loading)", "peer n01 serves m",
                     "peer n01 serves m (loading) (50 earlier changes not logged)"]


def test_the_summary_marks_loading_models_and_names_a_relay(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="tooti")
    peer = make_peer("n01")
    peer.models = {m: ModelInfo(id=m, state=s) for m, s in
                   (("a", "ready"), ("b", "loading"), ("c", "ready"), ("d", "ready"))}
    ServesLog(clock=lambda: 0.0).note(peer, via="relay-1")
    assert [r.getMessage() for r in caplog.records] == [
        "peer n01 serves a, b (loading), c and 1 more (4 models) (via relay-1)"]
