"""The gateway settings the proxy, its node picker and its answer buffers read.

One mutable object shared by all three (the gateway and the tests change a field
of it on a running gateway, and every part sees the change). A configuration reload
(SIGHUP) swaps every value at once with :meth:`ProxySettings.replace_with`: the
object the parts hold stays the same, so no part can keep a stale copy, and the swap
has no checkpoint, so no request reads half old, half new values. A request under way
reads each value when it needs it: it may see the new value of one it reads later (the
next attempt's ``first_byte_timeout``), which is what a reload wants.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from tooti.mesh.health import CooldownPolicy


@dataclass
class ProxySettings:
    """The gateway settings the proxy reads."""

    max_attempts: int = 3
    first_byte_timeout: float = 60.0
    """Seconds from OPEN to the first token (streams) or the whole answer (non-stream)."""
    request_timeout: float = 600.0
    queue_timeout: float = 30.0
    max_queue: int = 1024
    cooldown: CooldownPolicy = field(default_factory=CooldownPolicy)
    max_response_bytes: int = 64 * 1024 * 1024
    """Largest non-streamed answer collected (502 above)."""
    max_buffered_bytes: int = 256 * 1024 * 1024
    """Bytes of non-streamed answers held at once, over every request."""
    buffer_wait: float = 10.0
    """Seconds an answer may wait for room under ``max_buffered_bytes`` (then 503)."""
    send_deadline: float = 60.0
    """Seconds the client has to take a whole collected answer (its bytes are held
    until then); a client reading more slowly is disconnected."""
    prompt_token_allowance: int = 4096
    media_token_allowance: int = 16_384
    """See :mod:`tooti.protocol.usage`."""

    def replace_with(self, new: ProxySettings) -> None:
        """Take every value of ``new`` at once (SIGHUP), in this same object."""
        for name in [f.name for f in fields(self)]:
            setattr(self, name, getattr(new, name))
