"""Load, validate and override :class:`tooti.settings.Settings`.

Sources, highest precedence first: command-line flags, ``TOOTI_*`` environment
variables, a TOML file, the declared defaults. The TOML file is decoded with
``msgspec.convert`` into the Structs of :mod:`tooti.settings` (their annotations and
``msgspec.Meta`` constraints are the schema); checks that span fields or need a
parser stay here as small functions. Every error names the file, line and dotted key::

    tooti.toml:12: gateway.max_body_bytes: expected integer, got string "big"

msgspec reports where a value failed as ``$.gateway.max_body_bytes``; ``tomllib``
reports no positions for parsed keys, so :func:`tooti.toml_keys.locate_keys` scans the
source text for table headers and ``key =`` lines to find the line of that key.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import difflib
import math
import operator
import os
import re
import tomllib
import types
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit, urlunsplit

import msgspec

from tooti.groups import DEFAULT_TOKEN, GROUP_NAME, api_key_digest
from tooti.settings import (
    AliasTarget,
    BackendSettings,
    GatewaySettings,
    LogFormat,
    LogLevel,
    Role,
    Settings,
)
from tooti.toml_keys import Path, line_of, locate_keys
from tooti.transport.websocket import TUNNEL_PATH

SECRET_FIELDS = frozenset({"join_token", "join_tokens", "admin_key", "api_key",
                           "discover_token", "api_keys"})
"""Field names whose values never appear in messages."""

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class ConfigError(Exception):
    """An invalid setting, formatted as ``SOURCE:LINE: KEY: MESSAGE``.

    ``source`` is a file name, an environment variable or a flag; ``line`` and
    ``key`` are included when known.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        self.message = message
        self.source = source
        self.line = line
        self.key = key
        super().__init__(self._format())

    def _format(self) -> str:
        parts = []
        if self.source is not None:
            parts.append(self.source if self.line is None else f"{self.source}:{self.line}")
        if self.key is not None:
            parts.append(self.key)
        return ": ".join([*parts, self.message])

    def __str__(self) -> str:
        return self._format()


class _Invalid(Exception):
    """Internal: a validation failure at a key path (located later)."""

    def __init__(self, path: Path, message: str, *, show_key: bool = True) -> None:
        super().__init__(message)
        self.path = path
        self.message = message
        self.show_key = show_key


# --------------------------------------------------------------------------
# Loading files


def load_file(path: str | os.PathLike[str]) -> Settings:
    """Read, parse and validate a TOML settings file; raise :class:`ConfigError`."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"cannot read config file: {reason}", source=source) from None
    except UnicodeDecodeError:
        raise ConfigError("config file is not valid UTF-8", source=source) from None
    return loads(text, source=source)


def loads(text: str, *, source: str = "<string>") -> Settings:
    """Parse and validate TOML text; ``source`` names it in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(exc, text, source) from None
    try:
        return _validate(_decode(data))
    except _Invalid as exc:
        raise ConfigError(
            exc.message,
            source=source,
            line=line_of(locate_keys(text), exc.path),
            key=_dotted(exc.path) if exc.show_key else None,
        ) from None


def _syntax_error(exc: tomllib.TOMLDecodeError, text: str, source: str) -> ConfigError:
    msg = str(exc)
    line: int | None = None
    if m := re.search(r"\(at line (\d+), column (\d+)\)", msg):
        line = int(m.group(1))
        msg = f"{msg[: m.start()].rstrip()} (column {m.group(2)})"
    elif m := re.search(r"\s*\(at end of document\)", msg):
        line = max(1, len(text.splitlines()))
        msg = f"{msg[: m.start()]} (at end of file)"
    return ConfigError(f"invalid TOML: {msg}", source=source, line=line)


# --------------------------------------------------------------------------
# Decoding against the settings Structs


def _decode(data: Any, hint: Any = Settings) -> Any:
    """``data`` converted to the declared type ``hint``; :class:`_Invalid` at the key
    that does not fit."""
    try:
        return msgspec.convert(data, hint)
    except msgspec.ValidationError as exc:
        raise _explain(str(exc), data, hint) from None


