"""Load, validate and override :class:`tooti.settings.Settings`.

Sources, highest precedence first: command-line flags, ``TOOTI_*`` environment
variables, a TOML file, the dataclass defaults. The TOML file is validated
generically against the dataclasses in :mod:`tooti.settings` (their type hints
are the schema), and every error names the file, line and dotted key::

    tooti.toml:12: gateway.max_body_bytes: expected integer, got string "big"

``tomllib`` reports no positions for parsed keys, so :func:`_locate_keys` scans
the source text for table headers and ``key =`` lines to find them.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit, urlunsplit

from tooti.groups import DEFAULT_TOKEN, GROUP_NAME, api_key_digest
from tooti.settings import ROLES, BackendSettings, GatewaySettings, Settings

TUNNEL_PATH = "/tooti/v1/tunnel"
LOG_LEVELS = ("debug", "info", "warning", "error")
SECRET_FIELDS = frozenset({"join_token", "join_tokens", "admin_key", "api_key",
                           "discover_token", "api_keys"})
"""Field names whose values never appear in messages."""
_MAY_BE_ZERO = frozenset({"drain_grace", "price_input", "price_output", "relay_strikes"})
"""Numeric fields allowed to be 0; every other int/float field must be > 0."""

Path = tuple[str | int, ...]
"""A key path into the TOML document: table keys, and indexes into arrays."""


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
        return _validate(_build(Settings, data, ()))
    except _Invalid as exc:
        raise ConfigError(
            exc.message,
            source=source,
            line=_line_of(_locate_keys(text), exc.path),
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
# Generic validation against the settings dataclasses


def _build(cls: type[Any], table: Mapping[str, Any], path: Path) -> Any:
    """Construct dataclass ``cls`` from a TOML table, type-checking every key."""
    hints = get_type_hints(cls)
    known = sorted(f.name for f in dataclasses.fields(cls))
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        where = (*path, key)
        if key not in known:
            msg = f"unknown key '{_dotted(where)}' (known: {', '.join(known)})"
            if close := difflib.get_close_matches(key, known, n=1):
                msg += f"; did you mean '{close[0]}'?"
            raise _Invalid(where, msg, show_key=False)
        kwargs[key] = _convert(value, hints[key], where)
    return cls(**kwargs)


def _convert(value: Any, hint: Any, path: Path) -> Any:
    """Check ``value`` against type ``hint``; return it converted (int -> float)."""
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise _type_error(path, "table", value)
        return _build(hint, value, path)  # type: ignore[arg-type]
    origin, args = get_origin(hint), get_args(hint)
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(path, "array", value)
        return [_convert(item, args[0], (*path, i)) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(path, "table", value)
        return {k: _convert(v, args[1], (*path, k)) for k, v in value.items()}
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    if hint in (bool, int, float, str):
        raise _type_error(path, _TYPE_NAMES[hint], value)
    raise TypeError(f"unsupported settings type {hint!r} at {_dotted(path)}")


_TYPE_NAMES: dict[Any, str] = {bool: "boolean", int: "integer", float: "number", str: "string"}


def _type_error(path: Path, expected: str, value: Any) -> _Invalid:
    return _Invalid(path, f"expected {expected}, got {_describe(value, _is_secret(path))}")


def _describe(value: Any, secret: bool = False) -> str:
    """Name a TOML value's type, with the value itself unless it is secret."""
    if isinstance(value, bool):
        kind, shown = "boolean", str(value).lower()
    elif isinstance(value, int):
        kind, shown = "integer", str(value)
    elif isinstance(value, float):
        kind, shown = "float", repr(value)
    elif isinstance(value, str):
        short = value if len(value) <= 40 else value[:37] + "..."
        kind, shown = "string", '"' + short.replace('"', '\\"') + '"'
    elif isinstance(value, list):
        return "array"
    elif isinstance(value, dict):
        return "table"
    else:
        return type(value).__name__
    return kind if secret else f"{kind} {shown}"


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
    """Check value constraints (roles, listen, peers, positive numbers, log level).

    Returns a normalized copy (peer URLs completed, log level lower-cased);
    raises :class:`ConfigError` naming the offending key.
    """
    try:
        return _validate(copy.deepcopy(settings))
    except _Invalid as exc:
        raise ConfigError(exc.message, key=_dotted(exc.path)) from None


def _validate(s: Settings) -> Settings:
    """Check and normalize ``s`` in place; raise :class:`_Invalid`."""
    seen: set[str] = set()
    for i, role in enumerate(s.roles):
        _at(("roles", i), _check_role, role)
        if role in seen:
            raise _Invalid(("roles", i), f"role '{role}' listed twice")
        seen.add(role)
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
    s.log_level = _at(("log_level",), _check_log_level, s.log_level)
    for i, backend in enumerate(s.node.backends):
        if not backend.type:
            raise _Invalid(("node", "backends", i, "type"), "backend type must not be empty")
    _check_groups(s.gateway)
    _check_numbers(s, ())
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


