"""The container image's health check: ``python -m tooti.healthcheck`` asks this
process's ``/readyz`` on 127.0.0.1 and exits 0 if it answers 200, 1 otherwise.

It finds the port and the scheme the way ``tooti run`` does, from the flags of the
container's main process (``--listen``, ``--tls-cert``: ``/proc/1/cmdline``, the
entry point's process) and else ``TOOTI_LISTEN`` and ``TOOTI_TLS_CERT``: a gateway
given a certificate serves only https, so the probe speaks https to it, without
checking the certificate (it was issued for the gateway's public name, and the probe
asks 127.0.0.1 inside the container; nothing secret is sent). A listen address set
only in a configuration file (``TOOTI_CONFIG``) is not seen: set it with
``TOOTI_LISTEN`` or ``--listen`` in the image. Standard library only, and nothing of
tooti imported, so a probe costs one small Python start.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

DEFAULT_LISTEN = "0.0.0.0:8080"
TIMEOUT = 4.0
"""Seconds one probe may take (the image's HEALTHCHECK allows 5)."""


def flag(argv: Sequence[str], name: str) -> str | None:
    """The value of the last ``name VALUE`` or ``name=VALUE`` in ``argv``, if any."""
    found = None
    for index, word in enumerate(argv):
        if word == name and index + 1 < len(argv):
            found = argv[index + 1]
        elif word.startswith(name + "="):
            found = word[len(name) + 1:]
    return found


def readyz_url(argv: Sequence[str], environ: Mapping[str, str]) -> str:
    """The ``/readyz`` URL of the process started with ``argv`` in ``environ`` (flags
    win over the environment, as in ``tooti run``)."""
    listen = flag(argv, "--listen") or environ.get("TOOTI_LISTEN") or DEFAULT_LISTEN
    tls = flag(argv, "--tls-cert") or environ.get("TOOTI_TLS_CERT")
    port = listen.rpartition(":")[2] or "8080"
    return f"{'https' if tls else 'http'}://127.0.0.1:{port}/readyz"


def main_process_argv(path: str = "/proc/1/cmdline") -> list[str]:
    """The arguments of the container's main process (empty if unreadable)."""
    try:
        with open(path, "rb") as cmdline:
            return [a.decode(errors="replace") for a in cmdline.read().split(b"\0") if a]
    except OSError:
        return []


def probe(url: str) -> bool:
    """True if ``url`` answers 200 within :data:`TIMEOUT`."""
    context = None
    if url.startswith("https:"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT, context=context) as answer:
            return bool(answer.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def main() -> int:
    argv = main_process_argv()
    if not any(Path(word).name == "tooti" for word in argv[:2]):
        argv = []  # not the image's entry point (run by hand elsewhere): its flags are not ours
    return 0 if probe(readyz_url(argv, os.environ)) else 1


if __name__ == "__main__":
    sys.exit(main())
