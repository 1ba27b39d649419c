"""A fast fake OpenAI-compatible upstream for benchmarks.

Pure asyncio with a hand-written HTTP/1.1 parser (``asyncio.Protocol``, no
framework, no third-party dependency); uvloop is used when it is importable.
Every response is precomputed, so a request costs one buffer scan and one
``transport.write``. Keep-alive and pipelining are supported; request bodies
may be sent with ``content-length`` or chunked.

Routes:

``POST .../chat/completions``
    A fixed ``chat.completion`` with ``usage``; with ``"stream": true`` in the
    body, N precomputed SSE events (a role chunk, N-2 content chunks, a
    ``finish_reason: "stop"`` chunk) then ``data: [DONE]``, sent with chunked
    transfer-encoding, one HTTP chunk per SSE event. With
    ``"stream_options": {"include_usage": true}`` a usage chunk with
    ``choices: []`` precedes ``[DONE]``, as OpenAI does.
``GET .../models``
    One model, ``fake-model`` (``--model`` changes it).
``GET /health``
    ``{"status":"ok"}``.

The body is inspected with two byte regexes (``"stream": true`` and
``"include_usage": true``), not parsed as JSON, to keep the upstream far from
being the bottleneck.

Pacing (``--tokens-per-second R``, with ``--ttft S``): a streamed answer is then
sent the way a model decodes, not all at once. The response head is written at
once; after ``S`` seconds the role event and the first token, then one token
every ``1/R`` seconds (deadlines from the start, so a late timer does not slow
the stream down), then the finish event, the usage event (if asked) and
``[DONE]``. Every SSE event is its own HTTP chunk in its own
``transport.write``, so each token reaches the proxy under test as a separate
read and has to be relayed as its own event (this is what ``bench/paced.py``
and ``bench/streams.py`` measure). The events are sent from ``loop.call_at``
callbacks (no task per stream), so a few thousand paced streams cost the
upstream little CPU. Pipelined requests behind a paced stream wait for it to
end; a client that disconnects stops its stream at the next event.

usage: python bench/fake_upstream.py [--host H] [--port P] [--chunks N] [--model M]
                                     [--tokens-per-second R] [--ttft S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections import deque
from typing import Any, Union

Answer = Union[bytes, "Paced"]

STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
INCLUDE_USAGE_RE = re.compile(rb'"include_usage"\s*:\s*true')
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
COMPLETION_ID = "chatcmpl-fake0001"
FINGERPRINT = "fp_fake"
PROMPT_TOKENS = 12


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _response(body: bytes, content_type: bytes = b"application/json",
              status: bytes = b"200 OK") -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: " + content_type
            + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def _close(response: bytes) -> bytes:
    """The same response announcing that the connection closes after it."""
    return response.replace(b"\r\n", b"\r\nconnection: close\r\n", 1)


class Responses:
    """Every response the upstream can send, precomputed once."""

    def __init__(self, model: str, chunks: int, tokens_per_second: float = 0.0,
                 ttft: float = 0.0) -> None:
        """Build the responses for ``model`` with ``chunks`` SSE events per stream;
        ``tokens_per_second`` > 0 paces streamed answers (see the module docstring)."""
        if chunks < 2:
            raise ValueError("a stream needs at least 2 chunks (role and finish)")
        if tokens_per_second < 0 or ttft < 0:
            raise ValueError("pacing needs tokens_per_second >= 0 and ttft >= 0")
        self.tokens_per_second = tokens_per_second
        self.ttft = ttft
        created = int(time.time())
        self.completion = _response(_dumps({
            "id": COMPLETION_ID,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant",
                            "content": "Hello! This is a fixed reply from the fake upstream."},
                "logprobs": None,
                "finish_reason": "stop",
            }],
            "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 12,
                      "total_tokens": PROMPT_TOKENS + 12},
        }))
        self.models = _response(_dumps({"object": "list", "data": [
            {"id": model, "object": "model", "created": created, "owned_by": "fake"}]}))
        self.health = _response(b'{"status":"ok"}')
        self.not_found = _response(b'{"error":{"message":"not found","code":"not_found"}}',
                                   status=b"404 Not Found")
        self.bad_request = _close(_response(b'{"error":{"message":"bad request"}}',
                                            status=b"400 Bad Request"))

        def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return b"data: " + _dumps({
                "id": COMPLETION_ID, "object": "chat.completion.chunk", "created": created,
                "model": model, "system_fingerprint": FINGERPRINT,
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish}],
            }) + b"\n\n"

        events = [event({"role": "assistant", "content": ""})]
        events += [event({"content": f" tok{i}"}) for i in range(chunks - 2)]
        events.append(event({}, finish="stop"))
        usage = b"data: " + _dumps({
            "id": COMPLETION_ID, "object": "chat.completion.chunk", "created": created,
            "model": model, "system_fingerprint": FINGERPRINT, "choices": [],
            "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": chunks - 2,
                      "total_tokens": PROMPT_TOKENS + chunks - 2},
        }) + b"\n\n"
        done = b"data: [DONE]\n\n"
        self.stream = self._chunked([*events, done])
        self.stream_usage = self._chunked([*events, usage, done])
        self.stream_events = len(events)
        # Paced: the same bytes, cut into writes (head, then one HTTP chunk per event,
        # the last one carrying the terminating zero-size chunk).
        frame = [b"%x\r\n%b\r\n" % (len(e), e) for e in [*events, usage, done]]
        frame[-1] += b"0\r\n\r\n"
        tokens = chunks - 2
        pace = 1.0 / tokens_per_second if tokens_per_second > 0 else 0.0
        last = ttft + max(0, tokens - 1) * pace
        # role at TTFT with the first token, token i at TTFT + i/R, the rest after the last
        at = [ttft, *(ttft + i * pace for i in range(tokens)), last, last, last]
        self.paced_stream = Paced(self.STREAM_HEAD, list(zip(
            at[:-1], [*frame[:-2], frame[-1]], strict=True)))
        self.paced_stream_usage = Paced(self.STREAM_HEAD, list(zip(at, frame, strict=True)))

    STREAM_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                   b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")

    @classmethod
    def _chunked(cls, events: list[bytes]) -> bytes:
        body = b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in events)
        return cls.STREAM_HEAD + body + b"0\r\n\r\n"

    def answer(self, method: bytes, target: bytes, body: bytes) -> bytes | Paced:
        """The response to one request (a :class:`Paced` one when pacing a stream)."""
        path = target.split(b"?", 1)[0]
        if method == b"POST" and path.endswith(b"/chat/completions"):
            if STREAM_RE.search(body) is None:
                return self.completion
            usage = INCLUDE_USAGE_RE.search(body) is not None
            if self.tokens_per_second > 0:
                return self.paced_stream_usage if usage else self.paced_stream
            return self.stream_usage if usage else self.stream
        if method == b"GET":
            if path.endswith(b"/models"):
                return self.models
            if path.startswith(b"/health"):
                return self.health
        return self.not_found


class Paced:
    """A streamed answer sent over time: ``head`` at once, then each ``(offset, bytes)``
    write ``offset`` seconds after the request was parsed (offsets never decrease)."""

    __slots__ = ("head", "writes")

    def __init__(self, head: bytes, writes: list[tuple[float, bytes]]) -> None:
        """Remember the head and the timed writes."""
        self.head = head
        self.writes = writes


class _BadRequest(Exception):
    """The bytes on a connection are not HTTP/1.1 we can serve."""


def _header_value(head: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` (lower-case, with leading CRLF) in lower-cased ``head``."""
    start = head.find(name)
    if start < 0:
        return None
    start += len(name)
    end = head.find(b"\r\n", start)
    return head[start:end if end >= 0 else len(head)].strip()


