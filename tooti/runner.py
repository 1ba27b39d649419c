"""``tooti run``: every requested role in one ``trio.run``, with signal-driven drain.

Roles share one root nursery. A gateway and a node in the same process are
joined by an in-memory transport that speaks the same tunnel protocol as a
WebSocket. The first SIGINT/SIGTERM drains (gateway and node send GOAWAY,
in-flight streams get ``drain_grace`` seconds), then the process exits 0; a
second signal cancels everything at once and exits 130. SIGHUP builds the
settings again (the configuration file, the environment, the flags) and applies what
changed, all or nothing (:mod:`tooti.reload`), and reloads the TLS certificate.

A gateway opens ONE accounts database per process (``gateway.database``, else SQLite
at ``<data_dir>/tooti.sqlite3``; :func:`open_database`), makes sure the ``admin``
account exists, and shares the database with the billing plugins
(:attr:`BillingSetup.database`, with this gateway's :func:`gateway_id`: the
configured one, else a random id kept in ``<data_dir>/gateway-id``), its API key
cache and admin API, and the station's join-token directory; it is closed once the
roles (and billing) have finished. :func:`check_auth` refuses, before anything starts,
a gateway listening beyond loopback without ``gateway.auth``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import trio

from tooti.accounts.database import Database, DatabaseError
from tooti.accounts.join_directory import JoinTokenDirectory
from tooti.backends.base import Backend, BackendStartError
from tooti.billing.base import Billing, BillingSetup
from tooti.data_dir_lock import lock_data_dir
from tooti.gateway.app import Gateway
from tooti.gateway.auth import resolve_mode
from tooti.identity import DERIVED_PREFIX, RELAY_KEY_FILE, Identity
from tooti.logging_setup import setup_logging
from tooti.mesh.identity_store import IdentityStore
from tooti.mesh.station import Station
from tooti.node.admin import NodeAdmin
from tooti.node.node import Node
from tooti.relay.role import RelayRole
from tooti.reload import Rebuild, Reloader
from tooti.routing.base import RoutingPolicy
from tooti.settings import BackendSettings, Settings
from tooti.transport.memory import memory_pair

log = logging.getLogger("tooti")

EXIT_INTERRUPTED = 130


def effective_roles(settings: Settings) -> list[str]:
    """The roles to run: the configured ones, or gateway + node by default."""
    return list(dict.fromkeys(settings.roles)) or ["gateway", "node"]


def node_identity(settings: Settings) -> tuple[str, Identity]:
    """The node's keypair (kept in the data dir) and its id: the configured name, or
    the id derived from the key. A name may not take the derived-id prefix."""
    from tooti.config import ConfigError

    identity = Identity.load_or_create(Path(os.path.expanduser(settings.data_dir)))
    name = settings.node.id
    if name and name.startswith(DERIVED_PREFIX) and name != identity.id:
        raise ConfigError(f"ids starting with {DERIVED_PREFIX!r} are derived from the node's "
                          f"key; this node's is {identity.id}", key="node.id")
    return name or identity.id, identity


def check_plugin_names(settings: Settings) -> None:
    """Fail with a ConfigError naming the key if a backend type, routing policy or
    billing plugin is not provided by any loaded plugin."""
    from tooti import plugins
    from tooti.config import ConfigError

    loaded = plugins.get(settings.plugins_dir or None)
    checks: list[tuple[str, str, str, str]] = [
        ("tooti_routing_policies", settings.routing.policy, "routing policy", "routing.policy"),
    ]
    checks += [("tooti_billing", name, "billing plugin", f"billing.plugins[{i}]")
               for i, name in enumerate(settings.billing.plugins)]
    checks += [("tooti_backends", b.type, "backend type", f"node.backends[{i}].type")
               for i, b in enumerate(settings.node.backends)]
    for hook, name, what, key in checks:
        try:
            loaded.factory(hook, name, what)
        except plugins.PluginError as exc:
            raise ConfigError(str(exc), key=key) from None
    names = settings.billing.plugins
    if len(set(names)) < len(names) or {"credits", "usage-ledger"} <= set(names):
        raise ConfigError("a billing plugin is named twice ('usage-ledger' is the old name "
                          "of 'credits'): every request would be reserved and recorded "
                          "twice", key="billing.plugins")


def check_tls(settings: Settings) -> None:
    """Fail with a ConfigError naming the key if the TLS certificate and key the listener
    would serve, or the CA dialers would trust, cannot be used."""
    from tooti import tls
    from tooti.config import ConfigError

    roles = effective_roles(settings)
    try:
        if settings.gateway.tls_cert and ("gateway" in roles or "relay" in roles):
            tls.load_certificate(settings.gateway.tls_cert, settings.gateway.tls_key)
    except tls.TLSError as exc:
        raise ConfigError(str(exc), key="gateway.tls_cert") from None
    try:
        if settings.network.peer_ca and ("node" in roles or "relay" in roles):
            tls.client_context(settings.network.peer_ca)
    except tls.TLSError as exc:
        raise ConfigError(str(exc), key="network.peer_ca") from None


def check_auth(settings: Settings) -> None:
    """Fail with a ConfigError naming ``gateway.auth`` if a gateway would listen beyond
    loopback without an auth mode (see :func:`tooti.gateway.auth.resolve_mode`; an
    explicit ``open`` there is logged as a warning)."""
    if "gateway" in effective_roles(settings):
        resolve_mode(settings.gateway, warn=False)  # the gateway warns as it starts


GATEWAY_ID_FILE = "gateway-id"
"""In the data dir: this gateway's id when ``gateway.gateway_id`` is empty."""