def _check_numbers(obj: Any, path: Path) -> None:
    """Require every int/float field to be > 0 (>= 0 for :data:`_MAY_BE_ZERO`)."""
    for f in dataclasses.fields(obj):
        value, where = getattr(obj, f.name), (*path, f.name)
        if dataclasses.is_dataclass(value):
            _check_numbers(value, where)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _check_numbers(item, (*where, i))
        elif isinstance(value, dict):
            for key, item in value.items():
                if dataclasses.is_dataclass(item):
                    _check_numbers(item, (*where, key))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            if f.name in _MAY_BE_ZERO:
                if not value >= 0:
                    raise _Invalid(where, f"must be >= 0, got {value}")
            elif not value > 0:
                raise _Invalid(where, f"must be > 0, got {value}")


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


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise ConfigError(f"unknown role '{role}' (expected one of: {', '.join(ROLES)})")
    return role


def _check_log_level(level: str) -> str:
    if level.lower() not in LOG_LEVELS:
        raise ConfigError(f"unknown log level '{level}' (expected one of: {', '.join(LOG_LEVELS)})")
    return level.lower()


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
    "node_id": ("TOOTI_NODE_ID", "--node-id"),
    "drain_grace": ("TOOTI_DRAIN_GRACE", "--drain-grace"),
    "plugins_dir": ("TOOTI_PLUGINS_DIR", "--plugins-dir"),
    "tls_cert": ("TOOTI_TLS_CERT", "--tls-cert"),
    "tls_key": ("TOOTI_TLS_KEY", "--tls-key"),
    "peer_ca": ("TOOTI_PEER_CA", "--peer-ca"),
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


# --------------------------------------------------------------------------
# Locating keys in the TOML source

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_KEY_PART = re.compile(r"""\s*(?:([A-Za-z0-9_-]+)|"((?:[^"\\]|\\.)*)"|'([^']*)')\s*""")


def _line_of(lines: dict[Path, int], path: Path) -> int | None:
    """The line of ``path``, else of its nearest located ancestor."""
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def _locate_keys(text: str) -> dict[Path, int]:
    """Map key paths to the (1-based) line where they are defined.

    Understands ``[a.b]`` and ``[[a.b]]`` headers (the n-th ``[[a.b]]`` is
    element n-1), ``key =`` and ``a.b =`` lines, and skips multi-line arrays,
    inline tables and strings. Keys inside inline tables map to their line via
    the parent key.
    """
    found: dict[Path, int] = {}
    counts: dict[Path, int] = {}  # array-of-tables path -> elements seen so far
    table: Path = ()
    src = text.splitlines()
    i = 0
    while i < len(src):
        lineno, line = i + 1, src[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            is_array = line.startswith("[[")
            start = 2 if is_array else 1
            end = _find_unquoted(line, "]]" if is_array else "]", start)
            keys = _split_key(line[start:end]) if end >= 0 else None
            if not keys:
                continue
            table = (*_resolve(keys[:-1], counts), keys[-1])
            found.setdefault(table, lineno)
            if is_array:
                index = counts.get(table, 0)
                counts[table] = index + 1
                table = (*table, index)
                found[table] = lineno
            continue
        eq = _find_unquoted(line, "=", 0)
        keys = _split_key(line[:eq]) if eq > 0 else None
        if not keys:
            continue
        path = table + tuple(keys)
        for end in range(len(table) + 1, len(path) + 1):
            found.setdefault(path[:end], lineno)
        i = _skip_value(src, i, line[eq + 1 :])
    return found


def _resolve(keys: list[str], counts: dict[Path, int]) -> Path:
    """Turn header keys into a path, entering the last element of each array of tables."""
    path: Path = ()
    for key in keys:
        path = (*path, key)
        if path in counts:
            path = (*path, counts[path] - 1)
    return path


def _split_key(text: str) -> list[str] | None:
    """Split a (possibly dotted, possibly quoted) TOML key; None if it is not one."""
    keys, pos = [], 0
    while True:
        m = _KEY_PART.match(text, pos)
        if not m or m.end() == pos:
            return None
        bare, basic, literal = m.groups()
        keys.append(bare if bare is not None else basic if basic is not None else literal)
        pos = m.end()
        if pos == len(text):
            return keys
        if text[pos] != ".":
            return None
        pos += 1


def _find_unquoted(line: str, target: str, start: int) -> int:
    """Index of ``target`` in ``line`` outside quoted strings, or -1."""
    quote: str | None = None
    j = start
    while j < len(line):
        c = line[j]
        if quote:
            if c == "\\" and quote == '"':
                j += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif line.startswith(target, j):
            return j
        j += 1
    return -1


def _skip_value(src: list[str], i: int, text: str) -> int:
    """Return the index of the first line after the value starting with ``text``.

    ``i`` indexes the line after the one holding ``text``; arrays, inline
    tables and triple-quoted strings may continue over several lines.
    """
    depth, quote = 0, ""
    while True:
        j = 0
        while j < len(text):
            if quote in ('"""', "'''"):
                if text.startswith(quote, j):
                    quote, j = "", j + 3
                    continue
                j += 2 if quote == '"""' and text[j] == "\\" else 1
                continue
            if quote:
                if text[j] == "\\" and quote == '"':
                    j += 1
                elif text[j] == quote:
                    quote = ""
                j += 1
                continue
            if text.startswith('"""', j) or text.startswith("'''", j):
                quote, j = text[j : j + 3], j + 3
                continue
            c = text[j]
            if c == "#":
                break
            if c in "\"'":
                quote = c
            elif c in "[{":
                depth += 1
            elif c in "]}":
                depth -= 1
            j += 1
        if quote in ('"', "'"):
            quote = ""  # single-line strings cannot span lines
        if (depth <= 0 and not quote) or i >= len(src):
            return i
        text = src[i]
        i += 1
