"""The one duration grammar of tooti's accounts tools: ``3600``, ``90m``, ``12h``,
``30d``, ``4w`` (a positive whole number and an optional unit: seconds, minutes,
hours, days, weeks; case and spaces around the unit do not matter).

:func:`parse_duration` is pure (no clock, no I/O): it turns the text into seconds or
raises :class:`ValueError` with the message a person reads (``not a duration: '…' (e.g.
3600, 90m, 12h, 30d)``). Its callers add their own frame: the CLI
(:func:`tooti.cli_accounts.duration`, ``--expires-in``, ``--ttl``) turns the error into
an argparse error; the web console (:mod:`tooti.console.forms`) into a form error, and
reads an empty field or ``never`` as no expiry and caps the value itself.
"""

from __future__ import annotations

import re

UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
"""Seconds per unit (no unit: seconds)."""
EXAMPLES = "3600, 90m, 12h, 30d"
"""Examples the error message names."""
_DURATION = re.compile(r"(\d+)\s*([smhdw]?)")


def parse_duration(text: str) -> int:
    """``"30d"`` → 2592000 seconds; ValueError (a message naming ``text``) for anything
    else, zero and numbers too long to read included."""
    match = _DURATION.fullmatch(text.strip().lower())
    try:
        count = int(match.group(1)) if match is not None else 0
    except ValueError:  # more digits than int() reads
        count = 0
    if match is None or count <= 0:
        raise ValueError(f"not a duration: {text!r} (e.g. {EXAMPLES})")
    return count * UNITS[match.group(2)]