def gateway_id(settings: Settings) -> str:
    """This gateway's name among those sharing a database: ``gateway.gateway_id``, else
    a random id (``gw-`` and 16 hex digits) made once and kept in
    ``<data_dir>/gateway-id``, so a restart is the same gateway (it reconciles its own
    leases) while two machines cloned from one image (one hostname) are not. Each
    gateway therefore needs its own data dir (as it does for its identity)."""
    if settings.gateway.gateway_id:
        return settings.gateway.gateway_id
    return stored_gateway_id(Path(os.path.expanduser(settings.data_dir)))


def stored_gateway_id(data_dir: Path) -> str:
    """The id in ``data_dir/gateway-id``, made (atomically: the first of two racing
    processes wins) if the file is missing or holds no usable id."""
    path = data_dir / GATEWAY_ID_FILE
    for _ in range(2):
        try:
            stored = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            stored = None
        if stored is not None and _usable_id(stored):
            return stored
        made = "gw-" + secrets.token_hex(8)
        data_dir.mkdir(parents=True, exist_ok=True)
        if stored is not None:  # unusable: replace it
            tmp = path.with_name(f".{GATEWAY_ID_FILE}.{os.getpid()}")
            tmp.write_text(made + "\n", encoding="utf-8")
            tmp.replace(path)
            log.warning("%s held no usable gateway id; it is now %s", path, made)
            return made
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue  # another process made it first: read theirs
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(made + "\n")
        return made
    raise RuntimeError(f"cannot read or make a gateway id in {path}")


def _usable_id(text: str) -> bool:
    return 0 < len(text) <= 128 and text.isprintable() and not any(c.isspace() for c in text)


def open_database(settings: Settings) -> Database:
    """The process's accounts database (``gateway.database``, else SQLite in the data
    dir), migrated. Raises ConfigError naming ``gateway.database`` if it cannot be used."""
    from tooti.config import ConfigError

    try:
        return Database(settings.gateway.database,
                        data_dir=Path(os.path.expanduser(settings.data_dir)))
    except DatabaseError as exc:
        raise ConfigError(str(exc), key="gateway.database") from None