class HTTPProtocol(asyncio.Protocol):
    """One client connection: parses pipelined requests and writes canned responses.

    A paced answer (:class:`Paced`) is sent from ``loop.call_at`` callbacks; answers
    to requests pipelined behind it wait in ``_waiting`` until it has ended."""

    __slots__ = ("_buffer", "_paced", "_responses", "_transport", "_waiting")

    def __init__(self, responses: Responses) -> None:
        """Serve ``responses`` on this connection."""
        self._responses = responses
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._paced = False
        """A paced answer is being sent."""
        self._waiting: deque[tuple[Answer, bool]] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Remember the transport."""
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        """Drop the buffer, the waiting answers and the transport (a paced answer stops)."""
        self._buffer = b""
        self._waiting.clear()
        self._transport = None

    def data_received(self, data: bytes) -> None:
        """Parse every complete request in the buffer and answer it."""
        buffer = self._buffer + data if self._buffer else data
        if self._transport is None:
            return
        answers: list[tuple[Answer, bool]] = []
        try:
            while buffer:
                parsed = self._parse(buffer)
                if parsed is None:
                    break
                response, keep_alive, buffer = parsed
                answers.append((response, keep_alive))
                if not keep_alive:
                    buffer = b""
                    break
        except _BadRequest:
            answers.append((self._responses.bad_request, False))
            buffer = b""
        if len(buffer) > MAX_HEAD_BYTES + MAX_BODY_BYTES:
            answers.append((b"", False))
            buffer = b""
        self._buffer = buffer
        if self._paced:
            self._waiting.extend(answers)
        elif answers:
            self._deliver(answers)

    def _deliver(self, answers: list[tuple[Answer, bool]]) -> None:
        """Write ``answers`` in order; a paced one is started and the rest wait for it."""
        transport = self._transport
        if transport is None:
            return
        out: list[bytes] = []
        for index, (response, keep_alive) in enumerate(answers):
            if isinstance(response, Paced):
                out.append(response.head)
                transport.write(b"".join(out))
                self._waiting.extend(answers[index + 1:])
                self._start_paced(response, keep_alive)
                return
            if not keep_alive:
                out.append(_close(response) if response else b"")
                transport.write(b"".join(out))
                transport.close()
                self._waiting.clear()
                return
            out.append(response)
        if out:
            transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _start_paced(self, paced: Paced, keep_alive: bool) -> None:
        """Send ``paced``'s writes at their times, then what waited behind it."""
        self._paced = True
        loop = asyncio.get_running_loop()
        began = loop.time()
        writes = paced.writes

        def step(index: int) -> None:
            transport = self._transport
            if transport is None or transport.is_closing():
                self._paced = False
                return
            now = loop.time()
            while index < len(writes) and began + writes[index][0] <= now:
                transport.write(writes[index][1])  # one event, one write
                index += 1
            if index < len(writes):
                loop.call_at(began + writes[index][0], step, index)
                return
            self._paced = False
            if not keep_alive:
                transport.close()
                self._waiting.clear()
                return
            waiting = list(self._waiting)
            self._waiting.clear()
            if waiting:
                self._deliver(waiting)

        loop.call_at(began + writes[0][0], step, 0)

    def _parse(self, buffer: bytes) -> tuple[Answer, bool, bytes] | None:
        """Parse one request: (response, keep-alive, rest of buffer), or None if incomplete."""
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD_BYTES:
                raise _BadRequest
            return None
        line_end = buffer.find(b"\r\n")
        try:
            method, target, version = buffer[:line_end].split(b" ")
        except ValueError:
            raise _BadRequest from None
        head = buffer[line_end:end + 2].lower()
        start = end + 4
        body = b""
        length = _header_value(head, b"\r\ncontent-length:")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                raise _BadRequest from None
            if not 0 <= size <= MAX_BODY_BYTES:
                raise _BadRequest
            if len(buffer) < start + size:
                return None
            body, rest = buffer[start:start + size], buffer[start + size:]
        elif b"chunked" in (_header_value(head, b"\r\ntransfer-encoding:") or b""):
            parsed = _dechunk(buffer, start)
            if parsed is None:
                return None
            body, rest = parsed
        else:
            rest = buffer[start:]
        connection = _header_value(head, b"\r\nconnection:") or b""
        if version == b"HTTP/1.1":
            keep_alive = b"close" not in connection
        else:
            keep_alive = b"keep-alive" in connection
        return self._responses.answer(method, target, body), keep_alive, rest


