"""Node groups: group join tokens, request groups from API keys, and the routing rule
(a request of group G reaches only G's nodes; an ungrouped one only ungrouped nodes),
over a real gateway and real WebSocket tunnels."""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from tests.conftest import Network, simulated
from tooti.config import ConfigError, loads, validate
from tooti.gateway.app import Gateway
from tooti.groups import GroupKeys, api_key_digest
from tooti.mesh.join_tokens import Admission, BearerAuth
from tooti.settings import GatewaySettings, GroupSettings, Settings, TunnelSettings
from tooti.transport.websocket import SUBPROTOCOL

BASE_TOKEN = "base-token"
EU_TOKEN = "eu-token"
US_TOKEN = "us-token"
EU_KEY = "sk-eu-1"
EU_KEY_2 = "sk-eu-2"  # configured only as its digest
US_KEY = "sk-us-1"
EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            **extra}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
async def grouped(nursery: trio.Nursery) -> AsyncIterator[Network]:
    """A gateway with an ungrouped join token and two groups (no nodes yet)."""
    tunnel = TunnelSettings(heartbeat_interval=0.5)
    settings = GatewaySettings(
        listen="127.0.0.1:0", first_byte_timeout=10, join_token=BASE_TOKEN,
        groups={
            "eu-gpus": GroupSettings(join_token=EU_TOKEN, api_keys=[
                EU_KEY, "sha256:" + hashlib.sha256(EU_KEY_2.encode()).hexdigest()]),
            "us.gpus": GroupSettings(join_token=US_TOKEN, api_keys=[US_KEY]),
        },
    )
    gateway = Gateway(settings, tunnel)
    urls = await nursery.start(gateway.serve)
    yield Network(nursery, gateway, urls[0], tunnel)
    gateway.shutdown()


async def add_nodes(network: Network) -> None:
    """``plain`` (ungrouped) and ``eu-1`` (eu-gpus) both serve ``shared``; each group also
    has a model of its own."""
    await network.add_node([simulated(models=["shared", "plain-only"])], node_id="plain",
                           join_token=BASE_TOKEN)
    await network.add_node([simulated(models=["shared", "eu-only"])], node_id="eu-1",
                           join_token=EU_TOKEN)


# -- admission -------------------------------------------------------------


async def test_a_node_with_a_group_token_joins_that_group(grouped: Network) -> None:
    await add_nodes(grouped)
    peers = grouped.gateway.registry.peers
    assert peers["eu-1"].group == "eu-gpus" and peers["plain"].group == ""
    async with grouped.client() as http:  # loopback, no admin key: the admin API answers
        listed = (await http.get("/admin/v1/peers")).json()["data"]
    assert {p["id"]: p["group"] for p in listed} == {"eu-1": "eu-gpus", "plain": ""}


@pytest.mark.parametrize("token", [None, "wrong", "sk-eu-1"])
async def test_a_wrong_or_missing_token_is_refused(grouped: Network, token: str | None
                                                   ) -> None:
    """Any token configured: every dialer needs a valid one, loopback included (an API
    key is not a join token)."""
    headers = [] if token is None else [(b"authorization", f"Bearer {token}".encode())]
    with pytest.raises(ConnectionRejected) as refused:
        async with open_websocket_url(grouped.tunnel_url, subprotocols=[SUBPROTOCOL],
                                      extra_headers=headers):
            pass
    assert refused.value.status_code == 403


async def test_when_its_groups_nodes_leave_a_request_does_not_overflow(
    grouped: Network,
) -> None:
    """Its group's node gone, a grouped request gets 503 (the model was advertised to
    it) rather than reaching the ungrouped node that still serves the model."""
    await add_nodes(grouped)
    registry = grouped.gateway.registry
    grouped.kill_node("eu-1")
    with trio.fail_after(10):
        await registry.wait_until(lambda: "eu-1" not in registry.peers)
    async with grouped.client() as http:
        response = await http.post("/v1/chat/completions", json=chat("shared"),
                                   headers=bearer(EU_KEY))
        assert response.status_code == 503, response.text
        models = (await http.get("/v1/models", headers=bearer(EU_KEY))).json()["data"]
        assert models == []
        response = await http.post("/v1/chat/completions", json=chat("shared"))
        assert response.headers["x-tooti-node"] == "plain"