def build_gateway_plugins(settings: Settings, database: Database | None = None,
                          ) -> tuple[RoutingPolicy, list[Billing]]:
    """The routing policy and billing plugins named in the settings (sharing
    ``database``, the process's accounts database)."""
    from tooti import plugins

    loaded = plugins.get(settings.plugins_dir or None)
    policy = loaded.factory("tooti_routing_policies", settings.routing.policy,
                            "routing policy")(dict(settings.routing.options))
    setup = BillingSetup(Path(os.path.expanduser(settings.data_dir)),
                         dict(settings.billing.options), database=database,
                         gateway_id=gateway_id(settings))
    billing = [loaded.factory("tooti_billing", name, "billing plugin")(setup)
               for name in settings.billing.plugins]
    return policy, billing


def build_backends(settings: Settings) -> list[Backend]:
    """Instantiate the node's backends (the embedded llamacpp one by default).

    Raises :class:`~tooti.config.ConfigError` naming the backend entry when a
    type is unknown or its extra is not installed.
    """
    from tooti.backends import create_backend
    from tooti.config import ConfigError

    configured = settings.node.backends or [BackendSettings(type="llamacpp")]
    backends = []
    for index, backend in enumerate(configured):
        try:
            backends.append(create_backend(backend))
        except (ValueError, ImportError, RuntimeError) as exc:
            raise ConfigError(str(exc), key=f"node.backends[{index}].type") from None
    return backends


@dataclass
class Process:
    """The live objects of one ``tooti run`` (exposed for tests and embedding)."""

    settings: Settings
    backends: list[Backend] | None = None
    """Pre-built node backends; None = build them from the settings."""
    gateway: Gateway | None = None
    relay: RelayRole | None = None
    node: Node | None = None
    node_admin: NodeAdmin | None = None
    """The admin API of a node-only process (``node.admin_listen``)."""
    database: Database | None = None
    """The accounts database of a gateway process (closed when the roles finish)."""
    urls: list[str] = field(default_factory=list)
    ready: trio.Event = field(default_factory=trio.Event)
    reloader: Reloader | None = None
    """Applies SIGHUP (made at the first one)."""

    @property
    def station(self) -> Station | None:
        """The accepting side (a gateway's, else a relay's), if the process has one."""
        if self.gateway is not None:
            return self.gateway.station
        return self.relay.station if self.relay is not None else None

    async def drain(self) -> None:
        """Drain every role: stop new work, let in-flight streams finish."""
        grace = self.settings.drain_grace
        async with trio.open_nursery() as nursery:
            if self.node is not None:
                nursery.start_soon(self.node.drain, grace)
            if self.relay is not None:
                nursery.start_soon(self.relay.drain, grace)
            if self.gateway is not None:
                # A relay sharing the gateway's station: its node tunnels close only once
                # the streams it forwards have finished (or the grace is over).
                also = [self.relay.upstream.wait_idle] if self.relay is not None else []
                nursery.start_soon(self.gateway.drain, grace, also)
        if self.node_admin is not None:
            self.node_admin.shutdown()


