"""How a ``tooti run`` process logs: one handler on the root logger, on stderr, in the
chosen format (``log_format``, ``--log-format``, ``TOOTI_LOG_FORMAT``).

* ``text``: ``2026-12-05 19:40:58,123 INFO tooti.gateway: message`` (one line per
  record; a traceback follows on its own lines).
* ``json``: one JSON object per line, for log shippers (Loki, Vector, Datadog, ...):
  ``ts`` (ISO 8601, UTC, milliseconds), ``level`` (``debug`` … ``critical``),
  ``logger``, ``msg``, and ``exc`` (the formatted traceback) when the record carries
  one. A message object with a ``log_fields()`` method (the access log's records,
  :mod:`tooti.gateway.access_log`) adds its fields as typed JSON values (numbers as
  numbers, ``null`` when unknown); its ``msg`` is a short summary, the text form being
  ``str()`` of the object. Newlines inside a message are escaped, so one record is
  always one line.

Every library's records (hypercorn's ``hypercorn.error``, httpx, ...) reach the same
handler through the root logger, so one process writes one format. The access log
(``tooti.access``) is shown at INFO whatever ``log_level`` says when
``gateway.access_log`` is on (as a web server's access log is separate from its error
log's level), and not at all when it is off.

Nothing here knows the roles: the gateway writes its access records on ``tooti.access``
and this module only formats them.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import msgspec

ACCESS_LOGGER = "tooti.access"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_LIBRARIES = ("hypercorn", "httpx", "httpcore", "trio-websocket")
"""Libraries whose INFO chatter is hidden (their warnings and errors still show)."""

_encoder = msgspec.json.Encoder(enc_hook=str)


def iso_utc(created: float) -> str:
    """``created`` (seconds since the epoch) as ISO 8601 UTC with milliseconds:
    ``2026-12-05T19:40:58.123Z``."""
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": iso_utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record.msg, "log_fields", None)
        if callable(fields) and not record.args:
            entry.update(fields())
        else:
            entry["msg"] = record.getMessage()
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return _encoder.encode(entry).decode()


def formatter_for(log_format: str) -> logging.Formatter:
    """The formatter of ``log_format`` (``text`` or ``json``; the settings checked it)."""
    if log_format == "json":
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT)


def setup_logging(level: str, log_format: str = "text", *, access_log: bool = True) -> None:
    """Configure the root logger once: a handler on stderr with ``log_format``'s
    formatter at ``level``; libraries' INFO hidden; the access log on or off. Like
    :func:`logging.basicConfig`, it adds no handler (nor changes the level) when the
    root logger already has one (a test harness's)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter_for(log_format))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        handlers=[handler])
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO if access_log
                                              else logging.CRITICAL + 1)
