"""The one clock of the project.

:func:`now` is trio's clock: monotonic seconds, and in a test the test's own clock, so
trio's autojump clock moves every deadline, cooldown, backoff and rate measured with it.
Use it for every duration. :func:`wall` is the wall clock, only for timestamps shown to
people or stored (``created``, ``ts``, ledger rows). Both need a running trio loop only
in the sense that :func:`now` does; :func:`wall` works anywhere.
"""

from __future__ import annotations

import time

import trio

now = trio.current_time
"""Seconds on trio's clock (call inside ``trio.run``). An alias, not a wrapper: it is
read on every request and every frame, and costs no extra call."""


wall = time.time
"""Seconds since the epoch, for timestamps (an alias, like :data:`now`)."""