async def serve(
    process: Process, *, task_status: trio.TaskStatus[Process] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the process's roles until they all finish (after a drain) or are cancelled."""
    settings = process.settings
    roles = effective_roles(settings)
    try:
        if "gateway" in roles:
            process.database = open_database(settings)  # the gateway ensures "admin"
        await _serve_roles(process, roles, task_status)
    finally:
        if process.database is not None:  # after billing closed (the gateway's serve)
            process.database.close()


async def _serve_roles(process: Process, roles: list[str],
                       task_status: trio.TaskStatus[Process]) -> None:
    settings = process.settings
    async with trio.open_nursery() as nursery:
        relay_id, relay_key = relay_identity(settings) if "relay" in roles else ("", None)
        identities = (IdentityStore.in_data_dir(settings.data_dir)
                      if "gateway" in roles or "relay" in roles else None)
        if "gateway" in roles:
            database = process.database
            assert database is not None  # opened by serve()
            policy, billing = build_gateway_plugins(settings, database)
            station = Station(settings.gateway, settings.tunnel, network=settings.network,
                              identities=identities, roles=roles, local_id=relay_id,
                              join_directory=JoinTokenDirectory(database))
            gateway = process.gateway = Gateway(settings.gateway, settings.tunnel, policy,
                                                billing, station=station, database=database,
                                                gateway_id=gateway_id(settings))
            process.urls = await nursery.start(lambda task_status: gateway.serve(
                grace=settings.drain_grace, task_status=task_status))
        if relay_key is not None:
            process.relay = RelayRole(
                settings, relay_id, relay_key, identities=identities, roles=roles,
                station=process.gateway.station if process.gateway is not None else None)
            urls = await nursery.start(process.relay.serve)
            process.urls = process.urls or urls
        if "node" in roles:
            poll = min((b.poll_interval for b in settings.node.backends), default=30.0)
            backends = process.backends
            if backends is None:
                backends = build_backends(settings)
            name, identity = node_identity(settings)
            # Beside a relay the node attaches to it in memory; the relay dials upstream.
            process.node = Node(settings.node, settings.tunnel, backends, name,
                                poll_interval=poll, identity=identity, network=settings.network,
                                dial="relay" not in roles)
            await nursery.start(process.node.run)
            if process.gateway is None and settings.node.admin_listen:
                process.node_admin = NodeAdmin(process.node, settings.node.admin_listen,
                                               settings.gateway.admin_key)
                process.urls = await nursery.start(process.node_admin.serve)
            beside = process.station  # a gateway's or relay's in this process
            if beside is not None:
                beside.show_dialer(process.node.dialer)
                nursery.start_soon(_attach_local, beside, process.node)
                registry, local = beside.registry, process.node

                def local_routable() -> bool:
                    """The local node's model is routable here (ready, not loading), or it
                    has none ready nor loading (a sick backend: nothing to wait for)."""
                    peer = registry.peers.get(local.id)
                    if peer is not None and any(m.ready for m in peer.models.values()):
                        return True
                    return not local.models and not local.loading

                await registry.wait_until(local_routable)
        process.ready.set()
        task_status.started(process)
        if process.gateway is not None and process.node is not None and process.node.models:
            model = sorted(process.node.models)[0]
            print(ready_banner(process.urls[0], model,
                               process.node.models[model][0].type_name,
                               console=process.gateway.console is not None,
                               key_needed=process.gateway.auth.mode == "keys"), flush=True)


def relay_identity(settings: Settings) -> tuple[str, Identity]:
    """The relay's own keypair (a separate key file in the data dir, so a relay and a
    node in one process are two peers) and its id: the configured name, or derived."""
    from tooti.config import ConfigError

    identity = Identity.load_or_create(Path(os.path.expanduser(settings.data_dir)),
                                       RELAY_KEY_FILE)
    name = settings.relay.id
    if name and name.startswith(DERIVED_PREFIX) and name != identity.id:
        raise ConfigError(f"ids starting with {DERIVED_PREFIX!r} are derived from the "
                          f"relay's key; this relay's is {identity.id}", key="relay.id")
    return name or identity.id, identity


def ready_banner(url: str, model: str, backend_type: str = "",
                 command: str | None = None, *, console: bool = False,
                 key_needed: bool = False) -> str:
    """What a gateway with a local node prints once it is ready: the URL and model (first
    line, ``tooti is ready on URL serving MODEL.``), what the model is when it is the
    embedded Gemma 3 270M (a small base model for trying the network, not for good
    answers) or the simulated backend (no model at all), a working curl, where the TUI
    is (and the web console, when ``console``), and — for those two — how to serve a
    real model instead. ``key_needed`` (``--auth keys``): the curl sends a key, and the
    banner says how to make one.

    ``command`` is how to call tooti in the hints: by default the ``tooti`` script beside
    this interpreter (``.venv/bin/tooti`` after ``make run``, relative to the working
    directory when it is under it), else ``tooti``."""
    if command is None:
        script = Path(sys.executable).with_name("tooti")
        command = "tooti"
        if script.is_file():
            relative = os.path.relpath(script)
            command = relative if not relative.startswith("..") else str(script)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}],
                       "max_tokens": 32})
    address = url.partition("://")[2]
    listen = "" if address == "127.0.0.1:8080" else f" --listen {address}"
    lines = [f"tooti is ready on {url} serving {model}."]
    stand_in = backend_type in ("llamacpp", "simulated")
    if backend_type == "llamacpp" and model == "gemma-3-270m":
        lines.append(f"  {model} is Gemma 3 270M on the embedded llama.cpp: a small base "
                     "model for trying the network, not for good answers.")
    elif backend_type == "simulated":
        lines.append(f"  {model} is the simulated backend: made-up tokens, no model at all.")
    key = " -H \"authorization: Bearer $TOOTI_KEY\"" if key_needed else ""
    lines.append("Try it:")
    if key_needed:
        where = " (or on the console)" if console else ""
        lines.append(f"  (--auth keys: make a key with {command} keys create admin --name me"
                     f"{where} and export TOOTI_KEY=sk-tooti-…)")
    lines += [
        f"  curl {url}/v1/chat/completions{key} -H 'content-type: application/json' "
        f"-d '{body}'",
        "Watch it live:",
        f"  {command} tui --gateway {url}",
    ]
    if console:
        lines += [
            f"Web console: {url}/console (first sign-in: "
            f"{command} accounts login-link admin --gateway {url})",
        ]
    if stand_in:
        lines += [
            "Serve a real model: stop this (Ctrl-C) and point tooti at your model server:",
            f"  {command} run{listen} --backend openai=http://127.0.0.1:8000/v1"
            "   # vLLM, llama.cpp server, LM Studio",
            f"  {command} run{listen} --backend ollama=http://127.0.0.1:11434"
            "   # Ollama",
        ]
    return "\n".join(lines)


