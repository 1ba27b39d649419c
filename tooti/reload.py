"""SIGHUP in ``tooti run``: read the configuration again and apply it, all or nothing.

The settings are built again exactly as at start (the same file, environment and
flags), then, in two phases:

1. **Plan and build** (:func:`plan_reload`, :meth:`Reloader.reload`): the changed keys
   are split into those this process applies live and those that need a restart, and
   everything the new configuration needs is built before anything is swapped: the
   routing policy (by the plugin factory), the API key table (``gateway.auth`` is
   resolved again), and the node's new backend objects (started). A file that does not
   load or validate, an unknown plugin name, a policy whose options its factory refuses,
   a backend that cannot be built or started: one ERROR line with the message ``tooti
   config check`` prints, and the whole running configuration stays in force.
2. **Apply**: the node's backends first (the one step that can be refused: then
   nothing is applied), then each role swaps what it reads per request, in one step
   with no checkpoint in between for the gateway and the station, so each value read is
   wholly old or wholly new; a request that spans the reload reads each value when it
   needs it (its body timeout before, its request timeout after, say), so it may see
   some old values and some new. Nothing already under way is interrupted: tunnels stay up,
   a stream in flight keeps the node and the backend it had, a request already queued
   keeps its deadline.

**Applied live** (by the roles that use them):

* keys: ``gateway.admin_key`` (the ``/v1`` master key, the admin API of a gateway, a
  relay or a node's ``node.admin_listen``), ``gateway.auth``, the static
  ``[gateway.groups.*].api_keys``: a key removed is refused from the next request on
  (the configured keys are matched before the database's cache, so no cache keeps a
  removed one); join tokens (new tunnels are admitted by the new set; a tunnel already
  up stays up until it reconnects, as at rotation);
* groups: ``[gateway.groups.*]`` added, removed or changed. A request is routed by the
  group its key names now; a removed group's keys are refused, so its nodes (whose
  tunnels stay until they reconnect, and are then refused with its token) get no new
  request. A group name configured once stays reserved for the process's life, so no
  database group can take over nodes still joined under it;
* limits: the request-path limits and timeouts of ``[gateway]`` and the listener's
  connection limits and timeouts (see :data:`GATEWAY_LIVE`): new requests and
  connections see the new values, those under way may keep theirs;
* ``[routing]``: the new policy ranks every pick from now on;
* ``[gateway.aliases]`` and ``[gateway.cors]``: new requests are routed by the new
  aliases (``/v1/models`` lists them at once) and answered by the new CORS origins;
* ``[[node.backends]]``: an entry unchanged keeps its backend object (an embedded model
  is not loaded again); a new or changed entry gets a new backend, started before the
  swap; new requests use the new set, the models are announced to every gateway at
  once, and a removed backend is closed once its streams have finished;
* ``log_level``.

Everything else (``listen``, ``data_dir``, ``gateway.database``, ``roles``,
``tunnel.*``, TLS paths, ``relay.*``, ``node.peers``, …) is named in one WARNING
as needing a restart: key names only, never values. The TLS certificate's *files* are
re-read on SIGHUP anyway (:mod:`tooti.tls`). One INFO line says what was applied.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import trio

from tooti.config import ConfigError
from tooti.settings import BackendSettings, Settings

if TYPE_CHECKING:
    from tooti.backends.base import Backend
    from tooti.gateway.app import Gateway
    from tooti.gateway.auth import Authenticator
    from tooti.mesh.join_tokens import TokenChanges
    from tooti.mesh.station import Station
    from tooti.node.admin import NodeAdmin
    from tooti.node.node import Node
    from tooti.routing.base import RoutingPolicy

log = logging.getLogger("tooti")

Rebuild = Callable[[], Settings]
"""Builds the settings again, the way ``tooti run`` first built them; raises
:class:`~tooti.config.ConfigError`."""

JOIN_TOKENS = ("gateway.join_token", "gateway.join_tokens", "gateway.groups")
"""The keys that hold join tokens (a station reloads them)."""
GATEWAY_LIVE = frozenset({
    "gateway.admin_key", "gateway.auth", *JOIN_TOKENS,
    "gateway.reserve_completion_tokens", "gateway.max_body_bytes", "gateway.max_json_depth",
    "gateway.body_timeout", "gateway.max_attempts", "gateway.first_byte_timeout",
    "gateway.request_timeout", "gateway.queue_timeout", "gateway.max_queue",
    "gateway.max_response_bytes", "gateway.max_buffered_bytes", "gateway.buffer_wait",
    "gateway.prompt_token_allowance", "gateway.media_token_allowance",
    "gateway.cooldown_failures", "gateway.cooldown_window", "gateway.cooldown_seconds",
    "gateway.cooldown_max_seconds", "gateway.tunnel_handshake_rate",
    "gateway.tunnel_handshake_burst", "gateway.tunnel_handshakes_per_ip",
    "gateway.header_timeout", "gateway.keep_alive_timeout", "gateway.send_timeout",
    "gateway.max_connections", "gateway.max_connections_per_ip",
    "gateway.connection_rate", "gateway.connection_burst",
    "routing.policy", "routing.options", "gateway.aliases", "gateway.cors",
})
"""What a gateway applies on SIGHUP."""
RELAY_LIVE = frozenset({
    "gateway.admin_key", *JOIN_TOKENS, "gateway.tunnel_handshake_rate",
    "gateway.tunnel_handshake_burst", "gateway.tunnel_handshakes_per_ip",
    "gateway.header_timeout", "gateway.keep_alive_timeout", "gateway.send_timeout",
    "gateway.max_connections", "gateway.max_connections_per_ip",
    "gateway.connection_rate", "gateway.connection_burst",
})
"""What a relay (its station) applies on SIGHUP."""
NODE_LIVE = frozenset({"node.backends"})
"""What a node applies on SIGHUP (and ``gateway.admin_key`` with ``node.admin_listen``)."""
ANY_LIVE = frozenset({"log_level"})
"""What every process applies on SIGHUP."""


def live_keys(roles: Iterable[str], node_admin: bool = False) -> frozenset[str]:
    """The settings a process running ``roles`` applies on SIGHUP (with ``node_admin``: a
    node-only process serving ``node.admin_listen``, whose admin key reloads too)."""
    live = set(ANY_LIVE)
    roles = set(roles)
    if "gateway" in roles:
        live |= GATEWAY_LIVE
    if "relay" in roles:
        live |= RELAY_LIVE
    if "node" in roles:
        live |= NODE_LIVE
        if node_admin:
            live.add("gateway.admin_key")
    return frozenset(live)


@dataclass
class Plan:
    """What one reload does, before anything is built."""

    settings: Settings
    """What the process runs by afterwards: the running settings with every live key
    taken from the file (the keys that need a restart keep their running values)."""
    applied: list[str] = field(default_factory=list)
    """Changed keys applied live (dotted names, finer than :data:`GATEWAY_LIVE` where
    the change is inside a table: ``gateway.groups.blue.api_keys``)."""
    restart: list[str] = field(default_factory=list)
    """Changed keys that need a restart."""

    def changed(self, *units: str) -> bool:
        """True if a key applied is one of ``units`` or inside one."""
        return any(_unit_of(key, units) is not None for key in self.applied)


def plan_reload(running: Settings, loaded: Settings, live: Iterable[str]) -> Plan:
    """Split the differences between ``running`` and ``loaded`` into what ``live`` (see
    :func:`live_keys`) applies and what needs a restart, and the settings to run by."""
    units = tuple(live)
    plan = Plan(copy.deepcopy(running))
    taken: set[str] = set()
    for key in differences(running, loaded):
        unit = _unit_of(key, units)
        if unit is None:
            plan.restart.append(key)
            continue
        plan.applied.append(key)
        if unit not in taken:
            taken.add(unit)
            _set(plan.settings, unit, copy.deepcopy(_get(loaded, unit)))
    return plan


def restart_keys(running: Settings, loaded: Settings) -> list[str]:
    """The dotted keys whose value differs between ``running`` and ``loaded`` that a
    gateway does not apply live."""
    return plan_reload(running, loaded, live_keys(["gateway"])).restart


def differences(old: Any, new: Any, where: str = "") -> list[str]:
    """Where two settings values differ (dotted keys): recursing into settings Structs
    and tables of them."""
    if isinstance(old, msgspec.Struct) and type(old) is type(new):
        return [key for name in old.__struct_fields__
                for key in differences(getattr(old, name), getattr(new, name),
                                       f"{where}.{name}" if where else name)]
    if (isinstance(old, dict) and isinstance(new, dict)
            and any(isinstance(v, msgspec.Struct) for v in (*old.values(), *new.values()))):
        return [key for name in sorted(old.keys() | new.keys())
                for key in ([f"{where}.{name}"] if (name in old) != (name in new)
                            else differences(old[name], new[name], f"{where}.{name}"))]
    return [] if old == new else [where]


def _unit_of(key: str, units: Sequence[str]) -> str | None:
    for unit in units:
        if key == unit or key.startswith(unit + "."):
            return unit
    return None


def _get(settings: Settings, dotted: str) -> Any:
    value: Any = settings
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _set(settings: Settings, dotted: str, value: Any) -> None:
    *parents, name = dotted.split(".")
    target: Any = settings
    for part in parents:
        target = getattr(target, part)
    setattr(target, name, value)


def configured_backends(settings: Settings) -> list[BackendSettings]:
    """The backend entries a node runs (the embedded ``llamacpp`` one when none is set),
    in the order of its backend objects."""
    return list(settings.node.backends) or [BackendSettings(type="llamacpp")]


class Roles(Protocol):
    """The live roles of one ``tooti run`` (:class:`tooti.runner.Process`)."""

    gateway: Gateway | None
    node: Node | None
    node_admin: NodeAdmin | None

    @property
    def station(self) -> Station | None: ...


@dataclass
class _Built:
    """What a reload built before swapping anything."""

    plan: Plan
    policy: RoutingPolicy | None = None
    auth: Authenticator | None = None
    """The gateway's new key table (built before the station or gateway changes)."""
    backends: list[Backend] | None = None
    """The node's whole new backend list (None: unchanged)."""
    started: list[Backend] = field(default_factory=list)
    """The new backend objects among them (started)."""
    entries: list[BackendSettings] = field(default_factory=list)
    removed: int = 0
    """Backends of the node that the new list drops (closed after their streams)."""


