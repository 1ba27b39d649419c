"""Tests for tooti.config: TOML loading, line-located errors, env and flags."""

from __future__ import annotations

import argparse
import datetime
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import msgspec
import pytest

from tooti.config import (
    ConfigError,
    apply_env,
    build_settings,
    load_file,
    loads,
    normalize_peer_url,
    parse_backend_flag,
    parse_listen,
    validate,
)
from tooti.settings import (
    BackendSettings,
    GatewaySettings,
    GroupSettings,
    NodeSettings,
    Settings,
    TunnelSettings,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        loads(text, source="tooti.toml")
    return info.value


# -- the example file ------------------------------------------------------


def field_paths(cls: type, prefix: str = "") -> list[str]:
    """Every dotted field path of a settings Struct, descending into tables."""
    paths = []
    for f in msgspec.structs.fields(cls):
        path, hint = prefix + f.name, f.type
        paths.append(path)
        if is_table(hint):
            paths += field_paths(hint, path + ".")
        elif get_origin(hint) is list and is_table(get_args(hint)[0]):
            paths += field_paths(get_args(hint)[0], path + ".")
    return paths


def is_table(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, msgspec.Struct)


def uncomment(text: str) -> str:
    """Uncomment the example's commented-out settings and table headers."""
    return re.sub(r"^# (?=[A-Za-z0-9_.\"'-]+ = |\[)", "", text, flags=re.MULTILINE)


def lookup(data: Any, path: str) -> Any:
    for key in path.split("."):
        if isinstance(data, list):
            data = data[0]
        data = data[key]
    return data


def test_example_as_shipped_is_valid_and_matches_defaults() -> None:
    assert load_file(EXAMPLE) == validate(Settings())


def test_example_documents_every_field() -> None:
    text = uncomment(EXAMPLE.read_text())
    data = tomllib.loads(text)
    missing = []
    for path in field_paths(Settings):
        try:
            lookup(data, path)
        except KeyError:
            missing.append(path)
    assert not missing, f"config.example.toml does not document: {missing}"
    settings = loads(text, source="uncommented example")  # the examples are valid too
    assert settings.node.backends[0].url == "http://127.0.0.1:8000/v1"


# -- unknown keys ----------------------------------------------------------


def test_unknown_top_level_key() -> None:
    err = error_of('roles = ["gateway"]\n\ngatewy = 1\n')
    assert str(err).startswith(
        "tooti.toml:3: unknown key 'gatewy' (known: billing, data_dir, drain_grace")
    assert "did you mean 'gateway'?" in str(err)
    assert err.line == 3


def test_unknown_nested_key() -> None:
    err = error_of('log_level = "info"\n[gateway]\nlisten = "127.0.0.1:1"\n\nlistn = "x"\n')
    assert str(err).startswith(
        "tooti.toml:5: unknown key 'gateway.listn' (known: access_log, admin_key")


def test_unknown_key_in_second_backend() -> None:
    text = """\
[node]
id = "n"

[[node.backends]]
type = "openai"
url = "http://127.0.0.1:8000/v1"

[[node.backends]]
type = "simulated"
# a comment
modles = ["m"]
"""
    err = error_of(text)
    assert err.line == 11
    assert "unknown key 'node.backends[1].modles'" in str(err)
    assert "did you mean 'models'?" in str(err)


def test_a_literal_key_lists_its_values() -> None:
    """Every ``Literal``-typed key (``gateway.auth``) names the values it takes, as
    ``log_level`` does, and its type by the type of those values."""
    err = error_of('[gateway]\nauth = "kyes"\n')
    assert (err.line, err.key) == (2, "gateway.auth")
    assert err.message == ("unknown value 'kyes' (expected one of: keys, open, or \"\" for "
                           "the default)")
    assert error_of("[gateway]\nauth = 3\n").message == "expected string, got integer 3"


@pytest.mark.parametrize(("text", "message"), [
    ('[node]\nbackends = ["simulated"]\n', 'expected table, got string "simulated"; '
     'write [[node.backends]] with type = "simulated"'),
    ('[node]\nbackends = "ollama"\n', 'expected array, got string "ollama"; '
     'write [[node.backends]] with type = "ollama"'),
    ("[node]\nbackends = [1]\n",
     "expected table, got integer 1; write a [[node.backends]] table for each"),
])
def test_backends_written_as_strings_say_how_to_write_them(text: str, message: str) -> None:
    err = error_of(text)
    assert (err.line, err.message) == (2, message)


def test_unknown_table_reports_header_line() -> None:
    err = error_of('data_dir = "/tmp"\n\n[tunel]\n')
    assert (err.line, "unknown key 'tunel'" in str(err)) == (3, True)


def test_unknown_dotted_key() -> None:
    err = error_of('data_dir = "/tmp"\ngateway.listen = "127.0.0.1:1"\ngateway.lisen = "x"\n')
    assert err.line == 3 and "'gateway.lisen'" in str(err)


def test_unknown_key_in_subtable_of_array_element() -> None:
    text = '[[node.backends]]\ntype = "a"\n[[node.backends]]\ntype = "b"\n[node.backends.extra]\n'
    err = error_of(text)
    assert err.line == 5 and "'node.backends[1].extra'" in str(err)


def test_locator_skips_multiline_strings_and_arrays() -> None:
    text = '''\
[node]
id = """
[gateway]
bogus = 1
"""
peers = [
  "ws://a:1",
]
labels = { "region" = "eu", zone = "b" }
"quoted" = 1
'''
    err = error_of(text)
    assert err.line == 10 and "unknown key 'node.quoted'" in str(err)


# -- wrong types -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (
            '[gateway]\nmax_body_bytes = "big"\n',
            2,
            'gateway.max_body_bytes: expected integer, got string "big"',
        ),
        ("\n[tunnel]\nmax_streams = true", 3, "tunnel.max_streams: expected integer, got bool"),
        ("[tunnel]\nmax_streams = 1.5\n", 2, "tunnel.max_streams: expected integer, got float 1.5"),
        ("log_level = 3\n", 1, "log_level: expected string, got integer 3"),
        ("drain_grace = true\n", 1, "drain_grace: expected number, got boolean true"),
        ("roles = [1, 2]\n", 1, "roles[0]: expected string, got integer 1"),
        ('roles = "gateway"\n', 1, 'roles: expected array, got string "gateway"'),
        ("gateway = 5\n", 1, "gateway: expected table, got integer 5"),
        ("[node]\nlabels = { a = 1 }\n", 2, "node.labels.a: expected string, got integer 1"),
        ("[[node.backends]]\nmodels = [1]\n", 2, "node.backends[0].models[0]: expected string"),
        ("[node]\nbackends = 1\n", 2, "node.backends: expected array, got integer 1"),
    ],
)
def test_wrong_types(text: str, line: int, message: str) -> None:
    err = error_of(text)
    assert str(err).startswith(f"tooti.toml:{line}: {message}")


