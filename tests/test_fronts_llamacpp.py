"""The Responses and Anthropic fronts against a real llama.cpp server: the official
``openai`` client's ``responses.create`` (and ``anthropic``'s ``messages.create``) →
gateway → tunnel → node → llama.cpp (Gemma 3 270M, a base model: shapes and usage only,
never wording). Skipped without the ``local`` extra.

llama.cpp takes ``tools`` only with its jinja template engine, which the session's
shared server runs without; the function-tool round trips get a server of their own with
jinja on and a plain Gemma turn template (the packaged GGUF carries none). The model
is too small to call a tool reliably even when ``tool_choice`` names it, so the round
trip takes what the SDK parses: the model's call when it made one, else the call a
client would have received, sent back with its output in the second turn.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.backend_fixtures import (
    LLAMACPP_STARTUP_TIMEOUT,
    LlamaCppServer,
    _read_ready_line,
    have_local_extra,
)
from tests.conftest import Network
from tests.test_fronts_e2e import ANTHROPIC_TOOL, WEATHER_TOOL, anthropic_client, openai_client
from tooti.backends.llamacpp import LOCAL_EXTRA_HINT, assemble_gemma, child_command
from tooti.backends.openai import OpenAIBackend

MODEL = "gemma-3-270m"
pytestmark = pytest.mark.llamacpp
GEMMA_TURNS = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = 'user' %}{% endif %}"
    "<start_of_turn>{{ role }}\n{% if message['content'] is string %}"
    "{{ message['content'] | trim }}{% endif %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
"""A jinja template of Gemma's turns (tool calls and results are rendered into it by
llama.cpp's own polyfills)."""
QUESTION = "What is the weather in Paris?"


@pytest.fixture
async def llama_network(network: Network, llamacpp_server: LlamaCppServer) -> Network:
    await network.add_node([OpenAIBackend(llamacpp_server.settings())], node_id="llama-node")
    return network


async def test_responses_create_non_stream(llama_network: Network) -> None:
    response = await openai_client(llama_network.url).responses.create(
        model=MODEL, input="Name three colours.", temperature=0, max_output_tokens=8)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status in ("completed", "incomplete")
    [message] = [item for item in response.output if item.type == "message"]
    assert message.role == "assistant" and isinstance(response.output_text, str)
    usage = response.usage
    assert usage is not None and usage.input_tokens > 0 and 0 < usage.output_tokens <= 8
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


async def test_responses_create_stream(llama_network: Network) -> None:
    stream = await openai_client(llama_network.url).responses.create(
        model=MODEL, input="Name three colours.", temperature=0, max_output_tokens=8,
        stream=True)
    events = [event async for event in stream]
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == "".join(deltas)
    usage = final.usage
    assert usage is not None and usage.input_tokens > 0 and 0 < usage.output_tokens <= 8


@pytest.fixture(scope="module")
def jinja_server() -> Iterator[LlamaCppServer]:
    """A llama.cpp child of this module's own, with jinja on (so it takes ``tools``)."""
    if not have_local_extra():
        pytest.skip(LOCAL_EXTRA_HINT)
    command = child_command(str(assemble_gemma()), parallel=1, context_size=2048)
    command[command.index("--chat-template") + 1] = GEMMA_TURNS
    command[command.index("--no-jinja")] = "--jinja"
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        root = _read_ready_line(process, LLAMACPP_STARTUP_TIMEOUT)
        assert root is not None, "the jinja llama.cpp server did not start"
        yield LlamaCppServer(root=root, pid=process.pid)
    finally:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.close()  # --exit-on-stdin-eof
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


@pytest.fixture
async def tools_network(network: Network, jinja_server: LlamaCppServer) -> Network:
    await network.add_node([OpenAIBackend(jinja_server.settings())], node_id="llama-tools")
    return network