def test_bearer_auth_admits_into_groups() -> None:
    auth = BearerAuth("base", {"a": "ta", "b": "tb"})
    assert auth.open_to_network
    assert auth.identify(b"Bearer base", "203.0.113.9") == (None, Admission("", "default"))
    assert auth.identify(b"Bearer ta", "203.0.113.9") == (None, Admission("a", "default"))
    assert auth.identify(b"bearer tb", "127.0.0.1") == (None, Admission("b", "default"))
    assert auth.identify(b"Bearer tc", "127.0.0.1") == ("invalid token", Admission())
    assert auth.identify(None, "127.0.0.1") == ("invalid token", Admission())
    only_groups = BearerAuth("", {"a": "ta"})
    assert only_groups.open_to_network and only_groups.check(None, "127.0.0.1") is not None
    assert only_groups.identify(b"Bearer ta", "198.51.100.1") == (None, Admission("a", "default"))
    nothing = BearerAuth("")  # no token at all: loopback only, ungrouped
    assert nothing.identify(None, "127.0.0.1") == (None, Admission("", ""))
    assert nothing.identify(None, "198.51.100.1")[0] is not None


def test_group_of_a_request_key() -> None:
    keys = GroupKeys({
        "a": GroupSettings(join_token="x", api_keys=["k1", "sha256:" + "ab" * 32]),
        "b": GroupSettings(join_token="y", api_keys=["k2"]),
    })
    assert keys.group_of(b"Bearer k1") == "a" and keys.group_of(b"Bearer k2") == "b"
    assert keys.group_of(b"Bearer other") == "" and keys.group_of(None) == ""
    assert keys.group_of(b"Basic k1") == ""
    assert api_key_digest("sha256:" + "AB" * 32) == bytes.fromhex("ab" * 32)
    assert GroupKeys({}).group_of(b"Bearer k1") == ""


# -- routing ---------------------------------------------------------------


async def test_a_grouped_request_reaches_only_its_groups_nodes(grouped: Network) -> None:
    await add_nodes(grouped)
    async with grouped.client() as http:
        for key in (EU_KEY, EU_KEY_2):
            for body in (chat("shared"), chat("shared", stream=True)):
                for _ in range(5):
                    response = await http.post("/v1/chat/completions", json=body,
                                               headers=bearer(key))
                    assert response.status_code == 200, response.text
                    assert response.headers["x-tooti-node"] == "eu-1"
        # Its preferences cannot take it out of its group.
        response = await http.post(
            "/v1/chat/completions", headers=bearer(EU_KEY),
            json=chat("shared", provider={"only": ["plain"]}))
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "no_matching_node"
        # Nor can a fallback model served only outside the group.
        response = await http.post(
            "/v1/chat/completions", headers=bearer(EU_KEY),
            json=chat("plain-only", models=["eu-only"]))
        assert response.status_code == 200 and response.headers["x-tooti-model"] == "eu-only"


async def test_an_ungrouped_request_never_reaches_a_grouped_node(grouped: Network) -> None:
    await add_nodes(grouped)
    async with grouped.client() as http:
        for headers in ({}, bearer("sk-not-in-any-group")):
            for body in (chat("shared"), chat("shared", stream=True)):
                for _ in range(5):
                    response = await http.post("/v1/chat/completions", json=body,
                                               headers=headers)
                    assert response.status_code == 200, response.text
                    assert response.headers["x-tooti-node"] == "plain"
        response = await http.post(
            "/v1/chat/completions",
            json=chat("shared", provider={"order": ["eu-1"], "allow_fallbacks": False}))
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "no_matching_node"
    grouped.kill_node("plain")
    registry = grouped.gateway.registry
    with trio.fail_after(10):
        await registry.wait_until(lambda: "plain" not in registry.peers)
    async with grouped.client() as http:
        response = await http.post("/v1/chat/completions", json=chat("shared"))
        assert response.status_code == 503  # advertised to ungrouped requests before
        response = await http.post("/v1/chat/completions", json=chat("shared"),
                                   headers=bearer(EU_KEY))
        assert response.headers["x-tooti-node"] == "eu-1"


async def test_a_request_of_a_group_without_nodes_reaches_none(grouped: Network) -> None:
    await add_nodes(grouped)
    async with grouped.client() as http:
        response = await http.post("/v1/chat/completions", json=chat("shared"),
                                   headers=bearer(US_KEY))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


# -- what a request can see ------------------------------------------------


async def test_models_list_shows_only_reachable_models(grouped: Network) -> None:
    await add_nodes(grouped)

    async def listed(headers: dict[str, str]) -> dict[str, int]:
        async with grouped.client() as http:
            response = await http.get("/v1/models", headers=headers)
        assert response.status_code == 200
        return {m["id"]: m["meta"]["nodes"] for m in response.json()["data"]}

    assert await listed({}) == {"shared": 1, "plain-only": 1}
    assert await listed(bearer("sk-unknown")) == {"shared": 1, "plain-only": 1}
    assert await listed(bearer(EU_KEY)) == {"shared": 1, "eu-only": 1}
    assert await listed(bearer(EU_KEY_2)) == {"shared": 1, "eu-only": 1}
    assert await listed(bearer(US_KEY)) == {}