async def _attach_local(station: Station, node: Node) -> None:
    """Join an in-process node to an in-process gateway or relay, re-attaching if the
    session ends."""
    while not node.draining and not station.draining:
        dialer, acceptor = memory_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(station.admission.admit, acceptor)
            try:
                await node.serve_transport(dialer)
            except Exception as exc:  # the session failed; log and re-attach
                log.warning("in-process tunnel failed: %s", exc)
            nursery.cancel_scope.cancel()
        await trio.sleep(0.1)


def _reload_tls(process: Process) -> None:
    """SIGHUP: reload the listener's TLS certificate (a bad one is logged and the current
    one stays). Never raises: a failure must not end the signal loop, and the process
    with it."""
    station = process.station
    if station is not None and station.tls is not None:
        log.info("SIGHUP: reloading the TLS certificate")
        try:
            station.tls.reload()
        except Exception:  # a bug; the current certificate stays in use
            log.exception("reloading the TLS certificate failed; the current one stays in use")


def _check_reloaded(settings: Settings) -> None:
    """What ``tooti config check`` checks of a file beyond its schema (plugin names, TLS
    files), for SIGHUP; raises ConfigError."""
    check_plugin_names(settings)
    check_tls(settings)


async def main(settings: Settings, backends: list[Backend] | None = None,
               reload: Rebuild | None = None, config_file: str = "") -> int:
    """The async body of ``tooti run``; returns the exit code. ``reload`` builds the
    settings again as they were built for this run: SIGHUP applies what changed
    (:mod:`tooti.reload`, in a task of its own, so a reload never holds up a SIGTERM, and
    no failure of it ends the process) and reloads the TLS certificate; None: SIGHUP
    changes nothing but the certificate. ``config_file``: the file ``reload`` reads
    (empty: none; SIGHUP says so, as only the environment and flags are read again)."""
    process = Process(settings, backends)
    exit_code = 0
    roles = effective_roles(settings)
    reloader: Reloader | None = None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            roles_scope = trio.CancelScope()

            async def run_roles() -> None:
                with roles_scope:
                    await serve(process)
                nursery.cancel_scope.cancel()

            nursery.start_soon(run_roles)
            count = 0
            async for signum in signals:
                if signum == signal.SIGHUP:
                    if not process.ready.is_set():
                        log.warning("SIGHUP: still starting; the configuration is not read "
                                    "again (send SIGHUP once it is ready)")
                        continue
                    if reloader is None:
                        reloader = process.reloader = Reloader(
                            process, settings, reload, roles, check=_check_reloaded,
                            config_file=config_file)
                    reloader.request(nursery)
                    _reload_tls(process)
                    continue
                count += 1
                if count == 1:
                    log.info("%s: draining (grace %.0fs); send again to stop now",
                             signal.Signals(signum).name, settings.drain_grace)

                    async def drain_then_stop() -> None:
                        await process.drain()
                        roles_scope.cancel()

                    nursery.start_soon(drain_then_stop)
                else:
                    log.warning("second signal: stopping now")
                    exit_code = EXIT_INTERRUPTED
                    nursery.cancel_scope.cancel()
                    break
    return exit_code


