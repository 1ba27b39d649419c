"""Just enough of ``multipart/form-data`` to route and check a streamed upload, sans-I/O.

The gateway never parses an upload whole: it reads the form's first bytes until the
``model`` field is complete (:func:`find_field`) and passes every byte on untouched. A
test backend hashes the file part as it streams past (:class:`FilePart`) without keeping
it. Neither decodes transfer encodings (browsers and SDKs send none).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

_BOUNDARY = re.compile(r'boundary\s*=\s*(?:"([^"]{1,70})"|([^\s;"]{1,70}))', re.IGNORECASE)
_NAME = re.compile(rb'\bname\s*=\s*"([^"]*)"', re.IGNORECASE)
_FILENAME = re.compile(rb'\bfilename\s*=', re.IGNORECASE)


def boundary_of(content_type: str) -> bytes | None:
    """The ``boundary`` of a ``multipart/form-data`` content type (None if it is not one
    or names none)."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "multipart/form-data":
        return None
    found = _BOUNDARY.search(content_type)
    if found is None:
        return None
    return (found.group(1) or found.group(2)).encode("latin-1")


MORE = object()
"""What :func:`find_field` returns while the field may still come in later bytes."""


def find_field(data: bytes, boundary: bytes, name: str, complete: bool
               ) -> str | object | None:
    """The value of the first plain (not file) field ``name`` in the form's first bytes
    ``data``: the text, :data:`MORE` if it may still come (``complete`` is False: more
    bytes follow), or None if the form (or ``data``, when ``complete``) has none."""
    delimiter = b"--" + boundary
    wanted = name.encode()
    start = data.find(delimiter)
    if start < 0:
        return None if complete else MORE
    position = start + len(delimiter)
    while True:
        if data[position:position + 2] == b"--":
            return None  # the closing delimiter
        head_end = data.find(b"\r\n\r\n", position)
        if head_end < 0:
            return None if complete else MORE
        head = data[position:head_end]
        body_start = head_end + 4
        body_end = data.find(b"\r\n" + delimiter, body_start)
        found = _NAME.search(head)
        if found is not None and found.group(1) == wanted and not _FILENAME.search(head):
            if body_end < 0:
                return None if complete else MORE
            return data[body_start:body_end].decode("utf-8", "replace").strip()
        if body_end < 0:
            return None if complete else MORE
        position = body_end + 2 + len(delimiter)


@dataclass
class FilePart:
    """Follows a streamed form and measures its first file part: its size and SHA-256,
    keeping no more than a delimiter's length of it at a time."""

    boundary: bytes
    size: int = 0
    filename: str = ""
    done: bool = False
    _digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    _held: bytes = b""
    _in_file: bool = False

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def feed(self, chunk: bytes) -> None:
        """Take the form's next bytes."""
        if self.done:
            return
        data = self._held + chunk
        if not self._in_file:
            head_end = data.find(b"\r\n\r\n")
            while head_end >= 0:
                head_start = data.rfind(b"--" + self.boundary, 0, head_end)
                head = data[max(head_start, 0):head_end]
                name = re.search(rb'filename\s*=\s*"([^"]*)"', head, re.IGNORECASE)
                data = data[head_end + 4:]
                if name is not None:
                    self.filename = name.group(1).decode("utf-8", "replace")
                    self._in_file = True
                    break
                head_end = data.find(b"\r\n\r\n")
            if not self._in_file:
                self._held = data[-(len(self.boundary) + 256):]
                return
        closing = b"\r\n--" + self.boundary
        end = data.find(closing)
        if end >= 0:
            self._take(data[:end])
            self.done, self._held = True, b""
            return
        keep = len(closing) - 1
        self._take(data[:-keep] if len(data) > keep else b"")
        self._held = data[-keep:] if len(data) > keep else data

    def _take(self, piece: bytes) -> None:
        self.size += len(piece)
        self._digest.update(piece)
