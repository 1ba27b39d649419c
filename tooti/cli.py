"""The ``tooti`` command line: ``tooti run``, ``tooti config check``, ``tooti peers``,
``tooti nodes disable|enable|drain ID`` (a running gateway's peer control, see
:mod:`tooti.admin.peer_control`) and more; the accounts commands are in
:mod:`tooti.cli_accounts`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from tooti import __version__
from tooti.cli_completion import offer
from tooti.config import ConfigError, build_settings, load_file
from tooti.settings import LOG_FORMATS, LOG_LEVELS, ROLES

TUI_MODULES = frozenset({"textual", "rich"})
"""The third-party packages ``tooti tui`` needs (a default dependency, and the ``tui``
extra): missing, the command says so in one line."""


NODE_ACTIONS = {
    "disable": "route a node nothing new until enabled (its requests under way finish)",
    "enable": "route a disabled node again",
    "drain": "route a node nothing new, then close its tunnel once its requests end",
}
"""``tooti nodes`` subcommands (``POST /admin/v1/peers/{id}/{action}``)."""

GATEWAY_HELP = ("base URL of the gateway (or relay) to ask [TOOTI_GATEWAY, default "
                "http://127.0.0.1:8080]")
"""The help of ``--gateway`` (also spelled ``--url``) of ``tooti tui`` and ``tooti peers``."""


def main(argv: list[str] | None = None) -> int:
    """Run the ``tooti`` command line with ``argv`` (default ``sys.argv[1:]``)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    code: int = args.handler(args)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tooti", description="Decentralized AI inference network."
    )
    parser.add_argument("--version", action="version", version=f"tooti {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run gateway / node / relay roles",
        description="Run one or more roles. Every flag can also be set with the "
        "TOOTI_* variable in brackets; flags win over the environment, which wins "
        "over the config file.",
    )
    # --role, --log-level and --log-format take forms argparse's choices would refuse
    # (gateway,node; DEBUG): tooti.config checks them, the completion offers the words.
    offer(run.add_argument(
        "--role",
        action="append",
        metavar="ROLE",
        help="gateway, node or relay; repeatable or comma-separated [TOOTI_ROLE, "
        "comma-separated]",
    ), ROLES)
    run.add_argument("--config", metavar="FILE", help="TOML config file [TOOTI_CONFIG]")
    run.add_argument("--listen", metavar="HOST:PORT", help="gateway address [TOOTI_LISTEN]")
    run.add_argument(
        "--peer",
        action="append",
        metavar="URL",
        help="ws(s):// gateway or relay to dial; repeatable [TOOTI_PEER]",
    )
    run.add_argument(
        "--backend",
        action="append",
        metavar="TYPE[=URL]",
        help="node backend, e.g. openai=http://127.0.0.1:8000/v1; repeatable [TOOTI_BACKEND]",
    )
    run.add_argument(
        "--join-token",
        metavar="T",
        help="shared node join token; prefer the variable [TOOTI_JOIN_TOKEN]",
    )
    run.add_argument(
        "--admin-key", metavar="K", help="admin API key; prefer the variable [TOOTI_ADMIN_KEY]"
    )
    run.add_argument("--data-dir", metavar="DIR", help="state directory [TOOTI_DATA_DIR]")
    run.add_argument("--node-id", metavar="ID", help="node id [TOOTI_NODE_ID]")
    offer(run.add_argument(
        "--log-level", metavar="L", help="debug, info, warning or error [TOOTI_LOG_LEVEL]"
    ), LOG_LEVELS)
    offer(run.add_argument(
        "--log-format", metavar="F",
        help="text, or json: one JSON object per line for log shippers [TOOTI_LOG_FORMAT]",
    ), LOG_FORMATS)
    run.add_argument(
        "--no-access-log", dest="access_log", action="store_const", const="0",
        help="no access-log line per /v1 request [TOOTI_ACCESS_LOG=0]",
    )
    run.add_argument(
        "--console", dest="console", action="store_const", const="1",
        help="serve the web console under /console (sign-in pages for users, operators "
        "and admins) [TOOTI_CONSOLE=1]",
    )
    run.add_argument(
        "--drain-grace",
        metavar="S",
        help="seconds to finish streams on shutdown [TOOTI_DRAIN_GRACE]",
    )
    run.add_argument(
        "--plugins-dir", metavar="DIR", help="extra plugin files to load [TOOTI_PLUGINS_DIR]"
    )
    run.add_argument(
        "--tls-cert", metavar="FILE",
        help="serve https:// and wss:// with this PEM certificate chain [TOOTI_TLS_CERT]",
    )
    run.add_argument(
        "--tls-key", metavar="FILE", help="the certificate's PEM private key [TOOTI_TLS_KEY]"
    )
    run.add_argument(
        "--peer-ca", metavar="FILE",
        help="also trust this PEM CA for wss:// peers [TOOTI_PEER_CA]",
    )
    run.add_argument(
        "--auth", metavar="MODE", choices=("keys", "open"),
        help="keys (every /v1 request needs an API key) or open [TOOTI_AUTH; default: "
        "open on loopback only]",
    )
    run.add_argument(
        "--database", metavar="URL",
        help="accounts database: a postgresql:// URL or an SQLite path; prefer the "
        "variable [TOOTI_DATABASE, default <data-dir>/tooti.sqlite3]",
    )
    run.set_defaults(handler=_run)

    plugins = commands.add_parser(
        "plugins", help="list loaded plugins and what they provide",
        description="List every plugin: built-in, installed (entry points in group 'tooti') "
        "and from --plugins-dir. Set TOOTI_DISABLE_PLUGIN_AUTOLOAD=1 to skip entry points.",
    )
    plugins.add_argument("--plugins-dir", metavar="DIR", help="extra plugin files to load")
    plugins.set_defaults(handler=_plugins)

    usage = commands.add_parser(
        "usage", help="summarize the usage ledger",
        description="Summarize the usage ledger (requests, prompt and completion tokens, "
        "cost and what was charged) grouped by key, model and node, or by --by. Reads the "
        "accounts database directly (a gateway need not run): <data-dir>/tooti.sqlite3, "
        "or --database.",
    )
    usage.add_argument("--data-dir", metavar="DIR", help="state directory [TOOTI_DATA_DIR]")
    usage.add_argument("--database", metavar="URL", help="the accounts database (SQLite path "
                       "or postgresql://…) [TOOTI_DATABASE, default <data-dir>/tooti.sqlite3]")
    usage.add_argument("--by", choices=("key", "model", "node", "status", "account", "owner"),
                       action="append",
                       help="group by (repeatable; default: key, model and node)")
    usage.set_defaults(handler=_usage)

    tui = commands.add_parser(
        "tui", help="live terminal view of a gateway's peers and requests",
        description="Watch a gateway's peers, request flows and totals live, from its "
        "admin events stream. Reconnects when the gateway restarts.",
    )
    tui.add_argument("--gateway", "--url", dest="gateway", metavar="URL", help=GATEWAY_HELP)
    tui.add_argument("--admin-key", metavar="K",
                     help="the gateway's admin key; prefer the variable [TOOTI_ADMIN_KEY]")
    tui.set_defaults(handler=_tui)

    peers = commands.add_parser(
        "peers", help="show what a running gateway or relay knows of the network",
        description="Ask a running gateway or relay (its admin API) which peers it dials, "
        "which are connected to it (direct or via relays) and which public addresses it "
        "tells dialers about.",
    )
    peers.add_argument("--gateway", "--url", dest="gateway", metavar="URL",
                       help=GATEWAY_HELP)
    peers.add_argument("--admin-key", metavar="K",
                       help="its admin key; prefer the variable [TOOTI_ADMIN_KEY]")
    peers.add_argument("--json", action="store_true", help="print the raw JSON view")
    peers.set_defaults(handler=_peers)

    nodes = commands.add_parser(
        "nodes", help="disable, enable or drain a node on a running gateway",
        description="Control a node connected to a running gateway, through its admin API: "
        "disable (route it nothing new, its requests under way finish; kept when it "
        "reconnects), enable (route it again), drain (route it nothing new, then close its "
        "tunnel once its requests under way end; it dials again later: disable it to keep "
        "it out).",
    )
    node_commands = nodes.add_subparsers(dest="nodes_command", required=True,
                                         metavar="COMMAND")
    for action, text in NODE_ACTIONS.items():
        leaf = node_commands.add_parser(action, help=text, description=text + ".")
        leaf.add_argument("node_id", metavar="ID",
                          help="the node's id, as `tooti peers` or the console's Network "
                          "page lists it")
        leaf.add_argument("--gateway", "--url", dest="gateway", metavar="URL",
                          help=GATEWAY_HELP)
        leaf.add_argument("--admin-key", metavar="K",
                          help="the gateway's admin key; prefer the variable [TOOTI_ADMIN_KEY]")
        leaf.add_argument("--json", action="store_true", help="print the gateway's JSON")
        leaf.set_defaults(handler=_nodes, action=action)

    config = commands.add_parser(
        "config", help="work with config files",
        description="Work with tooti's TOML config files (see config.example.toml).",
    )
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    check = config_commands.add_parser(
        "check", help="validate a config file",
        description="Validate a TOML config file the way tooti run reads it (types, ranges, "
        "checks across fields, plugin names, TLS files) without starting anything: print "
        "a summary and exit 0, or the first error with its key and line and exit 2.",
    )
    check.add_argument("file", metavar="FILE")
    check.set_defaults(handler=_config_check)
    importlib.import_module("tooti.cli_accounts").register(commands)
    importlib.import_module("tooti.cli_completion").register(commands, parser)
    return parser


