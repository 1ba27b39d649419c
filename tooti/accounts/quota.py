"""Shared counters of rate limits and budgets, per subject and window, in the table
``quota_windows(subject, window_start, used)``: what every gateway sharing the database
has *claimed* of a limit in one window.

A subject names one limit of one key or account: ``key:<id>:rpm``, ``acct:<id>:tpm``,
``key:<id>:spend:day``, ``key:<id>:spend:month`` (see :func:`subject`). Its suffix says
its window (:data:`PERIODS`): fixed UTC minutes for ``rpm`` / ``tpm``, the UTC day and
the UTC month for budgets. ``window_start`` is the window's first second (Unix time,
an integer), so every gateway agrees on the window from its wall clock alone.

Gateways never count single requests here. A gateway *claims* a chunk of a window's
allowance (:func:`claim`) and serves requests from it in memory
(:mod:`tooti.gateway.limits`). A claim is atomic across gateways without locks: the
row's first claim is ``INSERT … ON CONFLICT DO NOTHING`` (rowcount says who won), later
ones a single conditional ``UPDATE … SET used = used + n WHERE used + n <= limit``
(rowcount says whether it fitted; if another gateway claimed in between, re-read and
try again). So ``used`` never passes ``limit`` through :func:`claim`. Two other writes:

* :func:`charge` adds unconditionally: units already consumed (tokens a request used
  beyond its estimate, a cost beyond its reservation). Only these can take ``used``
  above ``limit``, and then every claim in that window is refused until it ends.
* :func:`release` gives back units a gateway claimed and did not use (an idle chunk, a
  gateway closing), never taking ``used`` below zero.

:func:`purge` deletes windows that ended (kept a little while for reports), by the
period of their subject's suffix.
"""

from __future__ import annotations

import calendar
import time
from typing import Literal

from tooti.accounts.database import Tx

Period = Literal["minute", "day", "month"]
PERIODS: dict[str, Period] = {
    "rpm": "minute", "tpm": "minute", "spend:day": "day", "spend:month": "month",
}
"""A subject's suffix → the length of its windows."""
KEEP: dict[Period, int] = {"minute": 120, "day": 2 * 86_400, "month": 63 * 86_400}
"""How long after it started a window's row is kept (:func:`purge`): two windows."""
CLAIM_ATTEMPTS = 16
"""Conditional UPDATEs tried per claim while other gateways claim the same row (each
failure means another gateway's claim succeeded, so the row is making progress)."""


def subject(kind: str, ident: str, limit: str) -> str:
    """The subject of one limit: ``subject("key", "key_1", "rpm") == "key:key_1:rpm"``
    (``kind``: ``key`` or ``acct``)."""
    return f"{kind}:{ident}:{limit}"


def period_of(subject_name: str) -> Period:
    """The window length of a subject, from its suffix."""
    for suffix, period in PERIODS.items():
        if subject_name.endswith(":" + suffix):
            return period
    raise ValueError(f"unknown quota subject {subject_name!r}")


def window_start(period: Period, wall: float) -> int:
    """The first second (Unix time) of the ``period`` window holding ``wall``."""
    now = int(wall)
    if period == "minute":
        return now - now % 60
    if period == "day":
        return now - now % 86_400
    year, month = time.gmtime(now)[:2]
    return calendar.timegm((year, month, 1, 0, 0, 0))


def window_end(period: Period, start: int) -> int:
    """The first second after the window that starts at ``start``."""
    if period == "minute":
        return start + 60
    if period == "day":
        return start + 86_400
    year, month = time.gmtime(start)[:2]
    year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0))


def used(tx: Tx, subject_name: str, start: int) -> int:
    """What is claimed (and charged) of ``subject_name`` in the window at ``start``."""
    return int(tx.value("SELECT used FROM quota_windows WHERE subject = ? AND window_start = ?",
                        (subject_name, start), default=0))


def claim(tx: Tx, subject_name: str, start: int, limit: int, need: int,
          want: int) -> tuple[int, int]:
    """Claim at least ``need`` and at most ``want`` units of ``limit`` in one window,
    atomically across gateways; ``(granted, used)``: ``granted`` is 0 when fewer than
    ``need`` are left (nothing is claimed then), else as many as are left up to ``want``;
    ``used`` is the row's count after the claim (as this transaction saw it)."""
    want = max(want, need)
    for _ in range(CLAIM_ATTEMPTS):
        row = tx.one("SELECT used FROM quota_windows WHERE subject = ? AND window_start = ?",
                     (subject_name, start))
        if row is None:
            grant = min(want, limit)
            if grant < need:
                return 0, 0
            if tx.run("INSERT INTO quota_windows (subject, window_start, used) VALUES (?, ?, ?) "
                      "ON CONFLICT DO NOTHING", (subject_name, start, grant)) == 1:
                return grant, grant
            continue  # another gateway inserted the row first: read it
        now_used = int(row[0])
        grant = min(want, limit - now_used)
        if grant < need:
            return 0, now_used
        if tx.run("UPDATE quota_windows SET used = used + ? WHERE subject = ? "
                  "AND window_start = ? AND used + ? <= ?",
                  (grant, subject_name, start, grant, limit)) == 1:
            return grant, now_used + grant
    return 0, limit  # the row kept moving under us: as good as full


def charge(tx: Tx, subject_name: str, start: int, amount: int) -> int:
    """Add ``amount`` units already consumed, whatever the limit; the row's count after."""
    if tx.run("UPDATE quota_windows SET used = used + ? WHERE subject = ? AND window_start = ?",
              (amount, subject_name, start)) == 0:
        tx.run("INSERT INTO quota_windows (subject, window_start, used) VALUES (?, ?, ?) "
               "ON CONFLICT DO NOTHING", (subject_name, start, 0))
        tx.run("UPDATE quota_windows SET used = used + ? WHERE subject = ? AND window_start = ?",
               (amount, subject_name, start))
    return used(tx, subject_name, start)


def release(tx: Tx, subject_name: str, start: int, amount: int) -> None:
    """Give back ``amount`` claimed units that were not used (never below zero)."""
    tx.run("UPDATE quota_windows SET used = CASE WHEN used > ? THEN used - ? ELSE 0 END "
           "WHERE subject = ? AND window_start = ?", (amount, amount, subject_name, start))


def purge(tx: Tx, wall: float) -> int:
    """Delete the rows of windows that started more than :data:`KEEP` ago; how many."""
    deleted = 0
    for suffix, period in PERIODS.items():
        deleted += tx.run("DELETE FROM quota_windows WHERE subject LIKE ? AND window_start < ?",
                          ("%:" + suffix, int(wall) - KEEP[period]))
    return deleted
