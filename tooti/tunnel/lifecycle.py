"""What every role does with its tunnel sessions as a whole: the protocol limits and
control-frame budget it gives them from settings, and the one drain."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from tooti.protocol.budget import ControlLimits
from tooti.protocol.connection import Limits
from tooti.settings import TunnelSettings
from tooti.tunnel.session import TunnelSession

log = logging.getLogger("tooti.tunnel")


def limits_from(settings: TunnelSettings) -> Limits:
    """The protocol limits a tunnel end enforces, from settings."""
    return Limits(
        max_frame_bytes=settings.max_frame_bytes,
        max_streams=settings.max_streams,
        initial_window=settings.initial_window,
        max_control_bytes=settings.max_control_bytes,
    )


def control_limits_from(settings: TunnelSettings) -> ControlLimits:
    """The control-frame budget a tunnel end gives its peer, from settings."""
    return ControlLimits(
        frames=settings.control_frames_per_interval,
        bytes=settings.control_bytes_per_interval,
        heartbeats=settings.max_heartbeats_per_interval,
    )


async def drain_sessions(sessions: set[TunnelSession], grace: float,
                         wait_idle: Callable[[], Awaitable[None]], reason: str) -> None:
    """The one drain of every role: tell each session's peer GOAWAY (no new streams),
    wait up to ``grace`` for ``wait_idle`` (the owner's in-flight work), then send what
    is queued (the last streams' ENDs) and close every session."""
    for session in list(sessions):
        with trio.move_on_after(1):
            try:
                await session.goaway("draining", reason)
            except Exception:  # the peer is already gone
                log.debug("goaway to %s failed", session.name)
    with trio.move_on_after(grace):
        await wait_idle()
    for session in list(sessions):
        await session.flush()
        session.abort(reason)