class Reloader:
    """Applies SIGHUP to one process (see the module docstring). One reload runs at a
    time; signals that arrive meanwhile are folded into one more reload after it."""

    def __init__(self, roles: Roles, running: Settings, rebuild: Rebuild | None,
                 role_names: Sequence[str],
                 check: Callable[[Settings], None] = lambda settings: None,
                 config_file: str = "") -> None:
        """``check`` validates a loaded configuration beyond its schema as ``tooti config
        check`` does (plugin names, TLS files; raises ConfigError); ``config_file``: the
        file ``rebuild`` reads (empty: none, only the environment and flags: the log
        line of a reload says so)."""
        self.config_file = config_file
        self.roles = roles
        self.check = check
        self.running = running
        """The settings in force (replaced by each reload)."""
        self.rebuild = rebuild
        self.role_names = list(role_names)
        node = roles.node
        entries = configured_backends(running)
        self._entries: list[BackendSettings] | None = (
            entries if node is not None and len(entries) == len(node.backends) else None)
        """The entry of each of the node's backend objects (None: not known, e.g.
        backends given pre-built; then every entry is built anew on a change)."""
        self._pending = False
        self._busy = False
        self.reloads = 0
        """Reloads finished (applied, refused or failed), for tests."""
        self.finished = trio.Event()
        """Set (and replaced) each time a reload finishes."""

    def request(self, nursery: trio.Nursery) -> None:
        """SIGHUP arrived: reload in a task of ``nursery`` (or once more after the one
        under way). Never raises."""
        self._pending = True
        if not self._busy:
            self._busy = True
            nursery.start_soon(self._run)

    async def _run(self) -> None:
        try:
            while self._pending:
                self._pending = False
                try:
                    await self.reload()
                except Exception:  # a bug: the configuration in force stays
                    log.exception("SIGHUP: reloading the configuration failed; the current "
                                  "configuration stays in force")
                self.reloads += 1
                self.finished.set()
                self.finished = trio.Event()
        finally:
            self._busy = False

    async def reload(self) -> None:
        """Read the configuration again and apply it, all or nothing (logs the outcome;
        raises only on a bug)."""
        if self.rebuild is None:
            log.info("SIGHUP: no configuration to read again; nothing changes")
            return
        station, node = self.roles.station, self.roles.node
        if (station is not None and station.draining) or (node is not None and node.draining):
            log.info("SIGHUP: shutting down; the configuration is not read again")
            return
        try:
            loaded = self.rebuild()
            built = await self._build(loaded)
        except ConfigError as exc:
            log.error("SIGHUP: configuration not reloaded, the current one stays in force: "
                      "%s", exc)
            return
        if built.backends is not None:  # first: the one step of applying that can fail
            assert node is not None
            try:
                await node.replace_backends(built.backends,
                                            min((b.poll_interval for b in built.entries),
                                                default=node.poll_interval))
            except BaseException:
                if node.backends is not built.backends:  # refused before the swap
                    with trio.CancelScope(shield=True), trio.move_on_after(5):
                        for backend in built.started:
                            await _close_quietly(backend)
                    raise
                self._apply(built)  # swapped: the node runs the new list from now on
                raise
        self._apply(built)

    async def _build(self, loaded: Settings) -> _Built:
        """Check ``loaded`` and build what it needs (raises ConfigError, having closed
        anything it built)."""
        self.check(loaded)  # what ``tooti config check`` checks beyond the schema
        plan = plan_reload(self.running, loaded,
                           live_keys(self.role_names, self.roles.node_admin is not None))
        built = _Built(plan)
        gateway = self.roles.gateway
        if gateway is not None:
            from tooti.gateway.auth import resolve_mode

            resolve_mode(plan.settings.gateway, warn=False)  # ConfigError naming the key
            if plan.changed("routing.policy", "routing.options"):
                built.policy = build_policy(plan.settings)
            built.auth = build_auth(plan.settings, gateway)
        if self.roles.node is not None and plan.changed("node.backends"):
            await self._build_backends(built)
        return built

    async def _build_backends(self, built: _Built) -> None:
        """The node's new backend list: an unchanged entry keeps its object, a new or
        changed one gets a new backend, started here (all closed again on a failure)."""
        from tooti.backends import create_backend

        node = self.roles.node
        assert node is not None
        if not node.backends_settled():
            raise ConfigError("a backend is still starting (loading its model): send "
                              "SIGHUP again once it serves", key="node.backends")
        old = list(zip(self._entries, node.backends, strict=True)) if self._entries else []
        entries = configured_backends(built.plan.settings)
        backends: list[Backend] = []
        try:
            for index, entry in enumerate(entries):
                same = next((pair for pair in old if pair[0] == entry), None)
                if same is not None:
                    old.remove(same)
                    backends.append(same[1])
                    continue
                try:
                    backend = create_backend(entry)
                except (ValueError, ImportError, RuntimeError) as exc:
                    raise ConfigError(str(exc), key=f"node.backends[{index}].type") from None
                built.started.append(backend)
                backends.append(backend)
                try:
                    await backend.start()
                except Exception as exc:
                    raise ConfigError(f"the backend cannot start: {exc}",
                                      key=f"node.backends[{index}]") from None
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                for backend in built.started:
                    await _close_quietly(backend)
            raise
        kept = len(backends) - len(built.started)
        built.backends, built.entries = backends, entries
        built.removed = len(node.backends) - kept

    def _apply(self, built: _Built) -> None:
        """Swap everything at once (no checkpoint) and log what was applied."""
        plan, roles = built.plan, self.roles
        settings = plan.settings
        tokens: TokenChanges | None = None
        if plan.changed("log_level"):
            logging.getLogger().setLevel(getattr(logging, settings.log_level.upper()))
        station = roles.station
        if station is not None:
            tokens = station.reload_settings(settings.gateway)
        if roles.gateway is not None:
            roles.gateway.reload(settings.gateway, built.policy, auth=built.auth)
        if roles.node_admin is not None and plan.changed("gateway.admin_key"):
            roles.node_admin.reload_admin_key(settings.gateway.admin_key)
        if built.backends is not None:
            self._entries = built.entries
        self.running = settings
        if plan.applied:
            done = ", ".join(plan.applied)
        else:  # the restart WARNING below names what did change
            done = "nothing applied live" if plan.restart else "nothing changed"
        if not self.config_file:
            done += " (no configuration file: the environment and flags were read again)"
        if built.backends is not None:
            done += (f" (backends: {len(built.started)} new, {built.removed} removed, "
                     f"{len(built.backends) - len(built.started)} kept)")
        if tokens is not None:
            named = [f"{what} {', '.join(names)}" for what, names in
                     (("added", tokens.added), ("removed", tokens.removed),
                      ("replaced", tokens.replaced)) if names]
            if named:
                done += f"; join tokens {'; '.join(named)} (tunnels already up stay up " \
                        "until they reconnect)"
        log.info("SIGHUP: configuration reloaded: %s", done)
        if plan.restart:
            log.warning("SIGHUP: changed settings need a restart to apply: %s",
                        ", ".join(plan.restart))