def _error(exc: ConfigError) -> int:
    print(f"tooti: error: {exc}", file=sys.stderr)
    return 2


def _run(args: argparse.Namespace) -> int:
    try:
        settings = build_settings(args, os.environ)
        runner = importlib.import_module("tooti.runner")
        # SIGHUP builds the settings again the same way (tooti.reload applies what it can).
        code: int = runner.run(settings, reload=lambda: build_settings(args, os.environ),
                               config_file=getattr(args, "config", None)
                               or os.environ.get("TOOTI_CONFIG", "").strip())
    except ConfigError as exc:
        return _error(exc)
    return code


def _config_check(args: argparse.Namespace) -> int:
    from tooti.runner import check_plugin_names, check_tls, effective_roles

    try:
        settings = load_file(args.file)
        check_plugin_names(settings)
        check_tls(settings)
    except ConfigError as exc:
        return _error(exc)
    roles = ", ".join(settings.roles) if settings.roles else "default (gateway, node)"
    print(f"{args.file}: ok")
    print(f"  roles: {roles}")
    print(f"  listen: {settings.gateway.listen}")
    backends = [backend.type for backend in settings.node.backends]
    if backends:
        print(f"  backends: {len(backends)} ({', '.join(backends)})")
    elif "node" in effective_roles(settings):
        print("  backends: default (llamacpp)")  # what tooti.runner.build_backends runs
    else:
        print("  backends: none (no node role)")
    print(f"  peers: {len(settings.node.peers)}")
    if "relay" in settings.roles:
        print(f"  relay upstream peers: {len(settings.relay.peers)}")
    return 0