_ERROR = re.compile(r"(?P<what>.*?)(?: - at `\$(?P<at>[^`]*)`)?", re.DOTALL)
_STEP = re.compile(r"\.(\w+)|\[(\d+)\]|\[\.\.\.\]")
_TOML_TYPES = (datetime.datetime, datetime.date, datetime.time)
_KINDS: dict[Any, str] = {bool: "boolean", int: "integer", float: "number", str: "string",
                          list: "array", dict: "table"}
_BOUNDS = ((">", "gt", operator.gt), (">=", "ge", operator.ge),
           ("<", "lt", operator.lt), ("<=", "le", operator.le))


def _explain(error: str, data: Any, hint: Any) -> _Invalid:
    """Turn msgspec's ``Expected `int`, got `str` - at `$.a.b[0]``` into an
    :class:`_Invalid` at that key path, in the words users see."""
    m = _ERROR.fullmatch(error)
    assert m is not None  # every string matches
    path: Path = ()
    value = data
    for step in _STEP.finditer(m["at"] or ""):
        key: str | int | None
        hint = _member(hint, value)
        if step[1] is not None:
            hint, key = get_type_hints(_unwrap(hint)[0], include_extras=True)[step[1]], step[1]
        elif step[2] is not None:
            hint, key = get_args(_unwrap(hint)[0])[0], int(step[2])
        else:  # msgspec does not name a table's key: the first value refused is the one
            hint = get_args(_unwrap(hint)[0])[1]
            key = next((k for k, v in value.items() if not _fits(v, hint)), None)
            if key is None:
                break
        value, path = value[key], (*path, key)
    if isinstance(value, dict):  # a union's table (e.g. an alias's): its Struct's keys
        hint = _member(hint, value)
    if unknown := re.fullmatch(r"Object contains unknown field `(.*)`", m["what"]):
        return _unknown_key(path, unknown[1], _unwrap(hint)[0].__struct_fields__)
    if ", got `" in m["what"]:
        return _Invalid(path, f"expected {_kind(hint)}, got {_describe(value, _is_secret(path))}"
                        + _tables_hint(path, hint, value))
    return _Invalid(path, _broken(hint, value, _is_secret(path)))


def _tables_hint(path: Path, hint: Any, value: Any) -> str:
    """For a value where an array of tables (``[[node.backends]]``) is declared, or in
    one: how to write it (``node.backends = ["simulated"]`` →
    ``; write [[node.backends]] with type = "simulated"``); else ``""``."""
    base = _unwrap(hint)[0]
    if get_origin(base) is list:
        base, where = _unwrap(get_args(base)[0])[0], path
    elif path and isinstance(path[-1], int):
        where = path[:-1]
    else:
        return ""
    if not (isinstance(base, type) and issubclass(base, msgspec.Struct)):
        return ""
    header = f"[[{_dotted(where)}]]"
    if isinstance(value, str) and "type" in base.__struct_fields__ and not _is_secret(path):
        return f"; write {header} with type = {_describe(value).removeprefix('string ')}"
    return f"; write a {header} table for each"


def _member(hint: Any, value: Any) -> Any:
    """Of a union type (an alias's ``str | list[str] | AliasTiers``), the member ``value``
    is of (a table: the Struct); any other type as it is."""
    if not isinstance(_unwrap(hint)[0], types.UnionType):
        return hint
    for member in get_args(_unwrap(hint)[0]):
        kind = _kind(member)
        if kind == _VALUES.get(type(value), "") or (kind == "table"
                                                    and isinstance(value, dict)):
            return member
    return hint


def _unwrap(hint: Any) -> tuple[Any, tuple[Any, ...]]:
    """A declared type without its ``Annotated`` wrapper, and the wrapper's metadata."""
    if get_origin(hint) is Annotated:
        base, *metas = get_args(hint)
        return base, tuple(metas)
    return hint, ()


