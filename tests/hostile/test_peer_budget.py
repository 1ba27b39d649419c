"""The control-frame budget on its own, on a fake clock (sans-I/O): a peer over budget
is slowed until the interval ends, cut after three intervals over it in a row, cut at
once for too many heartbeats, forgiven after an interval within budget; a relay's
budget grows with its nodes."""

from __future__ import annotations

import pytest

from tooti.protocol import frames
from tooti.protocol.budget import ControlBudget, ControlLimits
from tooti.protocol.errors import ProtocolError
from tooti.protocol.frames import FrameType

LIMITS = ControlLimits(frames=4, bytes=1000, heartbeats=2, strikes=3)
MODELS = frames.encode(FrameType.MODELS, 0, b'{"models":[]}')
HEARTBEAT = frames.encode(FrameType.HEARTBEAT, 0, b"{}")
DATA = frames.encode(FrameType.DATA, 1, b"x" * 500)


def over_budget(budget: ControlBudget, now: float) -> float | None:
    """Send frames at ``now`` until the budget says to pause; returns its answer."""
    for _ in range(LIMITS.frames):
        assert budget.charge(MODELS, now) is None
    return budget.charge(MODELS, now)


def test_within_budget_nothing_happens() -> None:
    budget = ControlBudget(LIMITS, interval=1.0, now=0.0)
    for second in range(10):
        for _ in range(LIMITS.frames):
            assert budget.charge(MODELS, second + 0.5) is None


def test_stream_frames_are_not_counted() -> None:
    budget = ControlBudget(LIMITS, interval=1.0, now=0.0)
    for _ in range(1000):
        assert budget.charge(DATA, 0.5) is None


def test_over_budget_pauses_until_the_interval_ends_then_cuts_on_the_third() -> None:
    budget = ControlBudget(LIMITS, interval=1.0, now=0.0)
    assert over_budget(budget, 0.1) == 1.0  # slowed: read again at the interval's end
    assert over_budget(budget, 1.2) == 2.2  # second interval over budget
    with pytest.raises(ProtocolError) as cut:
        over_budget(budget, 2.3)
    assert cut.value.code == "control_flood"


def test_an_interval_within_budget_forgives() -> None:
    budget = ControlBudget(LIMITS, interval=1.0, now=0.0)
    assert over_budget(budget, 0.1) is not None
    assert over_budget(budget, 1.2) is not None
    assert budget.charge(MODELS, 2.5) is None  # a quiet interval
    assert over_budget(budget, 3.6) is not None  # counted from one again
    assert over_budget(budget, 4.7) is not None


def test_bytes_count_as_well_as_frames() -> None:
    budget = ControlBudget(LIMITS, interval=1.0, now=0.0)
    big = frames.encode(FrameType.MODELS, 0, b"x" * 600)
    assert budget.charge(big, 0.1) is None
    assert budget.charge(big, 0.2) == 1.0


def test_too_many_heartbeats_is_a_violation_at_once() -> None:
    budget = ControlBudget(LIMITS, interval=1.0, now=0.0)
    for _ in range(LIMITS.heartbeats):
        assert budget.charge(HEARTBEAT, 0.1) is None
    with pytest.raises(ProtocolError) as cut:
        budget.charge(HEARTBEAT, 0.2)
    assert cut.value.code == "heartbeat_flood"


def test_a_relays_budget_grows_with_its_nodes() -> None:
    budget = ControlBudget(LIMITS, interval=1.0, now=0.0)
    budget.advertising(nodes=10, max_control_bytes=1000)
    for _ in range(LIMITS.frames + 10):
        assert budget.charge(MODELS, 0.5) is None
    assert budget.charge(MODELS, 0.5) == 1.0