def _dechunk(buffer: bytes, start: int) -> tuple[bytes, bytes] | None:
    """Decode a chunked body starting at ``start``: (body, rest), or None if incomplete."""
    parts: list[bytes] = []
    pos = start
    total = 0
    while True:
        eol = buffer.find(b"\r\n", pos)
        if eol < 0:
            return None
        try:
            size = int(buffer[pos:eol].split(b";", 1)[0], 16)
        except ValueError:
            raise _BadRequest from None
        total += size
        if size < 0 or total > MAX_BODY_BYTES:
            raise _BadRequest
        if size == 0:
            trailer_end = buffer.find(b"\r\n\r\n", eol)  # == eol when there are no trailers
            if trailer_end < 0:
                return None
            return b"".join(parts), buffer[trailer_end + 4:]
        if len(buffer) < eol + 2 + size + 2:
            return None
        parts.append(buffer[eol + 2:eol + 2 + size])
        pos = eol + 2 + size + 2


async def serve(host: str, port: int, responses: Responses) -> None:
    """Serve forever on ``host:port``; prints one ready line to stdout."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HTTPProtocol(responses), host, port,
                                      backlog=2048, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    flavour = type(loop).__module__.split(".")[0]
    pacing = (f" paced={responses.tokens_per_second:g}tok/s ttft={responses.ttft:g}s"
              if responses.tokens_per_second > 0 else "")
    print(f"fake upstream on http://{host}:{bound} chunks={responses.stream_events} "
          f"loop={flavour} stream_bytes={len(responses.stream)}{pacing}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001, help="0 picks a free port")
    parser.add_argument("--chunks", type=int, default=32, help="SSE events per stream")
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--tokens-per-second", type=float, default=0.0,
                        help="pace streamed answers: one token per event at this rate "
                        "(0: send every event at once, the default)")
    parser.add_argument("--ttft", type=float, default=0.0,
                        help="with --tokens-per-second: seconds before the first token")
    args = parser.parse_args(argv)
    responses = Responses(args.model, args.chunks, args.tokens_per_second, args.ttft)
    try:
        import uvloop
    except ImportError:
        runner: Any = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(serve(args.host, args.port, responses))
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