def _fits(value: Any, hint: Any) -> bool:
    try:
        msgspec.convert(value, hint)
    except msgspec.ValidationError:
        return False
    return True


def _kind(hint: Any) -> str:
    """What TOML calls the declared type: ``integer``, ``number``, ``table``, ..."""
    base = _unwrap(hint)[0]
    if isinstance(base, types.UnionType):
        kinds = [_kind(member) for member in get_args(base)]
        return ", ".join(kinds[:-1]) + " or " + kinds[-1]
    if get_origin(base) is Literal:  # the type of its values (a Literal is one type)
        return _kind(type(get_args(base)[0]))
    return _KINDS.get(get_origin(base) or base, "table")  # the rest are Structs


def _broken(hint: Any, value: Any, secret: bool) -> str:
    """The message for a value of the right type that breaks its declared constraint:
    the constraint's own ``extra["error"]``, else the values a ``Literal`` allows, else
    the bound it breaks."""
    base, metas = _unwrap(hint)
    if get_origin(base) is Literal:
        listed = ", ".join(str(v) for v in get_args(base) if v != "")
        unset = ', or "" for the default' if "" in get_args(base) else ""
        got = "" if secret else f" '{value}'"
        return f"unknown value{got} (expected one of: {listed}{unset})"
    shown = float(value) if base is float else value
    for meta in metas:
        if meta.extra and "error" in meta.extra:
            return str(meta.extra["error"]).format(value="..." if secret else value)
        for op, name, holds in _BOUNDS:
            bound = getattr(meta, name)
            if bound is not None and not holds(shown, bound):
                return f"must be {op} {bound}" + ("" if secret else f", got {shown}")
        if meta.pattern is not None:
            return f"must match the pattern '{meta.pattern}'"
    return "invalid value"


def _unknown_key(path: Path, name: str, known: Iterable[str]) -> _Invalid:
    where, names = (*path, name), sorted(known)
    msg = f"unknown key '{_dotted(where)}' (known: {', '.join(names)})"
    if close := difflib.get_close_matches(name, names, n=1):
        msg += f"; did you mean '{close[0]}'?"
    return _Invalid(where, msg, show_key=False)


_VALUES: dict[type, str] = {bool: "boolean", int: "integer", float: "float", str: "string",
                            list: "array", dict: "table"}


def _describe(value: Any, secret: bool = False) -> str:
    """Name a TOML value's type, with the value itself unless it is secret or a table or
    an array."""
    kind = _VALUES.get(type(value), type(value).__name__)
    if secret or kind in ("array", "table") or type(value) not in _VALUES:
        return kind
    if kind == "string":
        short = value if len(value) <= 40 else value[:37] + "..."
        return 'string "' + short.replace('"', '\\"') + '"'
    return f"{kind} {str(value).lower() if kind == 'boolean' else repr(value)}"


def _is_secret(path: Path) -> bool:
    return any(part in SECRET_FIELDS for part in path)


