"""A protocol-faithful fake Ollama server for tests (an ASGI app for hypercorn).

Written from Ollama's API documentation (docs/api.md) and its Go request types,
so that the ``ollama`` backend is tested against the wire format it will meet,
not against its own assumptions:

* ``GET /`` (and ``HEAD /``) answers ``Ollama is running``; ``GET /api/version``
  ``{"version": ...}``;
* ``GET /api/tags`` lists the installed models (``name``, ``model``,
  ``modified_at``, ``size``, ``digest``, ``details{parent_model, format, family,
  families, parameter_size, quantization_level}``); ``GET /api/ps`` the loaded
  ones (plus ``expires_at``, ``size_vram``, ``context_length``);
* ``POST /api/chat`` and ``POST /api/generate`` stream NDJSON
  (``application/x-ndjson``) unless ``"stream": false`` (Ollama streams by
  default): chunks ``{"model", "created_at", "message": {"role": "assistant",
  "content": ...}, "done": false}`` (``"response"`` for generate), then a final
  object with ``done: true``, ``done_reason`` (``stop``/``length``, ``load``
  for an empty request) and the timing/count fields (``total_duration``,
  ``load_duration``, ``prompt_eval_count``, ``prompt_eval_duration``,
  ``eval_count``, ``eval_duration``); a non-streaming answer is one such
  object with the whole text;
* with ``tools``, a last user message naming one or more of the tools' function
  names is answered with ``tool_calls`` (arguments as JSON objects);
  ``format`` (``"json"`` or a JSON schema) makes the answer a JSON document;
  a message's ``images`` make it describe how many it saw;
* ``POST /api/embed`` answers ``{"model", "embeddings": [[...]],
  "total_duration", "load_duration", "prompt_eval_count"}`` with deterministic
  unit vectors (4 dimensions, or ``dimensions``);
* errors are ``{"error": "..."}``: 404 ``model "x" not found, try pulling it
  first`` for a model that is not installed, 400 for bodies Ollama's JSON
  decoding or validation would refuse (array ``content``, string tool call
  ``arguments``, bad base64 ``images``, a bad ``format`` or option type, a
  missing ``model``), 400 ``... does not support chat`` for an embedding model.

Special installed models select failure modes:

* ``cut`` streams a few lines, then drops the connection;
* ``broken`` streams a few lines, then an ``{"error": ...}`` line; ``doomed``
  streams only the ``{"error": ...}`` line (with status 200, as Ollama does once
  it has started streaming);
* ``endless`` streams one line (a non-streaming request: nothing), then waits
  until the client goes away;
* ``crash`` answers 500, ``busy`` 503 (Ollama's queue-full answer).

The app records every request (:attr:`FakeOllama.requests`, and the last
decoded POST body as :attr:`FakeOllama.last`), sets :attr:`FakeOllama.started`
when a generation request starts and :attr:`FakeOllama.disconnected` when it
sees the client disconnect mid-request (hypercorn does not cancel the app on a
disconnect; a watcher task waits for ``http.disconnect``). :attr:`fail` maps
paths to a status to answer instead (e.g. ``{"/api/ps": 500}``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio

from tests.backend_fixtures import answer_lifespan

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

REPLY = "Hello from the fake Ollama server, nice to meet you."
COMPLETION = "Once upon a time there was a small fake model."
EMBEDDING_DIM = 4
CUT_AFTER = 3
"""Lines a ``cut``/``broken`` stream sends before it fails."""


@dataclass
class FakeModel:
    """One installed model."""

    name: str
    family: str = "llama"
    parameter_size: str = "1.2B"
    quantization_level: str = "Q4_K_M"
    loaded: bool = False
    embedding: bool = False
    """An embedding-only model: refuses chat and generate."""
    context_length: int = 4096
    """Context length reported by ``/api/ps`` when loaded."""

    def tag(self) -> dict[str, Any]:
        """The ``/api/tags`` entry."""
        digest = hashlib.sha256(self.name.encode()).hexdigest()
        family = "nomic-bert" if self.embedding else self.family
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": "2025-01-02T03:04:05.123456789+01:00",
            "size": 807_000_000,
            "digest": digest,
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": family,
                "families": [family],
                "parameter_size": self.parameter_size,
                "quantization_level": self.quantization_level,
            },
        }

    def running(self) -> dict[str, Any]:
        """The ``/api/ps`` entry."""
        return {**self.tag(), "expires_at": "2099-01-01T00:00:00.000000000Z",
                "size_vram": 807_000_000, "context_length": self.context_length}


def default_models() -> list[FakeModel]:
    """The models installed unless a test says otherwise."""
    return [
        FakeModel("llama3.2:latest", loaded=True),
        FakeModel("qwen2.5:0.5b", family="qwen2", parameter_size="494M"),
        FakeModel("nomic-embed-text:latest", parameter_size="137M", quantization_level="F16",
                  embedding=True, loaded=True),
        *(FakeModel(f"{name}:latest")
          for name in ("cut", "broken", "doomed", "endless", "crash", "busy")),
    ]


@dataclass
class Seen:
    """One request received by the fake."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Refused(Exception):
    """A request Ollama would refuse with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def canonical(name: str) -> str:
    """``llama3.2`` → ``llama3.2:latest`` (Ollama's default tag)."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def created_at() -> str:
    """An RFC 3339 timestamp with nanoseconds, as Ollama writes them."""
    return time.strftime("%Y-%m-%dT%H:%M:%S.123456789Z", time.gmtime())


def tokens(text: str) -> list[str]:
    """Split ``text`` into word "tokens", each with its leading whitespace."""
    return re.findall(r"\s*\S+", text)


def words(text: str) -> int:
    """The fake's prompt token count of ``text``."""
    return len(text.split())


def unit_vector(text: str, dim: int) -> list[float]:
    """A deterministic unit vector for ``text``."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [(digest[i % len(digest)] - 127.5) / 127.5 + i * 1e-3 for i in range(dim)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    # Round-trip through float32, as Ollama's vectors are.
    vec = [x / norm for x in raw]
    return list(struct.unpack(f"<{dim}f", struct.pack(f"<{dim}f", *vec)))


# -- validation, as Ollama's JSON decoding and handlers do it ----------------------


def _type_error(field_name: str, want: str, value: Any) -> Refused:
    got = {str: "string", list: "array", dict: "object", bool: "bool"}.get(type(value), "number")
    return Refused(400, f"json: cannot unmarshal {got} into Go struct field {field_name} "
                        f"of type {want}")


INT_OPTIONS = {"num_predict", "num_ctx", "seed", "top_k", "num_keep", "num_batch", "num_gpu",
               "num_thread", "repeat_last_n"}
FLOAT_OPTIONS = {"temperature", "top_p", "min_p", "typical_p", "presence_penalty",
                 "frequency_penalty", "repeat_penalty"}


def check_options(options: Any) -> dict[str, Any]:
    """Validate an ``options`` object the way Ollama's ``Options.FromMap`` does."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise _type_error("GenerateRequest.options", "map[string]interface {}", options)
    for key, value in options.items():
        if key in INT_OPTIONS:
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise Refused(400, f"option {key!r} must be of type integer")
        elif key in FLOAT_OPTIONS:
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise Refused(400, f"option {key!r} must be of type float")
        elif key == "stop":
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise Refused(400, "option 'stop' must be of type array")
        else:
            raise Refused(400, f"invalid option provided: {key}")
    return options


def check_format(value: Any) -> None:
    """``format`` is ``""``, ``"json"`` or a JSON schema object."""
    if value is None or value in ("", "json") or isinstance(value, dict):
        return
    raise Refused(400, f"invalid format: {msgspec.json.encode(value).decode()!s}")


def check_images(images: Any, where: str) -> int:
    """Validate base64 ``images``; return how many there are."""
    if images is None:
        return 0
    if not isinstance(images, list):
        raise _type_error(f"{where}.images", "[]api.ImageData", images)
    for image in images:
        if not isinstance(image, str):
            raise _type_error(f"{where}.images", "api.ImageData", image)
        try:
            base64.b64decode(image, validate=True)
        except binascii.Error:
            raise Refused(400, "illegal base64 data at input byte 0") from None
    return len(images)


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate ``messages`` the way Go decodes them into ``[]api.Message``."""
    if messages is None:
        return []
    if not isinstance(messages, list):
        raise _type_error("ChatRequest.messages", "[]api.Message", messages)
    for message in messages:
        if not isinstance(message, dict):
            raise _type_error("ChatRequest.messages", "api.Message", message)
        for key in ("role", "content", "thinking", "tool_name"):
            value = message.get(key)
            if value is not None and not isinstance(value, str):
                raise _type_error(f"Message.messages.{key}", "string", value)
        check_images(message.get("images"), "Message.messages")
        calls = message.get("tool_calls")
        if calls is None:
            continue
        if not isinstance(calls, list):
            raise _type_error("Message.messages.tool_calls", "[]api.ToolCall", calls)
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise _type_error("Message.messages.tool_calls", "api.ToolCall", call)
            if not isinstance(function.get("arguments"), dict):
                raise _type_error("Message.messages.tool_calls.function.arguments",
                                  "api.ToolCallFunctionArguments", function.get("arguments"))
    return messages


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """Validate ``tools`` (OpenAI-style function tools)."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _type_error("ChatRequest.tools", "api.Tools", tools)
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _type_error("ChatRequest.tools", "api.Tool", tool)
    return tools


# -- answers ---------------------------------------------------------------------------


def schema_example(schema: dict[str, Any]) -> Any:
    """A document matching a (simple) JSON schema."""
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties") or {}
        return {name: schema_example(sub) for name, sub in props.items()}
    if kind == "array":
        return [schema_example(schema.get("items") or {})]
    return {"string": "fake", "integer": 1, "number": 1.5, "boolean": True}.get(
        str(kind), None)


def tool_arguments(tool: dict[str, Any]) -> dict[str, Any]:
    """Arguments for a call of ``tool``: an example of its parameters schema."""
    params = tool["function"].get("parameters") or {"type": "object", "properties": {}}
    example = schema_example(params)
    return example if isinstance(example, dict) else {}


@dataclass
class Plan:
    """What one generation request will answer."""

    kind: str
    """``chat``, ``generate`` or ``embed``."""
    model: str
    stream: bool
    pieces: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    done_reason: str = "stop"
    prompt_tokens: int = 1
    embeddings: list[list[float]] = field(default_factory=list)

    @property
    def base_name(self) -> str:
        """The model name without its tag (selects the failure modes)."""
        return canonical(self.model).split(":")[0]


@dataclass
class FakeOllama:
    """The fake Ollama ASGI app (see the module docstring)."""

    models: list[FakeModel] = field(default_factory=default_models)
    version: str = "0.12.3"
    fail: dict[str, int] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    last: dict[str, Any] | None = None
    started: trio.Event = field(default_factory=trio.Event)
    disconnected: trio.Event = field(default_factory=trio.Event)

    def model(self, name: str) -> FakeModel | None:
        """The installed model called ``name`` (tag optional), if any."""
        wanted = canonical(name)
        return next((m for m in self.models if m.name == wanted), None)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """The ASGI entry point."""
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.requests.append(Seen(method, path, headers, body))
        if path in self.fail:
            await send_json(send, self.fail[path], {"error": f"fake failure of {path}"})
            return
        get = method in ("GET", "HEAD")
        if path == "/" and get:
            await send_text(send, 200, "Ollama is running", head=method == "HEAD")
        elif path == "/api/version" and get:
            await send_json(send, 200, {"version": self.version})
        elif path == "/api/tags" and get:
            await send_json(send, 200, {"models": [m.tag() for m in self.models]})
        elif path == "/api/ps" and get:
            await send_json(send, 200, {"models": [m.running() for m in self.models
                                                   if m.loaded]})
        elif path in ("/api/chat", "/api/generate", "/api/embed"):
            if method != "POST":
                await send_text(send, 405, "405 method not allowed")
                return
            await self._generation(path, body, receive, send)
        else:
            await send_text(send, 404, "404 page not found")

    async def _generation(self, path: str, body: bytes, receive: Receive, send: Send) -> None:
        try:
            try:
                request = msgspec.json.decode(body)
            except msgspec.DecodeError:
                raise Refused(400, "unexpected EOF") from None
            if not isinstance(request, dict):
                raise Refused(400, "json: cannot unmarshal into Go value of type api.Request")
            self.last = request
            plan = self.plan(path, request)
        except Refused as exc:
            await send_json(send, exc.status, {"error": exc.message})
            return
        self.started.set()
        await self._watching(receive, send, plan)

    async def _watching(self, receive: Receive, send: Send, plan: Plan) -> None:
        """Answer ``plan``; stop and set :attr:`disconnected` if the client goes away.

        Hypercorn does not cancel the app when a client disconnects; it only
        queues an ``http.disconnect`` message (also once a response is
        complete, which is not a disconnect of interest).
        """
        complete = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal complete
            if message["type"] == "http.response.body" and not message.get("more_body"):
                complete = True
            await send(message)

        try:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    if not complete:
                        self.disconnected.set()
                        nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                await self._answer(plan, tracking_send)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The watcher never raises: the group holds the answer's own failure.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    # -- planning -------------------------------------------------------------------

    def plan(self, path: str, request: dict[str, Any]) -> Plan:
        """Validate ``request`` and decide the answer; raise :class:`Refused`."""
        name = request.get("model")
        if not isinstance(name, str) or not name:
            raise Refused(400, "model is required")
        stream = request.get("stream", True)
        if stream is not None and not isinstance(stream, bool):
            raise _type_error("ChatRequest.stream", "bool", stream)
        kind = path.removeprefix("/api/")
        plan = Plan(kind=kind, model=name, stream=stream is not False and kind != "embed")
        if kind == "embed":
            return self._plan_embed(plan, request)
        options = check_options(request.get("options"))
        check_format(request.get("format"))
        keep_alive = request.get("keep_alive")
        if keep_alive is not None and not isinstance(keep_alive, str | int | float):
            raise _type_error("ChatRequest.keep_alive", "api.Duration", keep_alive)
        if kind == "chat":
            messages = check_messages(request.get("messages"))
            tools = check_tools(request.get("tools"))
        else:
            prompt = request.get("prompt", "")
            suffix = request.get("suffix", "")
            if not isinstance(prompt, str) or not isinstance(suffix, str):
                raise _type_error("GenerateRequest.prompt", "string", prompt)
            check_images(request.get("images"), "GenerateRequest")
            messages = [{"role": "user", "content": prompt}] if prompt else []
            tools = []
        model = self.model(name)
        if model is None:
            raise Refused(404, f'model "{name}" not found, try pulling it first')
        if model.embedding:
            raise Refused(400, f'"{name}" does not support {kind}')
        if plan.base_name == "crash":
            raise Refused(500, "llama runner process has terminated: exit status 2")
        if plan.base_name == "busy":
            raise Refused(503, "server busy, please try again.  maximum pending requests "
                               "exceeded")
        if not messages:
            plan.done_reason = "load"  # an empty request only loads the model
            return plan
        plan.prompt_tokens = max(1, sum(words(str(m.get("content") or "")) for m in messages))
        last_user: dict[str, Any] = next(
            (m for m in reversed(messages) if m.get("role") == "user"), {})
        text = str(last_user.get("content") or "")
        called = [t for t in tools if t["function"]["name"] in text]
        fmt = request.get("format")
        if called:
            plan.tool_calls = [
                {"function": {"index": i, "name": t["function"]["name"],
                              "arguments": tool_arguments(t)}}
                for i, t in enumerate(called)
            ]
            return plan
        if isinstance(fmt, dict):
            answer = msgspec.json.encode(schema_example(fmt)).decode()
        elif fmt == "json":
            answer = '{"answer": "fake"}'
        elif last_user.get("images"):
            answer = f"I see {len(last_user['images'])} image(s)."
        else:
            answer = REPLY if kind == "chat" else COMPLETION
        pieces = tokens(answer)
        stops = options.get("stop") or []
        for i, piece in enumerate(pieces):
            if piece.strip() in stops:
                pieces = pieces[:i]
                break
        limit = options.get("num_predict")
        if isinstance(limit, int) and 0 <= limit < len(pieces):
            pieces, plan.done_reason = pieces[:limit], "length"
        plan.pieces = pieces
        return plan

    def _plan_embed(self, plan: Plan, request: dict[str, Any]) -> Plan:
        value = request.get("input")
        if isinstance(value, str):
            inputs = [value]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            inputs = list(value)
        else:
            raise Refused(400, "invalid input type")
        dim = request.get("dimensions") or EMBEDDING_DIM
        if not isinstance(dim, int) or dim < 1:
            raise _type_error("EmbedRequest.dimensions", "int", dim)
        if self.model(plan.model) is None:
            raise Refused(404, f'model "{plan.model}" not found, try pulling it first')
        plan.embeddings = [unit_vector(text, dim) for text in inputs]
        plan.prompt_tokens = sum(words(text) for text in inputs)
        return plan

    # -- answering ---------------------------------------------------------------------

    def _chunk(self, plan: Plan, text: str, **extra: Any) -> dict[str, Any]:
        item: dict[str, Any] = {"model": plan.model, "created_at": created_at()}
        if plan.kind == "chat":
            item["message"] = {"role": "assistant", "content": text, **extra}
        else:
            item["response"] = text
        item["done"] = False
        return item

    def _final(self, plan: Plan, text: str, tool_calls: bool) -> dict[str, Any]:
        item = self._chunk(plan, text, **({"tool_calls": plan.tool_calls} if tool_calls else {}))
        generated = len(plan.pieces) + (12 if plan.tool_calls else 0)
        item.update(done=True, done_reason=plan.done_reason)
        if plan.kind == "generate":
            item["context"] = list(range(1, plan.prompt_tokens + generated + 1))
        if plan.done_reason != "load":
            item.update(
                total_duration=1_234_567_890, load_duration=12_345_678,
                prompt_eval_count=plan.prompt_tokens, prompt_eval_duration=23_456_789,
                eval_count=generated, eval_duration=987_654_321,
            )
        else:
            item.update(total_duration=12_345_678, load_duration=12_345_678)
        return item

    async def _answer(self, plan: Plan, send: Send) -> None:
        name = plan.base_name
        if plan.kind == "embed":
            await send_json(send, 200, {
                "model": plan.model, "embeddings": plan.embeddings,
                "total_duration": 14_143_917, "load_duration": 1_019_500,
                "prompt_eval_count": plan.prompt_tokens,
            })
            return
        if not plan.stream:
            if name == "endless":
                await trio.sleep_forever()
            await send_json(send, 200, self._final(plan, "".join(plan.pieces), True))
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/x-ndjson")]})

        async def line(item: dict[str, Any]) -> None:
            await send({"type": "http.response.body", "more_body": True,
                        "body": msgspec.json.encode(item) + b"\n"})

        if name in ("cut", "broken", "doomed", "endless"):
            pieces = tokens(REPLY)
            count = {"endless": 1, "doomed": 0}.get(name, CUT_AFTER)
            for piece in pieces[:count]:
                await line(self._chunk(plan, piece))
            if name == "endless":
                await trio.sleep_forever()
            if name == "cut":
                raise RuntimeError("fake ollama drops the connection")
            await line({"error": "an error was encountered while running the model: "
                                 "unexpected EOF"})
            await send({"type": "http.response.body", "body": b""})
            return
        for piece in plan.pieces:
            await line(self._chunk(plan, piece))
        if plan.tool_calls:
            await line(self._chunk(plan, "", tool_calls=plan.tool_calls))
        await line(self._final(plan, "", False))
        await send({"type": "http.response.body", "body": b""})


async def send_json(send: Send, status: int, data: Any) -> None:
    """Send a whole JSON answer, as Gin does (``application/json; charset=utf-8``)."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json; charset=utf-8")]})
    await send({"type": "http.response.body", "body": msgspec.json.encode(data)})


async def send_text(send: Send, status: int, text: str, head: bool = False) -> None:
    """Send a plain-text answer (no body for HEAD)."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
    await send({"type": "http.response.body", "body": b"" if head else text.encode()})