def test_int_for_bool() -> None:
    err = error_of("[network]\ndiscover = 1\n")
    assert str(err) == "tooti.toml:2: network.discover: expected boolean, got integer 1"
    assert loads("[network]\ndiscover = true\n").network.discover is True


def test_int_accepted_for_float() -> None:
    settings = loads("drain_grace = 5\n[[node.backends]]\noptions = { n = 1, deep = { x = [1] } }")
    assert settings.drain_grace == 5.0 and isinstance(settings.drain_grace, float)
    assert settings.node.backends[0].options == {"n": 1, "deep": {"x": [1]}}


def test_type_error_on_secret_does_not_echo_value() -> None:
    err = error_of("[gateway]\njoin_token = 123456789\n")
    assert str(err) == "tooti.toml:2: gateway.join_token: expected string, got integer"
    err = error_of('[[node.backends]]\napi_key = ["sk-secret"]\n')
    assert "sk-secret" not in str(err)


# -- declared constraints --------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # gt on an integer, gt on a number (shown as the number it is), ge on both
        ("[tunnel]\nmax_streams = 0", "tooti.toml:2: tunnel.max_streams: must be > 0, got 0"),
        ("[gateway]\nrequest_timeout = 0",
         "tooti.toml:2: gateway.request_timeout: must be > 0, got 0.0"),
        ("[gateway]\nrelay_strikes = -1",
         "tooti.toml:2: gateway.relay_strikes: must be >= 0, got -1"),
        ("drain_grace = -1", "tooti.toml:1: drain_grace: must be >= 0, got -1.0"),
        ("drain_grace = -inf", "tooti.toml:1: drain_grace: must be >= 0, got -inf"),
        # a pattern and a minimum length, each with its own message
        ('roles = ["node", "Gateway"]', "tooti.toml:1: roles[1]: unknown role 'Gateway' "
         "(expected one of: gateway, node, relay)"),
        ('log_level = "info "', "tooti.toml:1: log_level: unknown log level 'info ' "
         "(expected one of: debug, info, warning, error)"),
        ('[[node.backends]]\ntype = "a"\n[[node.backends]]\ntype = ""',
         "tooti.toml:4: node.backends[1].type: backend type must not be empty"),
    ],
)
def test_each_constraint_kind_is_refused(text: str, message: str) -> None:
    assert str(error_of(text)) == message