def _usage_shape(usage: Any, most: int) -> None:
    assert usage is not None and usage.input_tokens > 0 and 0 < usage.output_tokens <= most
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_function_tool_round_trip(tools_network: Network,
                                                  stream: bool) -> None:
    """A function tool forced by ``tool_choice`` reaches llama.cpp (which refuses
    ``tools`` it cannot take, so a 200 means it took them), the answer parses as the SDK's
    ``Response`` (a ``function_call`` item if the model called, else a message), and its
    call and output sent back as ``function_call`` / ``function_call_output`` items get a
    second answer, with usage, from the node."""
    client = openai_client(tools_network.url)
    tools: Any = [WEATHER_TOOL]
    forced: Any = {"type": "function", "name": "get_weather"}
    if stream:
        events = [event async for event in await client.responses.create(
            model=MODEL, input=QUESTION, tools=tools, tool_choice=forced, temperature=0,
            max_output_tokens=24, stream=True)]
        kinds = [event.type for event in events]
        assert kinds[:2] == ["response.created", "response.in_progress"]
        assert kinds[-1] in ("response.completed", "response.incomplete")
        assert [event.sequence_number for event in events] == list(range(len(events)))
        first = events[-1].response  # type: ignore[union-attr]
    else:
        first = await client.responses.create(model=MODEL, input=QUESTION, tools=tools,
                                              tool_choice=forced, temperature=0,
                                              max_output_tokens=24)
    assert first.status in ("completed", "incomplete")
    assert first.output and {item.type for item in first.output} <= {"message",
                                                                      "function_call"}
    assert first.tools[0].model_dump()["name"] == "get_weather"
    _usage_shape(first.usage, 24)
    calls = [item for item in first.output if item.type == "function_call"]
    for call in calls:
        assert call.name == "get_weather" and call.call_id
        assert isinstance(call.arguments, str)
    call_id, arguments = ((calls[0].call_id, calls[0].arguments) if calls
                          else ("call_weather", json.dumps({"city": "Paris"})))
    second = await client.responses.create(model=MODEL, tools=tools, temperature=0,
                                           max_output_tokens=16, input=[
        {"role": "user", "content": QUESTION},
        {"type": "function_call", "call_id": call_id, "name": "get_weather",
         "arguments": arguments},
        {"type": "function_call_output", "call_id": call_id, "output": "sunny, 21 C"},
    ])
    assert second.status in ("completed", "incomplete")
    assert {item.type for item in second.output} <= {"message", "function_call"}
    _usage_shape(second.usage, 16)
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > 0


async def test_anthropic_tool_use_round_trip(tools_network: Network) -> None:
    """The same round trip through the Anthropic front: ``tool_choice`` naming the tool,
    then the ``tool_use`` (the model's, or the one a client would send) and its
    ``tool_result``."""
    client = anthropic_client(tools_network.url)
    question: Any = {"role": "user", "content": QUESTION}
    first = await client.messages.create(
        model=MODEL, max_tokens=24, messages=[question],
        tools=[ANTHROPIC_TOOL], tool_choice={"type": "tool", "name": "get_weather"})
    assert first.type == "message" and first.role == "assistant"
    assert first.stop_reason in ("tool_use", "end_turn", "max_tokens")
    assert {block.type for block in first.content} <= {"text", "tool_use"}
    assert first.usage.input_tokens > 0 and 0 < first.usage.output_tokens <= 24
    uses = [block for block in first.content if block.type == "tool_use"]
    for use in uses:
        assert use.name == "get_weather" and isinstance(use.input, dict)
    assert (first.stop_reason == "tool_use") == bool(uses)
    use_id, arguments = (uses[0].id, uses[0].input) if uses else ("toolu_weather",
                                                                 {"city": "Paris"})
    second = await client.messages.create(
        model=MODEL, max_tokens=16, tools=[ANTHROPIC_TOOL], messages=[
            question,
            {"role": "assistant", "content": [{"type": "tool_use", "id": use_id,
                                               "name": "get_weather", "input": arguments}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use_id,
                                          "content": "sunny, 21 C"}]},
        ])
    assert second.stop_reason in ("tool_use", "end_turn", "max_tokens")
    assert {block.type for block in second.content} <= {"text", "tool_use"}
    assert second.usage.input_tokens > 0 and 0 < second.usage.output_tokens <= 16
