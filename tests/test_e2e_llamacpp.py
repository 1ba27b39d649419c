"""The official openai client → gateway → WebSocket tunnel → node → a real llama.cpp server.

The model (Gemma 3 270M) is a base model: these tests assert shapes, token
counts and usage, never wording, and use ``temperature: 0``.
"""

from __future__ import annotations

import openai
import pytest

from tests.backend_fixtures import LlamaCppServer
from tests.conftest import Network
from tests.test_e2e_simulated import client_for
from tooti.backends.openai import OpenAIBackend

MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture
async def llama_network(network: Network, llamacpp_server: LlamaCppServer) -> Network:
    """A gateway whose one node serves the session's llama.cpp server."""
    await network.add_node([OpenAIBackend(llamacpp_server.settings())], node_id="llama-node")
    return network


async def test_models_list(llama_network: Network) -> None:
    models = await client_for(llama_network).models.list()
    assert [m.id for m in models.data] == ["gemma-3-270m"]


async def test_chat_non_stream(llama_network: Network) -> None:
    reply = await client_for(llama_network).chat.completions.create(
        model="gemma-3-270m", messages=MESSAGES, temperature=0, max_tokens=8,
    )
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 0
    assert 0 < reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


async def test_chat_stream_with_usage(llama_network: Network) -> None:
    stream = await client_for(llama_network).chat.completions.create(
        model="gemma-3-270m", messages=MESSAGES, temperature=0, max_tokens=8, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert len({chunk.id for chunk in chunks}) == 1
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert 0 < usage.completion_tokens <= 8
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert 0 < len(content_chunks) <= 8


async def test_completions(llama_network: Network) -> None:
    completion = await client_for(llama_network).completions.create(
        model="gemma-3-270m", prompt="The sky is", temperature=0, max_tokens=6,
    )
    assert completion.object == "text_completion"
    assert isinstance(completion.choices[0].text, str)
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 6


async def test_embeddings(llama_network: Network) -> None:
    result = await client_for(llama_network).embeddings.create(
        model="gemma-3-270m", input=["hello world", "goodbye"], encoding_format="float",
    )
    assert [item.index for item in result.data] == [0, 1]
    dims = {len(item.embedding) for item in result.data}
    assert len(dims) == 1 and dims.pop() > 0
    assert result.usage.prompt_tokens > 0


async def test_errors_through_the_real_path(llama_network: Network) -> None:
    client = client_for(llama_network)
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="missing", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model="gemma-3-270m", messages=MESSAGES, max_tokens=-1)
    assert info.value.body is not None