def _tui(args: argparse.Namespace) -> int:
    gateway = args.gateway or os.environ.get("TOOTI_GATEWAY") or "http://127.0.0.1:8080"
    admin_key = args.admin_key or os.environ.get("TOOTI_ADMIN_KEY") or ""
    try:
        app = importlib.import_module("tooti.tui.app")
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in TUI_MODULES:
            raise
        print(f"tooti: error: the TUI needs textual and rich, and {missing} is not installed "
              "here: pip install 'tooti[tui]' (or reinstall tooti)", file=sys.stderr)
        return 1
    code: int = app.run(gateway, admin_key)
    return code


def _peers(args: argparse.Namespace) -> int:
    from tooti.admin import network_report

    url = args.gateway or os.environ.get("TOOTI_GATEWAY") or "http://127.0.0.1:8080"
    admin_key = args.admin_key or os.environ.get("TOOTI_ADMIN_KEY") or ""
    try:
        view = network_report.fetch(url, admin_key)
    except network_report.NetworkViewError as exc:
        print(f"tooti: error: {exc}", file=sys.stderr)
        return 1
    print(network_report.to_json(view) if args.json else network_report.render(view))
    return 0


def _nodes(args: argparse.Namespace) -> int:
    import json
    from urllib.parse import quote

    from tooti.admin_client import DEFAULT_GATEWAY, AdminClient, AdminError

    url = args.gateway or os.environ.get("TOOTI_GATEWAY") or DEFAULT_GATEWAY
    admin_key = args.admin_key or os.environ.get("TOOTI_ADMIN_KEY") or ""
    try:
        with AdminClient(url, admin_key) as client:
            view = client.post(f"/admin/v1/peers/{quote(args.node_id, safe='')}/"
                               f"{args.action}", {})
    except AdminError as exc:
        print(f"tooti: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(view, indent=2))
    else:
        in_flight = view.get("in_flight")
        print(f"node {args.node_id}: {view.get('state', '?')}"
              + ("" if in_flight is None else f" ({in_flight} requests in flight)")
              + ("" if view.get("connected", True) else " (not connected)"))
    return 0


def _plugins(args: argparse.Namespace) -> int:
    from tooti import plugins

    loaded = plugins.load(args.plugins_dir)
    failed = 0
    for info in loaded.infos:
        origin = f"{info.distribution} {info.version}".strip() or info.source
        print(f"{info.name}  ({info.source}: {origin})")
        if info.error:
            failed += 1
            print(f"    FAILED: {info.error}")
        for hook, names in sorted(info.provides.items()):
            print(f"    {hook}: {', '.join(names)}")
    return 1 if failed else 0


def _usage(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tooti.accounts.database import SQLITE_FILENAME, Database, DatabaseError
    from tooti.accounts.money import format_credits
    from tooti.billing.ledger import summarize
    from tooti.settings import Settings

    url = getattr(args, "database", None) or os.environ.get("TOOTI_DATABASE") or ""
    data_dir = Path(os.path.expanduser(
        args.data_dir or os.environ.get("TOOTI_DATA_DIR") or Settings().data_dir))
    if not url and not (data_dir / SQLITE_FILENAME).exists():
        print(f"tooti: no usage ledger at {data_dir / SQLITE_FILENAME}", file=sys.stderr)
        return 1
    try:
        db = Database(url, data_dir=data_dir)
    except DatabaseError as exc:
        print(f"tooti: {exc}", file=sys.stderr)
        return 1
    try:
        for by in args.by or ["key", "model", "node"]:
            print(f"by {by}:")
            for line in usage_table(by, [
                    (row.group, str(row.requests), str(row.prompt_tokens),
                     str(row.completion_tokens), format_credits(row.cost),
                     format_credits(row.charged)) for row in summarize(db, by)]):
                print(line)
            print()
    finally:
        db.close()
    return 0


USAGE_COLUMNS = ("requests", "prompt", "completion", "cost", "charged")
"""The figures ``tooti usage`` prints after each group's name."""


def usage_table(by: str, rows: list[tuple[str, ...]]) -> list[str]:
    """``tooti usage``'s table for one grouping: a heading (``by`` over the groups, then
    :data:`USAGE_COLUMNS`) and ``rows`` (a group, then its figures as text), each column
    as wide as its widest value (a 32-character node id or key id shifts nothing), names
    left-aligned, figures right-aligned, two spaces apart, indented two."""
    table = [(by, *USAGE_COLUMNS), *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  " + "  ".join([row[0].ljust(widths[0]), *(cell.rjust(width) for cell, width
                                                          in zip(row[1:], widths[1:],
                                                                 strict=True))])
            for row in table]
