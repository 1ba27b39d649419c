"""Just enough of ``multipart/form-data`` to route and check a streamed upload, sans-I/O.

The gateway never parses an upload whole: it reads the form's first bytes until the
``model`` field is complete and passes every byte on untouched, while
:class:`FormFields` follows the whole form for a second ``model`` field. A
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


class DuplicateField(ValueError):
    """A form names the field :class:`FormFields` watches more than once."""


class PartHeadTooLarge(ValueError):
    """A part's head is longer than :class:`FormFields` keeps."""


class FormFields:
    """Follows a streamed form and reads its plain field ``name`` (``model``), sans-I/O:
    fed the form's bytes piece by piece, it scans each byte once (a search resumes where
    the last one stopped) and keeps no more than a part head, the field's value (at most
    ``max_value`` bytes) and a delimiter's length of anything else.

    A second part named ``name`` (plain or file, before or after the file) raises
    :class:`DuplicateField`: servers disagree on which one counts (FastAPI/Starlette keep
    the last, the gateway read the first), so a form carrying two could be routed and
    priced by one and served by the other.

    ``value`` is the field's text once its part is complete; ``span`` its byte offsets
    in the form (to rewrite it in a read-ahead); ``closed`` that the form's closing
    delimiter went by; ``fed`` how many bytes were fed."""

    def __init__(self, boundary: bytes, name: str = "model", max_head: int = 16 * 1024,
                 max_value: int = 1024) -> None:
        self.delimiter = b"--" + boundary
        self.closing = b"\r\n" + self.delimiter
        self.wanted = name.encode()
        self.max_head, self.max_value = max_head, max_value
        self.value: str | None = None
        self.span: tuple[int, int] | None = None
        self.closed = False
        self.fed = 0
        self.seen = 0
        """Parts named ``name`` so far."""
        self._buf = bytearray()
        self._base = 0  # offset in the form of _buf[0]
        self._scan = 0  # where in _buf the current search resumes
        self._state = "preamble"  # "head", "body", "field", "after" (delimiter read)
        self._value = bytearray()

    def feed(self, chunk: bytes) -> None:
        """Take the form's next bytes (raises :class:`DuplicateField`,
        :class:`PartHeadTooLarge`)."""
        self.fed += len(chunk)
        if self.closed:
            return
        self._buf += chunk
        while self._step():
            pass

    def _drop(self, count: int) -> None:
        del self._buf[:count]
        self._base += count
        self._scan = max(0, self._scan - count)

    def _step(self) -> bool:
        """Advance over what is buffered; False when more bytes are needed."""
        buf = self._buf
        if self._state == "preamble":
            at = buf.find(self.delimiter, self._scan)
            if at < 0:
                keep = len(self.delimiter) - 1
                self._drop(max(0, len(buf) - keep))
                return False
            self._drop(at + len(self.delimiter))
            self._state = "after"
            return True
        if self._state == "after":
            if len(buf) < 2:
                return False
            if buf[:2] == b"--":
                self.closed = True
                self._buf.clear()
                return False
            self._state, self._scan = "head", 0
            return True
        if self._state == "head":
            at = buf.find(b"\r\n\r\n", self._scan)
            if at < 0:
                if len(buf) > self.max_head:
                    raise PartHeadTooLarge(f"a form part's head is over {self.max_head} bytes")
                self._scan = max(0, len(buf) - 3)
                return False
            head = bytes(buf[:at])
            self._drop(at + 4)
            found = _NAME.search(head)
            if found is not None and found.group(1) == self.wanted:
                self.seen += 1
                if self.seen > 1:
                    raise DuplicateField(f"the form has more than one '{self.wanted.decode()}'"
                                         " field")
                if not _FILENAME.search(head):
                    self._state = "field"
                    self._value.clear()
                    self.span = (self._base, self._base)
                    return True
            self._state = "body"
            return True
        # "body" or "field": up to the next delimiter
        at = buf.find(self.closing, self._scan)
        end = at if at >= 0 else max(0, len(buf) - len(self.closing) + 1)
        if self._state == "field" and len(self._value) <= self.max_value:
            self._value += buf[:end][: self.max_value + 1 - len(self._value)]
        if at < 0:
            self._drop(end)
            return False
        if self._state == "field":
            assert self.span is not None
            self.span = (self.span[0], self._base + at)
            self.value = self._value.decode("utf-8", "replace").strip()
        self._drop(at + len(self.closing))
        self._state = "after"
        return True


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