def test_values_in_tables_name_their_key() -> None:
    err = error_of('[node]\nlabels = { a = "x", b = 2 }\n')
    assert str(err) == "tooti.toml:2: node.labels.b: expected string, got integer 2"
    err = error_of('[gateway.groups.eu]\njoin_token = "t"\n[gateway.groups.us]\n'
                   "join_token = 5\n")
    assert str(err) == "tooti.toml:4: gateway.groups.us.join_token: expected string, got integer"
    err = error_of('[gateway.groups."a.b"]\njoin_tokn = "t"\n')
    assert str(err).startswith(
        "tooti.toml:2: unknown key 'gateway.groups.\"a.b\".join_tokn' (known: api_keys, ")
    assert str(err).endswith("did you mean 'join_token'?")
    err = error_of('[gateway.groups.eu]\njoin_token = "t"\napi_keys = ["k", 1]\n')
    assert str(err) == "tooti.toml:3: gateway.groups.eu.api_keys[1]: expected string, got integer"


def test_every_number_is_bounded() -> None:
    """Each int and float setting declares its range (> 0 unless 0 has a meaning)."""

    def numbers(cls: type, prefix: str) -> list[tuple[str, Any]]:
        out = []
        for f in msgspec.structs.fields(cls):
            hint = get_args(f.type)[0] if get_origin(f.type) is list else f.type
            if is_table(hint):
                out += numbers(hint, f"{prefix}{f.name}.")
            else:
                out.append((prefix + f.name, hint))
        return out

    hints = dict(numbers(Settings, ""))
    assert hints["gateway.max_body_bytes"] is not int
    for name, hint in hints.items():
        args = get_args(hint)
        if args and args[0] in (int, float):
            meta = args[1]
            assert (meta.gt, meta.ge) in ((0, None), (None, 0)), name
        else:
            assert hint not in (int, float), f"{name} declares no range"


def test_validate_checks_declarations_of_built_settings() -> None:
    with pytest.raises(ConfigError, match=r"^tunnel.max_streams: must be > 0, got 0$"):
        validate(Settings(tunnel=TunnelSettings(max_streams=0)))
    with pytest.raises(ConfigError, match=r"^roles\[0\]: unknown role 'router'"):
        validate(Settings(roles=["router"]))
    with pytest.raises(ConfigError, match=r"^node.labels.b: expected string, got integer 1$"):
        validate(Settings(node=NodeSettings(labels={"a": "x", "b": 1})))  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match=r"^gateway.groups.eu.join_token: a group needs"):
        validate(Settings(gateway=GatewaySettings(groups={"eu": GroupSettings()})))
    options = {"since": datetime.date(2024, 1, 2), "n": [1, 2.5]}
    backend = BackendSettings(options=options)
    checked = validate(Settings(node=NodeSettings(backends=[backend])))
    assert checked.node.backends[0].options == options  # kept as given, not re-encoded


