"""The simulated backend's answers on the pass-through endpoints, clearly labelled fakes.

So the gateway's pass-through (routing by endpoint, streamed uploads, binary answers)
can be tested end to end without a model:

* ``rerank``: a deterministic relevance score per document (from a hash of the query
  and the document), results sorted by score, ``top_n`` honoured, usage counted in
  words;
* ``audio/transcriptions``: the upload is measured as it streams past (never kept):
  the text names the file part's name, size and SHA-256, so a test can check every byte
  arrived;
* ``audio/speech``: a few bytes of "audio" (``TOOTI-SIMULATED-AUDIO`` and the input
  text) in several chunks, in the content type of ``response_format``;
* ``images/generations``: ``n`` copies of a 1x1 PNG as ``b64_json``, usage counted in
  words;
* ``responses``: a completed Responses object whose text says it is simulated
  (non-streamed only).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import msgspec
import trio

from tooti import clock
from tooti.backends.base import BackendError, BackendResponse, Upload, bad_request
from tooti.protocol.multipart import FilePart, boundary_of

TINY_PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
"""A 1x1 PNG."""
AUDIO_MAGIC = b"TOOTI-SIMULATED-AUDIO\n"
"""How every simulated audio answer starts."""
AUDIO_TYPES = {"mp3": "audio/mpeg", "opus": "audio/opus", "aac": "audio/aac",
               "flac": "audio/flac", "wav": "audio/wav", "pcm": "audio/pcm"}

_encoder = msgspec.json.Encoder()


def _words(*texts: object) -> int:
    return sum(len(text.split()) for text in texts if isinstance(text, str))


def _score(query: str, document: str) -> float:
    digest = hashlib.sha256(f"{query}\x00{document}".encode()).digest()
    return round(int.from_bytes(digest[:4], "big") / 2**32, 6)


def rerank_body(model: str, request: dict[str, Any]) -> bytes:
    """A rerank answer (Cohere / Jina shape, as llama.cpp and vLLM serve it)."""
    query, documents = request.get("query"), request.get("documents")
    if not isinstance(query, str) or not isinstance(documents, list):
        raise bad_request("rerank needs 'query' (a string) and 'documents' (an array)")
    texts = [d if isinstance(d, str) else str(d.get("text", "")) if isinstance(d, dict)
             else "" for d in documents]
    results = sorted(({"index": i, "relevance_score": _score(query, text)}
                      for i, text in enumerate(texts)),
                     key=lambda r: -float(r["relevance_score"]))
    top_n = request.get("top_n")
    if isinstance(top_n, int) and not isinstance(top_n, bool) and top_n >= 0:
        results = results[:top_n]
    tokens = _words(query, *texts)
    return _encoder.encode({
        "id": "rerank-" + uuid.uuid4().hex, "model": model, "results": results,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "meta": {"simulated": True},
    })


def image_body(request: dict[str, Any]) -> bytes:
    """An images answer: ``n`` tiny PNGs."""
    prompt = request.get("prompt")
    if not isinstance(prompt, str):
        raise bad_request("images/generations needs a 'prompt' string")
    n = request.get("n", 1)
    n = n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 10 else 1
    tokens = _words(prompt)
    return _encoder.encode({
        "created": int(clock.wall()),
        "data": [{"b64_json": TINY_PNG_B64, "revised_prompt": f"simulated image: {prompt}"}
                 for _ in range(n)],
        "usage": {"input_tokens": tokens, "output_tokens": n, "total_tokens": tokens + n},
    })


def response_body(model: str, request: dict[str, Any]) -> bytes:
    """A completed, non-streamed Responses object."""
    text = "simulated response"
    tokens = _words(request.get("input"), request.get("instructions"))
    return _encoder.encode({
        "id": "resp_" + uuid.uuid4().hex, "object": "response",
        "created_at": int(clock.wall()), "status": "completed", "model": model,
        "output": [{"type": "message", "id": "msg_" + uuid.uuid4().hex,
                    "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}],
        "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
        "usage": {"input_tokens": tokens, "output_tokens": 2, "total_tokens": tokens + 2,
                  "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens_details": {"reasoning_tokens": 0}},
    })


async def _once(body: bytes) -> AsyncGenerator[bytes, None]:
    yield body


async def _audio(text: str) -> AsyncGenerator[bytes, None]:
    """A few bytes of labelled "audio", in four chunks (a stream, not one piece)."""
    data = AUDIO_MAGIC + text.encode()
    step = max(1, len(data) // 4 + 1)
    for start in range(0, len(data), step):
        await trio.lowlevel.checkpoint()
        yield data[start:start + step]


def passthrough_answer(endpoint: str, model: str, request: dict[str, Any]
                       ) -> BackendResponse:
    """The simulated answer to a JSON pass-through request."""
    if endpoint == "rerank":
        return BackendResponse(200, "application/json", _once(rerank_body(model, request)))
    if endpoint == "images/generations":
        return BackendResponse(200, "application/json", _once(image_body(request)))
    if endpoint == "audio/speech":
        text = request.get("input")
        if not isinstance(text, str):
            raise bad_request("audio/speech needs an 'input' string")
        kind = request.get("response_format", "mp3")
        media = AUDIO_TYPES.get(kind if isinstance(kind, str) else "", "audio/mpeg")
        return BackendResponse(200, media, _audio(text))
    if endpoint == "responses":
        if request.get("stream") is True:
            raise bad_request("the simulated backend answers responses non-streamed only")
        return BackendResponse(200, "application/json", _once(response_body(model, request)))
    raise BackendError(f"no simulated answer for /{endpoint}", status=404,
                       code="endpoint_not_served", retryable=False)


async def transcription(upload: Upload) -> bytes:
    """Read a streamed form to its end, measuring its file part; the answer's body."""
    boundary = boundary_of(upload.content_type)
    if boundary is None:
        raise bad_request("audio/transcriptions needs a multipart/form-data body")
    part = FilePart(boundary)
    total = 0
    async for chunk in upload.chunks:
        total += len(chunk)
        part.feed(chunk)
    if not part.filename and not part.done:
        raise bad_request("the form has no file part")
    return _encoder.encode({
        "text": f"simulated transcription of {part.filename}: {part.size} bytes, "
                f"sha256 {part.sha256}",
        "x_tooti_simulated": {"form_bytes": total, "file_bytes": part.size,
                              "sha256": part.sha256},
    })