def _dotted(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + (part if _BARE_KEY.fullmatch(part) else f'"{part}"')
    return out


# --------------------------------------------------------------------------
# Semantic checks


def validate(settings: Settings) -> Settings:
    """Check ``settings`` against the declarations and the checks across fields.

    Returns a normalized copy (peer URLs completed, log level lower-cased);
    raises :class:`ConfigError` naming the offending key.
    """
    try:
        _decode(msgspec.to_builtins(settings, builtin_types=_TOML_TYPES, enc_hook=str))
        return _validate(copy.deepcopy(settings))
    except _Invalid as exc:
        raise ConfigError(exc.message, key=_dotted(exc.path)) from None


def _validate(s: Settings) -> Settings:
    """Check what the declarations cannot say (values that go together or need a
    parser) and normalize ``s`` in place; raise :class:`_Invalid`."""
    for i, role in enumerate(s.roles):
        if role in s.roles[:i]:
            raise _Invalid(("roles", i), f"role '{role}' listed twice")
    _at(("gateway", "listen"), parse_listen, s.gateway.listen)
    if bool(s.gateway.tls_cert) != bool(s.gateway.tls_key):
        missing = "tls_key" if s.gateway.tls_cert else "tls_cert"
        raise _Invalid(("gateway", missing), "tls_cert and tls_key go together: set both "
                       "(TLS) or neither (plain HTTP)")
    s.node.peers = [
        _at(("node", "peers", i), normalize_peer_url, peer) for i, peer in enumerate(s.node.peers)
    ]
    s.relay.peers = [
        _at(("relay", "peers", i), normalize_peer_url, peer)
        for i, peer in enumerate(s.relay.peers)
    ]
    for name in ("bootstrap_peers", "advertise"):
        setattr(s.network, name, [
            _at(("network", name, i), normalize_peer_url, peer)
            for i, peer in enumerate(getattr(s.network, name))
        ])
    if s.network.public_url:
        s.network.public_url = _at(("network", "public_url"), normalize_peer_url,
                                   s.network.public_url)
    if s.node.admin_listen:
        _at(("node", "admin_listen"), parse_listen, s.node.admin_listen)
    s.log_level = s.log_level.lower()
    _check_groups(s.gateway)
    alias_tiers(s.gateway.aliases)
    _check_cors(s.gateway.cors.allow_origins)
    if s.node.reconnect_max < s.node.reconnect_initial:
        raise _Invalid(("node", "reconnect_max"), "must be >= node.reconnect_initial")
    if s.relay.reconnect_max < s.relay.reconnect_initial:
        raise _Invalid(("relay", "reconnect_max"), "must be >= relay.reconnect_initial")
    return s


def _at(path: Path, check: Any, value: str) -> Any:
    """Run a ConfigError-raising check on one value, re-raising at ``path``."""
    try:
        return check(value)
    except ConfigError as exc:
        raise _Invalid(path, exc.message) from None


def _check_groups(gateway: GatewaySettings) -> None:
    """Group names well-formed; every join token (``join_token`` and the named
    ``join_tokens``, ungrouped and per group) used once, so a token admits to one group
    only, and named well; every group has a token; API keys valid and each in one group
    only."""
    tokens: dict[str, str] = {}
    _check_tokens(gateway.join_token, gateway.join_tokens, ("gateway",), "", tokens)
    keys: dict[bytes, str] = {}
    for name, group in gateway.groups.items():
        where: Path = ("gateway", "groups", name)
        if not GROUP_NAME.fullmatch(name):
            raise _Invalid(where, f"invalid group name '{name}' (1 to 64 characters: letters, "
                           "digits, '.', '_', '-')")
        if not group.join_token and not group.join_tokens:
            raise _Invalid((*where, "join_token"), "a group needs its own join token")
        _check_tokens(group.join_token, group.join_tokens, where, name, tokens)
        for i, key in enumerate(group.api_keys):
            try:
                digest = api_key_digest(key)
            except ValueError as exc:
                raise _Invalid((*where, "api_keys", i), str(exc)) from None
            owner = keys.get(digest)
            if owner is not None:
                raise _Invalid((*where, "api_keys", i), "key listed twice" if owner == name
                               else f"key already belongs to group '{owner}'")
            keys[digest] = name


MODEL_NAME = re.compile(r"[^\x00-\x20\x7f]{1,256}")
"""A model id or alias name: 1 to 256 characters, none blank or a control character."""
MAX_ALIAS_MODELS = 64
"""Most node model ids one alias expands to."""
Tiers = tuple[tuple[str, ...], ...]


def alias_tiers(aliases: Mapping[str, AliasTarget]) -> dict[str, Tiers]:
    """Each alias of ``[gateway.aliases]`` → its node model ids in tiers, tier 1 first.

    A value is one id (one tier of one), a list (one tier) or ``{tiers = [[...], ...]}``.
    A target naming another alias stands for all of that alias's ids (its tiers in
    order) at that place; an id reached twice is kept at its first place. Refused
    (:class:`_Invalid` at the alias's key): a malformed name, an alias listing itself,
    aliases that refer to each other in a cycle, an id listed twice, more than
    :data:`MAX_ALIAS_MODELS` ids."""
    declared: dict[str, list[list[str]]] = {}
    for name, value in aliases.items():
        where: Path = ("gateway", "aliases", name)
        if not MODEL_NAME.fullmatch(name):
            raise _Invalid(where, f"invalid alias name '{name}' (1 to 256 characters, "
                           "no spaces or control characters)")
        tiers = ([[value]] if isinstance(value, str) else [list(value)]
                 if isinstance(value, list) else [list(t) for t in value.tiers])
        seen: set[str] = set()
        for tier in tiers:
            if not tier:
                raise _Invalid(where, "an alias needs at least one model id")
            for target in tier:
                if not MODEL_NAME.fullmatch(target):
                    raise _Invalid(where, f"invalid model id '{target}' (1 to 256 "
                                   "characters, no spaces or control characters)")
                if target == name:
                    raise _Invalid(where, f"alias '{name}' may not list itself")
                if target in seen:
                    raise _Invalid(where, f"'{target}' is listed twice")
                seen.add(target)
        declared[name] = tiers
    resolved: dict[str, Tiers] = {}

    def resolve(name: str, chain: tuple[str, ...]) -> Tiers:
        done = resolved.get(name)
        if done is not None:
            return done
        out: list[tuple[str, ...]] = []
        seen: set[str] = set()
        for tier in declared[name]:
            ids: list[str] = []
            for target in tier:
                if target in chain:
                    raise _Invalid(("gateway", "aliases", chain[0]), "aliases form a cycle: "
                                   + " -> ".join([*chain, target]))
                expanded = ([i for sub in resolve(target, (*chain, target)) for i in sub]
                            if target in declared else [target])
                for model in expanded:
                    if model not in seen:
                        seen.add(model)
                        ids.append(model)
            if ids:
                out.append(tuple(ids))
        if len(seen) > MAX_ALIAS_MODELS:
            raise _Invalid(("gateway", "aliases", name),
                           f"expands to {len(seen)} model ids (at most {MAX_ALIAS_MODELS})")
        resolved[name] = result = tuple(out)
        return result

    for name in declared:
        resolve(name, (name,))
    return resolved


def _check_cors(origins: list[str]) -> None:
    """``gateway.cors.allow_origins``: ``"*"`` or ``scheme://host[:port]`` each, once."""
    for i, origin in enumerate(origins):
        where: Path = ("gateway", "cors", "allow_origins", i)
        if origin == "*":
            continue
        parts = urlsplit(origin)
        if (parts.scheme not in ("http", "https") or not parts.hostname
                or parts.path or parts.query or parts.fragment or parts.username
                or origin != origin.strip()):
            raise _Invalid(where, f"invalid origin '{origin}' (expected \"*\" or "
                           "scheme://host[:port], e.g. https://app.example, no path)")


def _check_tokens(token: str, named: dict[str, str], where: Path, group: str,
                  seen: dict[str, str]) -> None:
    """One group's (or the ungrouped) join tokens: names well-formed, ``default`` only
    for ``join_token``, no token empty or already used (``seen``: token → where)."""
    entries: list[tuple[Path, str]] = [((*where, "join_token"), token)] if token else []
    for name, value in named.items():
        at: Path = (*where, "join_tokens", name)
        if not GROUP_NAME.fullmatch(name):
            raise _Invalid(at, f"invalid token name '{name}' (1 to 64 characters: letters, "
                           "digits, '.', '_', '-')")
        if name == DEFAULT_TOKEN and token:
            raise _Invalid(at, f"'{DEFAULT_TOKEN}' names join_token; choose another name")
        if not value:
            raise _Invalid(at, "a join token must not be empty")
        entries.append((at, value))
    for at, value in entries:
        owner = seen.get(value)
        if owner is not None:
            raise _Invalid(at, f"the same token as {owner}; each group needs its own, and "
                           "each token is listed once")
        seen[value] = f"group '{group}'" if group else _dotted(at)


def _checked(value: str, hint: Any) -> Any:
    """``value`` checked against one declared type (for environment variables and flags)."""
    try:
        return _decode(value, hint)
    except _Invalid as exc:
        raise ConfigError(exc.message) from None


def _check_role(role: str) -> str:
    return str(_checked(role, Role))


def _check_log_level(level: str) -> str:
    return str(_checked(level, LogLevel)).lower()


_SWITCH = {"1": True, "true": True, "yes": True, "on": True,
           "0": False, "false": False, "no": False, "off": False}


def _parse_switch(value: str) -> bool:
    """An on/off option: 1/0, true/false, yes/no, on/off (``--no-access-log`` gives 0)."""
    switch = _SWITCH.get(value.strip().lower())
    if switch is None:
        raise ConfigError(f"expected 1 or 0 (true/false, yes/no, on/off), got '{value}'")
    return switch


def parse_listen(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6addr]:PORT`` for IPv6) into host and port 0..65535."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"invalid listen address '{text}' (expected HOST:PORT, port 0-65535)")
    return host, int(port)