def test_constraints_without_their_own_message() -> None:
    from tooti.config import _decode, _Invalid

    class Port(msgspec.Struct, forbid_unknown_fields=True):
        port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
        ratio: Annotated[float, msgspec.Meta(lt=1)] = 0.5
        name: Annotated[str, msgspec.Meta(pattern="^[a-z]+$")] = "a"
        api_key: Annotated[int, msgspec.Meta(gt=0)] = 1

    for data, message in [({"port": 70000}, "must be <= 65535, got 70000"),
                          ({"ratio": 1}, "must be < 1, got 1.0"),
                          ({"name": "A"}, "must match the pattern '^[a-z]+$'"),
                          ({"api_key": -5}, "must be > 0")]:
        with pytest.raises(_Invalid) as info:
            _decode(data, Port)
        assert info.value.message == message


# -- TOML syntax -----------------------------------------------------------


def test_toml_syntax_error_has_line() -> None:
    err = error_of('roles = ["node"]\n[gateway]\nlisten = 127.0.0.1:80\n')
    assert str(err).startswith("tooti.toml:3: invalid TOML: ")
    assert err.line == 3


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot read config file"):
        load_file(tmp_path / "missing.toml")


# -- semantic checks -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('roles = ["gateway", "router"]', 1, "roles[1]: unknown role 'router'"),
        ('roles = ["node", "node"]', 1, "roles[1]: role 'node' listed twice"),
        ('[gateway]\nlisten = "8080"', 2, "gateway.listen: invalid listen address '8080'"),
        ('[gateway]\nlisten = "h:70000"', 2, "gateway.listen: invalid listen address"),
        ('[node]\npeers = ["http://gw:80"]', 2, "node.peers[0]: peer URL 'http://gw:80' must"),
        ('[node]\npeers = ["ws://:80"]', 2, "node.peers[0]: peer URL 'ws://:80' has no host"),
        ('log_level = "verbose"', 1, "log_level: unknown log level 'verbose'"),
        ("[tunnel]\nmax_streams = 0", 2, "tunnel.max_streams: must be > 0, got 0"),
        ("[gateway]\nrequest_timeout = -1", 2, "gateway.request_timeout: must be > 0"),
        ("[gateway]\nfirst_byte_timeout = nan", 2, "gateway.first_byte_timeout: must be > 0"),
        ("[[node.backends]]\nmax_concurrency = 0", 2, "node.backends[0].max_concurrency: must"),
        ("[[node.backends]]\nprice_input = -0.5", 2, "node.backends[0].price_input: must be >= 0"),
        ('[[node.backends]]\ntype = ""', 2, "node.backends[0].type: backend type must not be"),
        ("drain_grace = -1", 1, "drain_grace: must be >= 0"),
        ("[node]\nreconnect_max = 0.1", 2, "node.reconnect_max: must be >= node.reconnect_initial"),
        ("[relay]\nreconnect_max = 0.1", 2,
         "relay.reconnect_max: must be >= relay.reconnect_initial"),
        ('[relay]\npeers = ["http://gw"]', 2, "relay.peers[0]: peer URL 'http://gw' must"),
        ('[network]\nbootstrap_peers = ["ws://"]', 2, "network.bootstrap_peers[0]: peer URL"),
        ('[network]\nadvertise = ["gw:1"]', 2, "network.advertise[0]: peer URL 'gw:1' must"),
        ('[network]\npublic_url = "tcp://x"', 2, "network.public_url: peer URL 'tcp://x'"),
        ("[network]\nmax_peers = 0", 2, "network.max_peers: must be > 0, got 0"),
        ("[relay]\nmax_streams = 0", 2, "relay.max_streams: must be > 0, got 0"),
    ],
)
def test_semantic_errors(text: str, line: int, message: str) -> None:
    assert str(error_of(text)).startswith(f"tooti.toml:{line}: {message}")