def build_auth(settings: Settings, gateway: Gateway) -> Authenticator:
    """The key table ``settings`` give ``gateway`` (raises ConfigError naming
    ``gateway.auth`` if they resolve to no auth mode)."""
    from tooti.gateway.auth import Authenticator

    return Authenticator(settings.gateway, gateway.keys)


def build_policy(settings: Settings) -> RoutingPolicy:
    """The routing policy ``settings`` name, built by its plugin's factory (as
    :func:`tooti.runner.build_gateway_plugins` does). Raises ConfigError naming the key
    if the name is unknown or the factory refuses the options."""
    from tooti import plugins

    loaded = plugins.get(settings.plugins_dir or None)
    try:
        factory = loaded.factory("tooti_routing_policies", settings.routing.policy,
                                 "routing policy")
    except plugins.PluginError as exc:
        raise ConfigError(str(exc), key="routing.policy") from None
    try:
        policy: RoutingPolicy = factory(dict(settings.routing.options))
    except Exception as exc:
        raise ConfigError(f"the routing policy refused its options: {exc}",
                          key="routing.options") from None
    return policy


async def _close_quietly(backend: Backend) -> None:
    try:
        await backend.close()
    except Exception as exc:  # closing a backend that never served: nothing to keep
        log.debug("closing an unused backend failed: %s", exc)