def normalize_peer_url(url: str) -> str:
    """Check a ws:// or wss:// peer URL; a bare ``ws://host:port`` gets the tunnel path."""
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"invalid peer URL '{url}'") from None
    if parts.scheme not in ("ws", "wss"):
        raise ConfigError(f"peer URL '{url}' must start with ws:// or wss://")
    if not parts.hostname:
        raise ConfigError(f"peer URL '{url}' has no host")
    if parts.path in ("", "/"):
        parts = parts._replace(path=TUNNEL_PATH)
    return urlunsplit(parts)


def parse_backend_flag(text: str) -> BackendSettings:
    """Parse ``TYPE[=URL]`` (``openai=http://127.0.0.1:8000/v1``, ``simulated``)."""
    kind, sep, url = text.strip().partition("=")
    kind, url = kind.strip(), url.strip()
    if not kind or any(c.isspace() for c in kind):
        raise ConfigError(f"invalid backend '{text}' (expected TYPE[=URL])")
    if sep and not url:
        raise ConfigError(f"backend '{kind}': missing URL after '='")
    return BackendSettings(type=kind, url=url)


# --------------------------------------------------------------------------
# Environment and flags

_OPTIONS: dict[str, tuple[str, str]] = {
    # option: (environment variable, flag)
    "role": ("TOOTI_ROLE", "--role"),
    "listen": ("TOOTI_LISTEN", "--listen"),
    "peer": ("TOOTI_PEER", "--peer"),
    "backend": ("TOOTI_BACKEND", "--backend"),
    "join_token": ("TOOTI_JOIN_TOKEN", "--join-token"),
    "admin_key": ("TOOTI_ADMIN_KEY", "--admin-key"),
    "data_dir": ("TOOTI_DATA_DIR", "--data-dir"),
    "log_level": ("TOOTI_LOG_LEVEL", "--log-level"),
    "log_format": ("TOOTI_LOG_FORMAT", "--log-format"),
    "access_log": ("TOOTI_ACCESS_LOG", "--no-access-log"),
    "console": ("TOOTI_CONSOLE", "--console"),
    "node_id": ("TOOTI_NODE_ID", "--node-id"),
    "drain_grace": ("TOOTI_DRAIN_GRACE", "--drain-grace"),
    "plugins_dir": ("TOOTI_PLUGINS_DIR", "--plugins-dir"),
    "tls_cert": ("TOOTI_TLS_CERT", "--tls-cert"),
    "tls_key": ("TOOTI_TLS_KEY", "--tls-key"),
    "peer_ca": ("TOOTI_PEER_CA", "--peer-ca"),
    "auth": ("TOOTI_AUTH", "--auth"),
    "database": ("TOOTI_DATABASE", "--database"),
}
_LIST_OPTIONS = frozenset({"role", "peer", "backend"})