def run(settings: Settings, reload: Rebuild | None = None, config_file: str = "") -> int:
    """Run ``tooti`` with ``settings``; returns the process exit code. ``reload``
    builds them again on SIGHUP from ``config_file`` (if any), the environment and the
    flags (see :func:`main`).

    Configuration problems raise :class:`~tooti.config.ConfigError` (the CLI
    prints them), as does a data dir another process holds (:mod:`tooti.data_dir_lock`:
    locked for the whole run); a port that cannot be bound is reported in one line, exit 1.
    """
    setup_logging(settings.log_level, settings.log_format,
                  access_log=settings.gateway.access_log)
    check_plugin_names(settings)
    check_tls(settings)
    check_auth(settings)
    # One process per data dir (its identity, gateway id, ledger), held until we return.
    with lock_data_dir(settings.data_dir):
        return _run_locked(settings, reload, config_file)


def _run_locked(settings: Settings, reload: Rebuild | None, config_file: str) -> int:
    backends = build_backends(settings) if "node" in effective_roles(settings) else None
    try:
        return trio.run(main, settings, backends, reload, config_file)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BaseException as exc:
        start = _first(exc, BackendStartError)
        if start is not None:  # e.g. the embedded model's server: its own message says why
            print(f"tooti: error: a backend could not start: {start}", file=sys.stderr)
            return 1
        failure = _first(exc, OSError)
        if failure is None:
            raise
        print(f"tooti: error: {describe_os_error(failure, settings)}", file=sys.stderr)
        return 1


LISTEN_HINT = ("another tooti? choose another with --listen or TOOTI_LISTEN / "
               "make run LISTEN=HOST:PORT")
"""What to do when ``gateway.listen`` is taken."""


def describe_os_error(failure: BaseException, settings: Settings) -> str:
    """The one-line message for an OSError that stopped ``tooti run``: a taken port names
    the address that could not be bound and what to do (the OS error names neither)."""
    if not isinstance(failure, OSError) or failure.errno != errno.EADDRINUSE:
        return str(failure)
    listens: dict[str, str] = {}  # address -> hint
    roles = effective_roles(settings)
    if "gateway" in roles or "relay" in roles:
        listens[settings.gateway.listen] = LISTEN_HINT
    elif "node" in roles and settings.node.admin_listen:
        listens[settings.node.admin_listen] = "another tooti? choose another node.admin_listen"
    taken = [address for address in listens if _taken(address)] or list(listens)
    if not taken:
        return str(failure)
    hints = dict.fromkeys(listens[address] for address in taken)
    return (f"cannot listen on {' or '.join(taken)}: address already in use "
            f"({'; '.join(hints)})")


def _taken(address: str) -> bool:
    """True if ``HOST:PORT`` cannot be bound now because it is in use (a probe: bind and
    close, with SO_REUSEADDR as the listener does)."""
    from tooti.config import ConfigError, parse_listen

    try:
        host, port = parse_listen(address)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (ConfigError, OSError):
        return False
    for family, kind, proto, _name, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


def _first(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of ``kind`` inside (possibly nested) exception groups."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first(inner, kind)
            if found is not None:
                return found
    return None
