"""``spend-cap``: an example tooti billing plugin — monthly token caps per API key.

Every settled request adds its prompt + completion tokens to its key's total
for the calendar month (UTC) the request started in. Once a key's total has
reached its cap, :meth:`SpendCap.authorize` refuses the key's requests with
HTTP 429, ``code = "spend_cap_reached"``, ``type = "insufficient_quota"``
and a ``retry-after`` header pointing at the start of next month.

Usage is kept in an append-only JSON-lines file, one line per settled request
id; the totals are rebuilt from that file at start-up, so a restart keeps
counting where it left off. ``settle`` only updates memory and queues the
line; :meth:`SpendCap.run` appends everything queued in one batch per wake-up
from a worker thread (``trio.to_thread``), so the request path never waits on
the disk. Refunds (requests no node served)
write nothing: nothing was consumed, and the built-in ``usage-ledger``
already records them.

Options (the ``[billing.options]`` table, shared by every billing plugin,
hence the prefix):

``spend_cap_tokens``
    Tokens per key per calendar month (default 1 000 000); 0 = no cap.
``spend_cap_keys``
    Per-key overrides, ``{key_id = cap}`` (key ids as ``tooti usage`` shows
    them, e.g. ``key-1a2b…`` or ``anonymous``); 0 = no cap for that key.
``spend_cap_path``
    The JSON-lines file (default ``spend-cap.jsonl``); a relative path is
    taken relative to the data directory.
``spend_cap_fsync``
    ``fsync`` after each batch (default false).

The cap is checked before a request starts, not during it: a request admitted
just under the cap is served in full, and concurrent requests of one key may
overshoot the cap by what they consume. One file belongs to one gateway
process.
"""

from __future__ import annotations

import calendar
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from tooti.billing.base import Billing, BillingSetup, RequestContext, Usage
from tooti.errors import APIError
from tooti.hookspecs import hookimpl

__all__ = ["DEFAULT_CAP", "FILENAME", "PLUGIN_NAME", "SpendCap", "month_of", "tooti_billing"]

log = logging.getLogger("tooti.billing.spend_cap")

PLUGIN_NAME = "spend-cap"
FILENAME = "spend-cap.jsonl"
DEFAULT_CAP = 1_000_000
QUEUE = 10_000
"""Pending lines at which ``settle`` writes itself instead of leaving it to ``run``."""


def month_of(timestamp: float) -> str:
    """The calendar month (UTC) of a Unix timestamp, as ``YYYY-MM``."""
    return time.strftime("%Y-%m", time.gmtime(timestamp))


def seconds_to_next_month(timestamp: float) -> int:
    """Whole seconds from ``timestamp`` until the next calendar month starts (UTC)."""
    now = time.gmtime(timestamp)
    year, month = (now.tm_year + 1, 1) if now.tm_mon == 12 else (now.tm_year, now.tm_mon + 1)
    start = calendar.timegm((year, month, 1, 0, 0, 0, 0, 0, 0))
    return max(1, int(start - timestamp))


