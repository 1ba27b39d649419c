"""What counts as a number in JSON a peer or a client sent: Python's ``bool`` is an
``int``, so ``true`` must be told apart from ``1`` everywhere a count or a figure is read."""

from __future__ import annotations

from typing import Any, TypeGuard


def is_int(value: Any) -> TypeGuard[int]:
    """An integer, not a boolean."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> TypeGuard[int | float]:
    """An integer or a float, not a boolean (NaN and infinities included)."""
    return isinstance(value, int | float) and not isinstance(value, bool)
