"""The Responses front against a real llama.cpp server: the official ``openai`` client's
``responses.create`` → gateway → tunnel → node → llama.cpp (Gemma 3 270M, a base model:
shapes and usage only, never wording). Skipped without the ``local`` extra."""

from __future__ import annotations

import pytest

from tests.backend_fixtures import LlamaCppServer
from tests.conftest import Network
from tests.test_fronts_e2e import openai_client
from tooti.backends.openai import OpenAIBackend

MODEL = "gemma-3-270m"
pytestmark = pytest.mark.llamacpp


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