async def test_another_groups_model_is_not_found(grouped: Network) -> None:
    """Indistinguishable from a model that does not exist: same status, code and type."""
    await add_nodes(grouped)
    async with grouped.client() as http:
        unknown = await http.post("/v1/chat/completions", json=chat("no-such-model"),
                                  headers=bearer(US_KEY))
        cases = [
            ({}, "eu-only"),
            (bearer(EU_KEY), "plain-only"),
            (bearer(US_KEY), "eu-only"),
            (bearer(US_KEY), "shared"),
        ]
        for headers, model in cases:
            for stream in (False, True):
                response = await http.post("/v1/chat/completions",
                                           json=chat(model, stream=stream), headers=headers)
                assert response.status_code == 404, (headers, model, response.text)
                error = response.json()["error"]
                assert error == {**unknown.json()["error"],
                                 "message": f"the model '{model}' does not exist"}


# -- configuration ---------------------------------------------------------


def config_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        loads(text, source="tooti.toml")
    return info.value


def test_groups_load_from_toml() -> None:
    digest = hashlib.sha256(b"k2").hexdigest()
    s = loads(f'[gateway.groups.eu-gpus]\njoin_token = "t"\napi_keys = ["k1", "sha256:{digest}"]'
              '\n\n[gateway.groups."a.b_c"]\njoin_token = "u"\n')
    assert s.gateway.groups == {
        "eu-gpus": GroupSettings(join_token="t", api_keys=["k1", f"sha256:{digest}"]),
        "a.b_c": GroupSettings(join_token="u"),
    }


@pytest.mark.parametrize(("text", "key", "line", "message"), [
    ('[gateway.groups."eu gpus"]\njoin_token = "t"\n',
     'gateway.groups."eu gpus"', 1, "invalid group name 'eu gpus'"),
    ("[gateway.groups." + "g" * 65 + ']\njoin_token = "t"\n',
     "gateway.groups." + "g" * 65, 1, "1 to 64 characters"),
    ('[gateway.groups.a]\njoin_token = "t"\n\n[gateway.groups.b]\njoin_token = "t"\n',
     "gateway.groups.b.join_token", 5, "the same token as group 'a'"),
    ('[gateway]\njoin_token = "t"\n\n[gateway.groups.b]\njoin_token = "t"\n',
     "gateway.groups.b.join_token", 5, "the same token as gateway.join_token"),
    ('[gateway.groups.a]\napi_keys = ["k"]\n',
     "gateway.groups.a.join_token", 1, "a group needs its own join token"),
    ('[gateway.groups.a]\njoin_token = "t"\napi_keys = ["k", "sha256:abc"]\n',
     "gateway.groups.a.api_keys[1]", 3, "64 hex digits"),
    ('[gateway.groups.a]\njoin_token = "t"\napi_keys = ["k"]\n\n'
     '[gateway.groups.b]\njoin_token = "u"\napi_keys = ["k"]\n',
     "gateway.groups.b.api_keys[0]", 7, "already belongs to group 'a'"),
    ('[gateway.groups.a]\njoin_token = "t"\napi_keys = ["k", "sha256:'
     + hashlib.sha256(b"k").hexdigest() + '"]\n',
     "gateway.groups.a.api_keys[1]", 3, "key listed twice"),
    ('[gateway.groups.a]\njoin_token = 7\n',
     "gateway.groups.a.join_token", 2, "expected string, got integer"),
])
def test_bad_groups_are_config_errors_naming_the_key(text: str, key: str, line: int,
                                                      message: str) -> None:
    err = config_error(text)
    assert err.key == key and err.line == line and message in err.message, str(err)
    assert str(err).startswith(f"tooti.toml:{line}: {key}: ")


def test_group_secrets_never_appear_in_errors() -> None:
    err = config_error('[gateway.groups.a]\njoin_token = "t"\napi_keys = ["s3cret", 5]\n')
    assert "s3cret" not in str(err) and err.key == "gateway.groups.a.api_keys[1]"
    err = config_error('[gateway.groups.a]\njoin_token = "t"\napi_keys = "s3cret"\n')
    assert "s3cret" not in str(err)


def test_example_documents_group_fields() -> None:
    """config.example.toml documents a group table with every GroupSettings field, and
    the uncommented example is valid."""
    text = re.sub(r"^# (?=[A-Za-z0-9_.\"'-]+ = |\[)", "", EXAMPLE.read_text(),
                  flags=re.MULTILINE)
    groups = tomllib.loads(text)["gateway"]["groups"]
    fields = set(GroupSettings.__struct_fields__)
    assert groups and all(set(g) == fields for g in groups.values())
    settings = validate(Settings(gateway=GatewaySettings(
        join_token="change-me", groups={n: GroupSettings(**g) for n, g in groups.items()})))
    assert all(g.api_keys for g in settings.gateway.groups.values())
