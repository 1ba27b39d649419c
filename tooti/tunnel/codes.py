"""The codes a tunnel end closes with or names in GOAWAY, and how long it waits for
the peer to acknowledge a close."""

from __future__ import annotations

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY = 1008
CLOSE_TIMEOUT = 0.25
"""Seconds to wait for the peer to acknowledge a WebSocket close."""

REPLACED = "replaced"
"""GOAWAY code sent to a session superseded by a newer one with the same peer id."""