def test_valid_file_normalizes(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(
        'roles = ["gateway", "node"]\nlog_level = "DEBUG"\ndrain_grace = 0\n'
        '[gateway]\nlisten = "[::1]:0"\n[node]\npeers = ["ws://gw:8080", "wss://gw/custom"]\n'
        '[[node.backends]]\ntype = "openai"\nurl = "http://127.0.0.1:8000/v1"\n'
    )
    s = load_file(path)
    assert s.roles == ["gateway", "node"] and s.log_level == "debug" and s.drain_grace == 0
    assert s.node.peers == ["ws://gw:8080/tooti/v1/tunnel", "wss://gw/custom"]
    assert s.node.backends == [BackendSettings(type="openai", url="http://127.0.0.1:8000/v1")]


def test_relay_and_network_urls_are_normalized(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(
        'roles = ["relay"]\n[relay]\npeers = ["ws://gw:8080"]\n'
        '[network]\nbootstrap_peers = ["wss://seed"]\npublic_url = "ws://me:9"\n'
        'advertise = ["ws://other:1/x"]\ndiscover = true\n')
    s = load_file(path)
    assert s.relay.peers == ["ws://gw:8080/tooti/v1/tunnel"]
    assert s.network.bootstrap_peers == ["wss://seed/tooti/v1/tunnel"]
    assert s.network.public_url == "ws://me:9/tooti/v1/tunnel"
    assert s.network.advertise == ["ws://other:1/x"] and s.network.discover is True


def test_peer_flag_sets_node_and_relay_peers() -> None:
    s = build_settings(namespace(peer=["ws://up:1"], role=["relay"]), {})
    assert s.relay.peers == s.node.peers == ["ws://up:1/tooti/v1/tunnel"]


def test_tls_flags_and_variables() -> None:
    s = build_settings(namespace(tls_cert="/f/cert.pem", tls_key="/f/key.pem"),
                       {"TOOTI_TLS_CERT": "/e/cert.pem", "TOOTI_TLS_KEY": "/e/key.pem",
                        "TOOTI_PEER_CA": "/e/ca.pem"})
    assert (s.gateway.tls_cert, s.gateway.tls_key) == ("/f/cert.pem", "/f/key.pem")
    assert s.network.peer_ca == "/e/ca.pem"
    assert build_settings(namespace(peer_ca="/f/ca.pem"), {}).network.peer_ca == "/f/ca.pem"


@pytest.mark.parametrize(("given", "missing"), [("tls_cert", "tls_key"),
                                                 ("tls_key", "tls_cert")])
def test_tls_cert_and_key_go_together(given: str, missing: str) -> None:
    err = error_of(f'[gateway]\n{given} = "/etc/tooti/x.pem"\n')
    assert f"gateway.{missing}: tls_cert and tls_key go together" in str(err)
    with pytest.raises(ConfigError, match=f"gateway.{missing}"):
        build_settings(namespace(**{given: "/x.pem"}), {})


def test_parse_listen() -> None:
    assert parse_listen("0.0.0.0:8080") == ("0.0.0.0", 8080)
    assert parse_listen("[::]:0") == ("::", 0)
    for bad in ("", ":80", "host", "host:", "host:-1", "host:65536", "host:http"):
        with pytest.raises(ConfigError):
            parse_listen(bad)


# -- peers and backends ----------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ws://gw:8080", "ws://gw:8080/tooti/v1/tunnel"),
        ("ws://gw:8080/", "ws://gw:8080/tooti/v1/tunnel"),
        ("wss://gw.example.com", "wss://gw.example.com/tooti/v1/tunnel"),
        ("ws://[::1]:9000", "ws://[::1]:9000/tooti/v1/tunnel"),
        ("ws://gw:8080/tooti/v1/tunnel", "ws://gw:8080/tooti/v1/tunnel"),
        ("wss://relay/custom/path", "wss://relay/custom/path"),
    ],
)
def test_normalize_peer_url(url: str, expected: str) -> None:
    assert normalize_peer_url(url) == expected