def apply_env(settings: Settings, environ: Mapping[str, str]) -> Settings:
    """Return a copy of ``settings`` overridden by ``TOOTI_*`` variables.

    List variables (TOOTI_ROLE, TOOTI_PEER, TOOTI_BACKEND) are comma-separated
    and replace the list. Empty variables count as unset. TOOTI_CONFIG is read
    by :func:`build_settings`, not here.
    """
    settings = copy.deepcopy(settings)
    for option, (var, _flag) in _OPTIONS.items():
        raw = environ.get(var, "").strip()
        if raw:
            values = [v.strip() for v in raw.split(",")] if option in _LIST_OPTIONS else [raw]
            _apply_option(settings, option, values, var)
    return settings


def _apply_flags(settings: Settings, args: argparse.Namespace) -> Settings:
    settings = copy.deepcopy(settings)
    for option, (_var, flag) in _OPTIONS.items():
        value = getattr(args, option, None)
        if value is None:
            continue
        values = list(value) if isinstance(value, list) else [value]
        if option == "role":  # --role gateway,node is the same as --role gateway --role node
            values = [r.strip() for v in values for r in v.split(",")]
        _apply_option(settings, option, values, flag)
    return settings


def _apply_option(s: Settings, option: str, values: list[str], source: str) -> None:
    """Set one flag/env option on ``s``; errors name ``source``."""
    value = values[-1]
    try:
        if option == "role":
            s.roles = _unique(_check_role(r) for r in values if r)
        elif option == "listen":
            parse_listen(value)
            s.gateway.listen = value
        elif option == "peer":
            s.node.peers = s.relay.peers = [normalize_peer_url(p) for p in values if p]
        elif option == "backend":
            s.node.backends = [parse_backend_flag(b) for b in values if b]
        elif option == "join_token":
            s.gateway.join_token = s.node.join_token = s.relay.join_token = value
        elif option == "admin_key":
            s.gateway.admin_key = value
        elif option == "data_dir":
            s.data_dir = value
        elif option == "log_level":
            s.log_level = _check_log_level(value)
        elif option == "log_format":
            s.log_format = str(_checked(value, LogFormat))
        elif option == "access_log":
            s.gateway.access_log = _parse_switch(value)
        elif option == "console":
            s.gateway.console = _parse_switch(value)
        elif option == "node_id":
            s.node.id = value
        elif option == "drain_grace":
            s.drain_grace = _parse_seconds(value)
        elif option == "plugins_dir":
            s.plugins_dir = value
        elif option == "tls_cert":
            s.gateway.tls_cert = value
        elif option == "tls_key":
            s.gateway.tls_key = value
        elif option == "peer_ca":
            s.network.peer_ca = value
        elif option == "auth":
            if value not in ("keys", "open"):
                raise ConfigError(f"unknown auth mode '{value}' (expected keys or open)")
            s.gateway.auth = value  # type: ignore[assignment]
        elif option == "database":
            s.gateway.database = value
        else:  # pragma: no cover - _OPTIONS and this chain must agree
            raise AssertionError(option)
    except ConfigError as exc:
        raise ConfigError(exc.message, source=source) from None


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _parse_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise ConfigError(f"expected a number of seconds, got '{text}'") from None
    if not seconds >= 0 or math.isinf(seconds):
        raise ConfigError(f"expected a finite number of seconds >= 0, got '{text}'")
    return seconds


def build_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Combine defaults < config file < environment < flags into validated Settings.

    The file is ``args.config``, else ``TOOTI_CONFIG``, else none (defaults).
    ``args`` attributes that are missing or None are treated as not given.
    """
    path = getattr(args, "config", None) or environ.get("TOOTI_CONFIG", "").strip()
    settings = load_file(path) if path else Settings()
    settings = _apply_flags(apply_env(settings, environ), args)
    return validate(settings)
