"""The registry's parts that decide who may join: bans and relay strikes
(:class:`~tooti.mesh.bans.Bans`, on trio's clock) and identity binding
(:class:`~tooti.mesh.identity_bindings.IdentityBindings`)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tooti.identity import Identity
from tooti.mesh import bans as bans_module
from tooti.mesh.bans import Bans
from tooti.mesh.identity_bindings import IdentityBindings
from tooti.protocol.errors import ProtocolError


async def test_a_ban_lasts_its_seconds_on_trios_clock(
        autojump_clock: trio.testing.MockClock) -> None:
    bans = Bans(60.0)
    bans.ban("gpu-7", "usage out of bounds")
    refusal = bans.refusal("gpu-7")
    assert refusal is not None and "gpu-7 is refused for 60 more seconds" in refusal
    assert refusal.endswith("usage out of bounds")
    await trio.sleep(59)
    assert bans.refusal("gpu-7") is not None
    await trio.sleep(1)
    assert bans.refusal("gpu-7") is None and not bans.entries  # an ended ban is dropped


async def test_a_route_ban_refuses_that_route_only() -> None:
    bans = Bans(60.0)
    bans.ban(("gpu-7", "relay-1"), "bad END")
    refusal = bans.refusal("gpu-7", via="relay-1")
    assert refusal is not None and refusal.startswith("gpu-7 via relay-1 is refused")
    assert bans.refusal("gpu-7") is None
    assert bans.refusal("gpu-7", via="relay-2") is None


async def test_the_oldest_bans_go_first_past_the_limit(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    monkeypatch.setattr(bans_module, "MAX_BANS", 3)
    bans = Bans(60.0)
    for n in range(5):
        bans.ban(f"peer-{n}", "flood")
    assert list(bans.entries) == ["peer-2", "peer-3", "peer-4"]
    bans.ban("peer-2", "again")  # banned again: now the newest
    assert list(bans.entries) == ["peer-3", "peer-4", "peer-2"]


async def test_strikes_count_different_nodes_within_the_window(
        autojump_clock: trio.testing.MockClock) -> None:
    assert Bans(relay_strikes=0).strike("relay-1", "a") == 0  # off by default
    bans = Bans(relay_strikes=3, relay_strike_seconds=600.0)
    assert bans.strike("relay-1", "a") == 1
    assert bans.strike("relay-1", "a") == 1  # the same node counts once
    assert bans.strike("relay-1", "b") == 2 and not bans.struck_out(2)
    await trio.sleep(601)  # a and b are forgotten
    assert bans.strike("relay-1", "c") == 1
    assert bans.strike("relay-1", "d") == 2
    assert bans.strike("relay-1", "e") == 3 and bans.struck_out(3)
    bans.forget_strikes("relay-1")
    assert bans.strike("relay-1", "f") == 1


def test_a_chosen_name_binds_to_its_first_key_and_derived_ids_to_their_own() -> None:
    owner, other = Identity.generate(), Identity.generate()
    bindings = IdentityBindings(limit=1)
    bindings.bind("gpu-7", owner.public_key)
    bindings.bind("gpu-7", owner.public_key)  # the same key again: fine
    assert bindings.bound == {"gpu-7": owner.public_key}
    with pytest.raises(ProtocolError) as mismatch:
        bindings.bind("gpu-7", other.public_key)
    assert mismatch.value.code == "identity_mismatch"
    with pytest.raises(ProtocolError) as full:
        bindings.bind("gpu-8", other.public_key)
    assert full.value.code == "identity_limit"
    bindings.bind(other.id, other.public_key)  # derived: no binding, no limit
    with pytest.raises(ProtocolError) as stolen:
        bindings.bind(owner.id, other.public_key)
    assert stolen.value.code == "identity_mismatch"
    assert bindings.bound == {"gpu-7": owner.public_key}