@pytest.mark.parametrize("url", ["http://gw:8080", "gw:8080", "tcp://gw", "ws://gw:99999", "ws://"])
def test_normalize_peer_url_rejects(url: str) -> None:
    with pytest.raises(ConfigError, match="peer URL"):
        normalize_peer_url(url)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("simulated", BackendSettings(type="simulated")),
        ("llamacpp", BackendSettings(type="llamacpp")),
        (
            "openai=http://127.0.0.1:8000/v1",
            BackendSettings(type="openai", url="http://127.0.0.1:8000/v1"),
        ),
        ("openai=http://h/v1?a=b", BackendSettings(type="openai", url="http://h/v1?a=b")),
        ("anything-else", BackendSettings(type="anything-else")),
    ],
)
def test_parse_backend_flag(text: str, expected: BackendSettings) -> None:
    assert parse_backend_flag(text) == expected


@pytest.mark.parametrize("text", ["", "=http://x", "openai=", "open ai=http://x"])
def test_parse_backend_flag_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="backend"):
        parse_backend_flag(text)


# -- environment and precedence --------------------------------------------


def test_apply_env_sets_everything() -> None:
    env = {
        "TOOTI_ROLE": "node, relay",
        "TOOTI_LISTEN": "0.0.0.0:9000",
        "TOOTI_PEER": "ws://a:1,wss://b/x",
        "TOOTI_BACKEND": "openai=http://h:8000/v1,simulated",
        "TOOTI_JOIN_TOKEN": "jt",
        "TOOTI_ADMIN_KEY": "ak",
        "TOOTI_DATA_DIR": "/var/lib/tooti",
        "TOOTI_LOG_LEVEL": "Warning",
        "TOOTI_NODE_ID": "n1",
        "TOOTI_DRAIN_GRACE": "2.5",
        "TOOTI_LOG_LEVELX": "ignored",
    }
    base = Settings()
    s = apply_env(base, env)
    assert base == Settings(), "apply_env must not mutate its argument"
    assert s.roles == ["node", "relay"]
    assert s.gateway.listen == "0.0.0.0:9000"
    assert s.node.peers == ["ws://a:1/tooti/v1/tunnel", "wss://b/x"]
    assert s.node.backends == [
        BackendSettings(type="openai", url="http://h:8000/v1"),
        BackendSettings(type="simulated"),
    ]
    assert s.gateway.join_token == s.node.join_token == "jt"
    assert s.gateway.admin_key == "ak"
    assert (s.data_dir, s.log_level, s.node.id, s.drain_grace) == (
        "/var/lib/tooti",
        "warning",
        "n1",
        2.5,
    )


def test_apply_env_empty_means_unset() -> None:
    assert apply_env(Settings(), {"TOOTI_LISTEN": "", "TOOTI_ROLE": " "}) == Settings()


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("TOOTI_ROLE", "gateway,bogus"),
        ("TOOTI_LISTEN", "nowhere"),
        ("TOOTI_PEER", "ws://ok:1,http://bad:2"),
        ("TOOTI_BACKEND", "openai="),
        ("TOOTI_LOG_LEVEL", "loud"),
        ("TOOTI_DRAIN_GRACE", "soon"),
        ("TOOTI_DRAIN_GRACE", "-1"),
    ],
)
def test_apply_env_bad_values_name_the_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_env(Settings(), {var: value})
    assert str(info.value).startswith(f"{var}: ")


def namespace(**kwargs: Any) -> argparse.Namespace:
    return argparse.Namespace(**kwargs)


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(
        'log_level = "debug"\ndata_dir = "/file"\ndrain_grace = 1\n'
        '[gateway]\nlisten = "127.0.0.1:1"\nmax_attempts = 7\n'
    )
    env = {"TOOTI_CONFIG": str(path), "TOOTI_LOG_LEVEL": "warning", "TOOTI_DATA_DIR": "/env"}
    args = namespace(config=None, log_level="error", role=["gateway,node"], peer=None)
    s = build_settings(args, env)
    assert s.log_level == "error"  # flag
    assert s.data_dir == "/env"  # env
    assert s.gateway.listen == "127.0.0.1:1" and s.gateway.max_attempts == 7  # file
    assert s.drain_grace == 1.0  # file
    assert s.tunnel.max_streams == 256  # default
    assert s.roles == ["gateway", "node"]