def _cap(value: Any, name: str) -> int | None:
    """Validate a cap option; None means unlimited."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"billing.options.{name} must be a non-negative integer (0 = no cap)")
    return value or None


class SpendCap:
    """Monthly token caps per key over an append-only JSON-lines log."""

    def __init__(self, setup: BillingSetup) -> None:
        """Read the options and rebuild the month totals from the log (at start-up)."""
        options = setup.options
        self.default_cap = _cap(options.get("spend_cap_tokens", DEFAULT_CAP), "spend_cap_tokens")
        key_caps = options.get("spend_cap_keys") or {}
        if not isinstance(key_caps, Mapping):
            raise ValueError("billing.options.spend_cap_keys must be a table of key id = cap")
        self.key_caps = {str(k): _cap(v, f"spend_cap_keys.{k}") for k, v in key_caps.items()}
        path = Path(os.path.expanduser(str(options.get("spend_cap_path") or FILENAME)))
        self.path = path if path.is_absolute() else setup.data_dir / path
        self.fsync = bool(options.get("spend_cap_fsync", False))
        self.totals: dict[tuple[str, str], int] = {}
        """(key id, ``YYYY-MM``) → tokens settled."""
        self.seen: set[str] = set()
        """Request ids already settled (so settling twice counts once)."""
        self._torn_tail = False
        self._pending: list[str] = []
        """Log lines settled but not yet handed to a write."""
        self._wake = trio.Event()
        self._lock = trio.Lock()
        """Held by whoever is writing; a write takes every pending line at once."""
        self._load()

    # ------------------------------------------------------------ state

    def _load(self) -> None:
        """Rebuild totals and seen ids from the log; skip (and report) unreadable lines."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        # A crash mid-write can leave a last line without its newline: the next
        # batch starts on a fresh line so it does not glue onto the fragment.
        self._torn_tail = bool(data) and not data.endswith(b"\n")
        for number, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                request_id, key_id = record["request_id"], record["key_id"]
                month, tokens = record["month"], record["tokens"]
                if not (isinstance(request_id, str) and isinstance(key_id, str)
                        and isinstance(month, str) and isinstance(tokens, int)):
                    raise TypeError("wrong field types")
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("%s:%d: skipping unreadable line (%s)", self.path, number, exc)
                continue
            self._count(request_id, key_id, month, tokens)

    def _count(self, request_id: str, key_id: str, month: str, tokens: int) -> bool:
        if request_id in self.seen:
            return False
        self.seen.add(request_id)
        self.totals[key_id, month] = self.totals.get((key_id, month), 0) + tokens
        return True

    def cap_for(self, key_id: str) -> int | None:
        """The monthly cap of ``key_id`` in tokens (None = unlimited)."""
        return self.key_caps[key_id] if key_id in self.key_caps else self.default_cap

    def used(self, key_id: str, month: str) -> int:
        """Tokens ``key_id`` has settled in ``month`` (``YYYY-MM``)."""
        return self.totals.get((key_id, month), 0)

    # ------------------------------------------------------------ Billing

    async def run(self) -> None:
        """Append pending lines to the log, a batch per wake-up, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await self.flush()

    async def authorize(self, ctx: RequestContext) -> None:
        """Refuse with 429 ``spend_cap_reached`` once the key's month total reached its cap."""
        cap = self.cap_for(ctx.key_id)
        if cap is None:
            return
        month = month_of(ctx.started)
        used = self.used(ctx.key_id, month)
        if used >= cap:
            raise APIError(
                429,
                f"monthly token cap reached for this API key: {used} of {cap} tokens used "
                f"in {month} (UTC); it resets when the next month starts",
                code="spend_cap_reached", type="insufficient_quota",
                headers={"retry-after": str(seconds_to_next_month(time.time()))},
            )

    async def settle(self, ctx: RequestContext, usage: Usage) -> None:
        """Count the request's tokens and queue its log line (once per request id)."""
        month = month_of(ctx.started)
        tokens = usage.prompt_tokens + usage.completion_tokens
        if not self._count(ctx.request_id, ctx.key_id, month, tokens):
            return
        record = {
            "request_id": ctx.request_id, "ts": round(time.time(), 3), "month": month,
            "key_id": ctx.key_id, "model": usage.model, "node_id": usage.node_id,
            "endpoint": ctx.endpoint, "status": usage.status,
            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "tokens": tokens, "estimated": usage.estimated,
        }
        self._pending.append(json.dumps(record, separators=(",", ":")) + "\n")
        self._wake.set()
        if len(self._pending) >= QUEUE:  # the writer is not keeping up: wait for the disk
            await self.flush()

    async def refund(self, ctx: RequestContext, reason: str) -> None:
        """Nothing was consumed and nothing was counted: write nothing."""
        return None

    async def flush(self) -> None:
        """Return once every line settled so far is written (used by run, close and tests).

        A line is either still pending — then this call writes it — or taken by a
        write in progress, which holds the lock this call waits for.
        """
        async with self._lock:
            lines, self._pending = self._pending, []
            if lines:
                # Shielded: once taken from _pending, the lines must reach the file.
                with trio.CancelScope(shield=True):
                    await self._write(lines)

    async def close(self) -> None:
        """Flush the queue."""
        with trio.CancelScope(shield=True):
            await self.flush()

    # ------------------------------------------------------------ disk

    async def _write(self, lines: list[str]) -> None:
        try:
            await trio.to_thread.run_sync(self._write_sync, lines)
        except OSError as exc:
            # The totals in memory stay right; only the log (and so the totals
            # after a restart) misses these lines.
            log.error("spend-cap: could not append %d line(s) to %s: %s",
                      len(lines), self.path, exc)

    def _write_sync(self, lines: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(lines)
        if self._torn_tail:
            text = "\n" + text
        with self.path.open("a", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            if self.fsync:
                os.fsync(file.fileno())
        self._torn_tail = False


@hookimpl
def tooti_billing() -> Mapping[str, Callable[[BillingSetup], Billing]]:
    """Provide the ``spend-cap`` billing plugin."""
    return {PLUGIN_NAME: SpendCap}
