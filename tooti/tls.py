"""TLS: the server certificate a gateway or relay serves, and what dialers trust.

The listener (:mod:`tooti.mesh.listener`) takes its context from :class:`ServerTLS`
for every connection it accepts, so a reloaded certificate is used by new connections
while existing ones (tunnels included) keep theirs. :meth:`ServerTLS.watch` checks the
files every ``gateway.tls_reload_interval`` seconds; ``tooti run`` also reloads on
SIGHUP. A new certificate that cannot be used (unreadable, not PEM, a key that does not
match, expired) is logged as an error and the current one stays in use.

Dialers verify the peer's certificate and host name against the system's trust store,
plus the CA in ``network.peer_ca`` if one is configured (:func:`client_context`).
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl

import trio
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

log = logging.getLogger("tooti.tls")

HANDSHAKE_TIMEOUT = 10.0
"""Seconds an accepted connection has to complete its TLS handshake."""
ALPN = ["h2", "http/1.1"]
"""Protocols offered to clients: HTTP/2 (served by hypercorn) and HTTP/1.1 (tunnels
and everything else)."""


class TLSError(Exception):
    """A certificate, key or CA file that cannot be used; the message names the file
    and the problem (never any key material)."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(os.path.expanduser(path), "rb") as f:
            return f.read()
    except OSError as exc:
        raise TLSError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def _public(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _no_password() -> bytes:
    raise TLSError("the key is encrypted")  # never prompt on the terminal


def load_certificate(cert: str, key: str) -> tuple[ssl.SSLContext, x509.Certificate]:
    """A server context serving the certificate chain in ``cert`` with the private key in
    ``key`` (both PEM), and the certificate itself. Raises :class:`TLSError`."""
    try:
        chain = x509.load_pem_x509_certificates(_read(cert, "TLS certificate"))
    except ValueError:
        raise TLSError(f"no PEM certificate in {cert}") from None
    try:
        private = serialization.load_pem_private_key(_read(key, "TLS key"), password=None)
    except TypeError:
        raise TLSError(f"the TLS key {key} is encrypted: give it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSError(f"no usable PEM private key in {key}") from None
    leaf = chain[0]
    if _public(private.public_key()) != _public(leaf.public_key()):
        raise TLSError(f"the key in {key} does not belong to the certificate in {cert}")
    if leaf.not_valid_after_utc <= datetime.datetime.now(datetime.UTC):
        raise TLSError(f"the certificate in {cert} expired on "
                       f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # no client certificates asked for
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(ALPN)
    try:
        context.load_cert_chain(os.path.expanduser(cert), os.path.expanduser(key),
                                password=_no_password)
    except (OSError, ValueError) as exc:  # the files changed since they were read
        raise TLSError(f"cannot load {cert} with {key}: {exc}") from None
    return context, leaf


def describe(cert: x509.Certificate) -> str:
    """Serial number, subject and expiry of a certificate, for the log."""
    return (f"serial {cert.serial_number:x}, {cert.subject.rfc4514_string()}, valid until "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


class ServerTLS:
    """The server context of a listener: loaded at start (a :class:`TLSError` then is
    fatal), reloaded on :meth:`reload` and by :meth:`watch` when the files change."""

    def __init__(self, cert: str, key: str, poll_interval: float = 5.0) -> None:
        self.cert = cert
        self.key = key
        self.poll_interval = poll_interval
        self._seen = self._signature()
        self.context, leaf = load_certificate(cert, key)
        log.info("TLS certificate %s: %s", cert, describe(leaf))
        self._reloaded = trio.Event()

    def _signature(self) -> list[tuple[int, int, int, int] | None]:
        """What identifies the files' current contents (a rename over them, as certificate
        tools do, changes the inode; a rewrite in place, the mtime or size)."""
        out: list[tuple[int, int, int, int] | None] = []
        for path in (self.cert, self.key):
            try:
                st = os.stat(os.path.expanduser(path))
            except OSError:
                out.append(None)
            else:
                out.append((st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev))
        return out

    def current(self) -> ssl.SSLContext:
        """The context new connections get now."""
        return self.context

    def reload(self) -> bool:
        """Load the files again: True if the new certificate now serves new connections;
        False if it cannot be used (logged; the current one stays)."""
        self._seen = self._signature()
        try:
            context, leaf = load_certificate(self.cert, self.key)
        except TLSError as exc:
            log.error("TLS certificate not reloaded, the current one stays in use: %s", exc)
            ok = False
        else:
            self.context = context
            log.info("TLS certificate reloaded: %s", describe(leaf))
            ok = True
        self._reloaded.set()
        self._reloaded = trio.Event()
        return ok

    async def wait_reload(self) -> None:
        """Wait for the next reload attempt (successful or not) to finish."""
        await self._reloaded.wait()

    async def watch(self) -> None:
        """Check the files every ``poll_interval`` seconds and reload when they changed;
        runs until cancelled and never raises."""
        while True:
            await trio.sleep(self.poll_interval)
            try:
                if self._signature() != self._seen:
                    self.reload()
            except Exception:  # a bug here must not take the listener down
                log.exception("checking the TLS certificate files failed")


def client_context(peer_ca: str = "") -> ssl.SSLContext:
    """The context a dialer checks ``wss://`` peers with: the system's trust store, plus
    the CA certificates in the PEM file ``peer_ca`` if given; the host name is checked.
    Raises :class:`TLSError`."""
    context = ssl.create_default_context()
    if peer_ca:
        try:
            context.load_verify_locations(cadata=_read(peer_ca, "peer CA file").decode(
                "ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise TLSError(f"no usable PEM CA certificate in {peer_ca}: {exc}") from None
    return context


def handshake_problem(exc: BaseException) -> str:
    """What went wrong in a failed client handshake, in words (the certificate check's
    verdict when that was it)."""
    cause = exc.__cause__ or exc.__context__ or exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        reason = cause.reason or str(cause)
        if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST",
                      "PACKET_LENGTH_TOO_LONG"):
            return f"{reason}: the peer does not speak TLS here (a ws:// URL?)"
        return reason
    return str(cause) or type(cause).__name__
