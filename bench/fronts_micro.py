"""In-process cost of each translated front's stream, per stream and per chunk.

Feeds the SSE bytes of a chat-completions stream (as the simulated backend writes them:
a role chunk, one content chunk per token, the finish chunk, the usage chunk, ``[DONE]``)
through :class:`~tooti.gateway.translated_send.TranslatedSend` with each front, one body
message per event, and reports the median microseconds per stream and per chunk. No
sockets, no gateway: what the fronts' per-chunk work costs, to profile and compare.

Run from the repository root with the project's venv::

    python bench/fronts_micro.py [--tokens 16 256] [--repeat 300] [--profile anthropic]
    python bench/fronts_micro.py --parts [--tokens 16]

``--parts``: each translator alone (no parse, no send wrapper, no SSE decoding), its
methods called in turn, median µs of ``start``, the first token (which opens the output),
each later token, and the closing (the finish and usage chunks, ``finish``).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import trio

from tooti.fronts.anthropic_stream import FRONT as ANTHROPIC
from tooti.fronts.base import Front
from tooti.fronts.ollama_answers import ollama_front
from tooti.fronts.responses_stream import FRONT as RESPONSES
from tooti.gateway.translated_send import TranslatedSend

_encode = msgspec.json.encode
MESSAGE = [{"role": "user", "content": "hello there, how are you today?"}]


def events(tokens: int) -> list[bytes]:
    """The node's SSE events of a ``tokens``-token streamed answer with usage."""
    base = {"id": "chatcmpl-0123456789abcdef", "object": "chat.completion.chunk",
            "created": 1760000000, "model": "tooti-sim", "system_fingerprint": "fp_tooti",
            "usage": None}

    def event(choice: dict[str, Any]) -> bytes:
        return b"data: " + _encode({**base, "choices": [choice]}) + b"\n\n"

    out = [event({"index": 0, "delta": {"role": "assistant", "content": "Hello"},
                  "logprobs": None, "finish_reason": None})]
    out += [event({"index": 0, "delta": {"content": f" word{i}"}, "logprobs": None,
                   "finish_reason": None}) for i in range(tokens - 1)]
    out.append(event({"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}))
    out.append(b"data: " + _encode({**base, "choices": [], "usage": {
        "prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens}})
        + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


def fronts() -> dict[str, tuple[Front, bytes]]:
    """Front name → (front, the client's streamed request body)."""
    return {
        "anthropic": (ANTHROPIC, _encode({"model": "tooti-sim", "max_tokens": 16,
                                          "messages": MESSAGE, "stream": True})),
        "responses": (RESPONSES, _encode({"model": "tooti-sim", "input": MESSAGE[0]["content"],
                                          "stream": True})),
        "ollama": (ollama_front("chat", live=["tooti-sim"]),
                   _encode({"model": "tooti-sim", "messages": MESSAGE})),
    }


async def _discard(message: dict[str, Any]) -> None:
    pass


async def drive(front: Front, body: bytes, stream: list[bytes]) -> None:
    """One stream through a fresh TranslatedSend."""
    send = TranslatedSend(_discard, front, front.parse(body))
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    for event in stream[:-1]:
        await send({"type": "http.response.body", "body": event, "more_body": True})
    await send({"type": "http.response.body", "body": stream[-1], "more_body": False})


def parts(tokens: int, repeat: int) -> None:
    """The translators' fixed and per-token costs (see ``--parts``)."""
    finish_chunk = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    usage_chunk = {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": tokens,
                                            "total_tokens": 12 + tokens}}
    clock = time.perf_counter_ns
    print(f"{'µs, ' + str(tokens) + ' tokens':<22}{'start':>8}{'first':>8}{'token':>8}"
          f"{'closing':>9}")
    for name, (front, body) in fronts().items():
        request = front.parse(body)
        samples: list[list[float]] = [[], [], [], []]
        for _ in range(repeat):
            stream = front.stream(request)
            began = clock()
            stream.start()
            started = clock()
            stream.feed_text("Hello")
            first = clock()
            for _ in range(tokens - 1):
                stream.feed_text(" word")
            fed = clock()
            stream.feed(finish_chunk)
            stream.feed(usage_chunk)
            stream.finish()
            ended = clock()
            for column, value in zip(samples, (started - began, first - started,
                                               (fed - first) / max(1, tokens - 1), ended - fed),
                                     strict=True):
                column.append(value)
        print(f"{name:<22}" + "".join(f"{statistics.median(column) / 1000:>8.2f}"
                                      for column in samples[:3])
              + f"{statistics.median(samples[3]) / 1000:>9.2f}")


async def measure(tokens: Sequence[int], repeat: int, profile: str | None) -> None:
    table = fronts()
    print(f"{'µs':<22}{'per stream':>12}{'per chunk':>11}")
    for count in tokens:
        stream = events(count)
        for name, (front, body) in table.items():
            for _ in range(20):
                await drive(front, body, stream)
            samples = []
            for _ in range(repeat):
                began = time.perf_counter_ns()
                await drive(front, body, stream)
                samples.append(time.perf_counter_ns() - began)
            p50 = statistics.median(samples) / 1000
            print(f"{f'{name} {count} tokens':<22}{p50:>12.1f}{p50 / len(stream):>11.2f}")
    if profile:
        front, body = table[profile]
        stream = events(max(tokens))
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(repeat):
            await drive(front, body, stream)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--repeat", type=int, default=300)
    parser.add_argument("--profile", choices=["anthropic", "responses", "ollama"])
    parser.add_argument("--parts", action="store_true",
                        help="each translator's start, first token, token and closing")
    args = parser.parse_args(argv)
    if args.parts:
        for count in args.tokens:
            parts(count, args.repeat)
        return 0
    trio.run(measure, args.tokens, args.repeat, args.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