def test_config_flag_wins_over_env(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('data_dir = "/flagfile"\n')
    s = build_settings(namespace(config=str(path)), {"TOOTI_CONFIG": str(tmp_path / "nope")})
    assert s.data_dir == "/flagfile"


def test_list_flags_replace_file_lists(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('[node]\npeers = ["ws://file:1"]\n[[node.backends]]\ntype = "llamacpp"\n')
    args = namespace(config=str(path), peer=["ws://flag:2"], backend=["simulated"])
    s = build_settings(args, {"TOOTI_PEER": "ws://env:3"})
    assert s.node.peers == ["ws://flag:2/tooti/v1/tunnel"]
    assert s.node.backends == [BackendSettings(type="simulated")]


def test_bad_flag_names_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--drain-grace: expected a number of seconds"):
        build_settings(namespace(drain_grace="x"), {})


def test_defaults_without_file() -> None:
    assert build_settings(namespace(), {}) == Settings()


# -- logs: log_format and the access log -----------------------------------


def test_log_format_and_access_log_defaults() -> None:
    s = Settings()
    assert s.log_format == "text" and s.gateway.access_log is True


def test_log_format_and_access_log_from_file_env_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('log_format = "json"\n[gateway]\naccess_log = false\n')
    s = build_settings(namespace(config=str(path)), {})
    assert s.log_format == "json" and s.gateway.access_log is False
    s = build_settings(namespace(config=None), {"TOOTI_LOG_FORMAT": "json",
                                               "TOOTI_ACCESS_LOG": "0"})
    assert s.log_format == "json" and s.gateway.access_log is False
    s = build_settings(namespace(config=str(path)), {"TOOTI_ACCESS_LOG": "yes",
                                                     "TOOTI_LOG_FORMAT": "text"})
    assert s.log_format == "text" and s.gateway.access_log is True  # env over the file
    s = build_settings(namespace(config=None, log_format="json", access_log="0"),
                       {"TOOTI_ACCESS_LOG": "1", "TOOTI_LOG_FORMAT": "text"})
    assert s.log_format == "json" and s.gateway.access_log is False  # flags over env


def test_no_access_log_flag_parses() -> None:
    from tooti.cli import _parser

    args = _parser().parse_args(["run", "--no-access-log", "--log-format", "json"])
    s = build_settings(args, {})
    assert s.gateway.access_log is False and s.log_format == "json"
    s = build_settings(_parser().parse_args(["run"]), {})
    assert s.gateway.access_log is True and s.log_format == "text"


def test_invalid_log_format_names_the_key() -> None:
    err = error_of('log_level = "info"\nlog_format = "xml"\n')
    assert str(err) == ("tooti.toml:2: log_format: unknown log format 'xml' "
                        "(expected one of: text, json)")
    err = error_of('[gateway]\naccess_log = "no"\n')
    assert str(err).startswith("tooti.toml:2: gateway.access_log: expected bool")


@pytest.mark.parametrize(("var", "value"), [("TOOTI_LOG_FORMAT", "JSONL"),
                                            ("TOOTI_ACCESS_LOG", "maybe")])
def test_invalid_log_env_names_the_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_env(Settings(), {var: value})
    assert str(info.value).startswith(f"{var}: ") and value in str(info.value)


def test_invalid_log_format_flag_names_the_flag() -> None:
    with pytest.raises(ConfigError) as info:
        build_settings(namespace(config=None, log_format="yaml"), {})
    assert str(info.value) == ("--log-format: unknown log format 'yaml' "
                               "(expected one of: text, json)")
