"""``GET /v1/models/{id}`` against a real gateway with the ``openai`` client: the same
object as in the list, ids with ``/`` and ``:``, 404 ``model_not_found``, and another
group's models hidden exactly as in the list."""

from __future__ import annotations

from typing import Any

import msgspec
import openai
import pytest

from tests.conftest import Network
from tooti.backends.simulated import SimulatedBackend
from tooti.gateway.app import Gateway
from tooti.settings import BackendSettings, GatewaySettings, GroupSettings

MODELS = ["meta-llama/Llama-3.1-8B", "qwen2.5:7b-instruct", "plain"]


def backend(*models: str) -> SimulatedBackend:
    return SimulatedBackend(BackendSettings(type="simulated", models=list(models)))


def client(network: Network, key: str = "none") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=network.url + "/v1", api_key=key, max_retries=0)


async def test_retrieve_matches_the_list(network: Network) -> None:
    await network.add_node([backend(*MODELS)], node_id="n1")
    async with client(network) as api, network.client() as http:
        listed = {m["id"]: m for m in (await http.get("/v1/models")).json()["data"]}
        for model in MODELS:
            found = await api.models.retrieve(model)
            assert found.id == model and found.object == "model"
            assert found.owned_by == "tooti-simulated"
            assert found.model_dump(exclude_none=True) == listed[model]
            # The same id percent-encoded, as some HTTP libraries send it.
            encoded = await http.get("/v1/models/" + model.replace("/", "%2F")
                                     .replace(":", "%3A"))
            assert encoded.status_code == 200 and encoded.json() == listed[model]


async def test_unknown_model_is_404_model_not_found(network: Network) -> None:
    await network.add_node([backend("plain")], node_id="n1")
    async with client(network) as api, network.client() as http:
        with pytest.raises(openai.NotFoundError) as caught:
            await api.models.retrieve("nope/model:1")
        posted = await http.post("/v1/models/plain", json={})
    body: Any = caught.value.body
    assert caught.value.status_code == 404
    assert body["code"] == "model_not_found" and body["param"] == "model"
    assert "'nope/model:1'" in body["message"]
    assert set(body) == {"message", "type", "param", "code"}
    assert posted.status_code == 405


@pytest.fixture
async def grouped(nursery: Any) -> Network:
    """A gateway with a private group ``eu`` (key ``sk-eu``) beside the public nodes."""
    from tooti.settings import TunnelSettings

    tunnel = TunnelSettings(heartbeat_interval=0.5)
    gateway = Gateway(GatewaySettings(
        listen="127.0.0.1:0", join_token="public-token",
        groups={"eu": GroupSettings(join_token="eu-token", api_keys=["sk-eu"])}), tunnel)
    urls = await nursery.start(gateway.serve)
    return Network(nursery, gateway, urls[0], tunnel)


async def test_another_groups_model_looks_unknown(grouped: Network) -> None:
    await grouped.add_node([backend("public-model")], node_id="pub",
                           join_token="public-token")
    await grouped.add_node([backend("eu/secret:1")], node_id="eu-node",
                           join_token="eu-token")
    async with client(grouped, "anything") as public, client(grouped, "sk-eu") as eu:
        assert (await eu.models.retrieve("eu/secret:1")).id == "eu/secret:1"
        with pytest.raises(openai.NotFoundError):
            await public.models.retrieve("eu/secret:1")
        assert (await public.models.retrieve("public-model")).id == "public-model"
        with pytest.raises(openai.NotFoundError):
            await eu.models.retrieve("public-model")  # the group has no public fallback
        eu_list = [m.id async for m in eu.models.list()]
    assert eu_list == ["eu/secret:1"]
    assert msgspec.json.decode(grouped.gateway.models.model(
        "eu/secret:1", groups=("eu",)) or b"null")["id"] == "eu/secret:1"
