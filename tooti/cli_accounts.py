"""The accounts commands of ``tooti``, each run against a running gateway's admin API
(:mod:`tooti.admin.accounts_api`, through :class:`tooti.admin_client.AdminClient`):

* ``tooti accounts {create,list,show,suspend,activate,limits}``
* ``tooti accounts login-link NAME [--ttl 15m]`` (prints the console URL that signs the
  account in once), ``tooti accounts set-password NAME`` (the password is read from a
  prompt, or from stdin when it is not a terminal: never from the command line, which
  other users see in ``ps``), ``tooti accounts logout NAME`` (ends every console
  session of the account)
* ``tooti keys {create,list,revoke}``
* ``tooti groups {create,list,members,remove-member}``
* ``tooti invites {create,list,revoke,redeem}``
* ``tooti join-tokens {create,list,revoke}``
* ``tooti credits {top-up,code,codes,redeem}``
* ``tooti earnings [--since T] [--until T] [--export csv|json]`` and
  ``tooti earnings payout ACCOUNT AMOUNT``
* ``tooti ledger check`` (exit 0 if the ledger balances, 1 with the first violation)
* ``tooti ledger replay`` (bill the quarantined requests again, idempotently; exit 1 if
  some are still refused)

Each takes ``--gateway URL`` (default ``$TOOTI_GATEWAY``, else ``http://127.0.0.1:8080``)
and ``--admin-key K`` (default ``$TOOTI_ADMIN_KEY``; prefer the variable, a flag shows in
``ps``), prints aligned tables, or the gateway's JSON with ``--json`` (for scripts).
Amounts are credits as decimals (``12.5``); durations are seconds or ``90m``, ``12h``,
``30d``. A refused request prints the gateway's error message and exits 1; a secret
(API key, invite code, join token, credit code) is printed once, when it is created.

Money moves (``credits top-up``, ``earnings payout``) always carry an idempotency key:
``--idem-key K``, or one generated here and printed on stderr *before* the request is
sent, so a command that failed or timed out can be repeated with ``--idem-key K`` and
moves the money at most once (the gateway answers 409 if K was used for another
account or amount).

:func:`register` adds the commands to ``tooti``'s parser (:mod:`tooti.cli`).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import secrets
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from tooti.accounts.durations import parse_duration
from tooti.admin_client import DEFAULT_GATEWAY, AdminClient, AdminError

Handler = Callable[[AdminClient, argparse.Namespace], int]
_CONTROL = dict.fromkeys([*range(0x20), 0x7F, *range(0x80, 0xA0)], "?")


# ------------------------------------------------------------ parsing helpers

def duration(text: str) -> int:
    """``"30d"`` → seconds (argparse type; the grammar is
    :func:`tooti.accounts.durations.parse_duration`'s)."""
    try:
        return parse_duration(text)
    except ValueError as bad:
        raise argparse.ArgumentTypeError(str(bad)) from None


def moment(text: str) -> str:
    """A time for ``--since`` / ``--until``: Unix seconds or an ISO date, passed on as
    given once checked (argparse type)."""
    try:
        float(text)
        return text
    except ValueError:
        pass
    try:
        datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (Unix seconds or a date like 2026-12-01)") from None
    return text


# ------------------------------------------------------------ output

def _safe(value: Any) -> str:
    """A cell: None as ``-``, times as UTC dates, no control characters."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(_safe(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value).translate(_CONTROL)


def when(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return _safe(value)
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M")


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, Any]]) -> str:
    """Aligned columns: ``(header, key or function of the row)`` each; numbers and
    amounts aligned right."""
    cells = [[_safe(col(row) if callable(col) else row.get(col)) for _, col in columns]
             for row in rows]
    heads = [head for head, _ in columns]
    widths = [max([len(head), *(len(line[i]) for line in cells)])
              for i, head in enumerate(heads)]
    right = [all(_numeric(line[i]) for line in cells) and bool(cells)
             for i in range(len(heads))]

    def fmt(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if r else v.ljust(w)
                         for v, w, r in zip(values, widths, right, strict=True)).rstrip()

    return "\n".join([fmt(heads), *(fmt(line) for line in cells)])


def _numeric(text: str) -> bool:
    return text == "-" or re.fullmatch(r"-?\d+(\.\d+)?", text) is not None


def emit(args: argparse.Namespace, answer: Any, text: Callable[[Any], str]) -> int:
    print(json.dumps(answer, indent=2) if args.json else text(answer))
    return 0


def limits_text(limits: dict[str, Any] | None) -> str:
    parts = [f"{name}={limits[name]}" for name in ("rpm", "tpm", "concurrency")
             if limits and limits.get(name) is not None]
    for budget in ("budget_day", "budget_month"):
        if limits and limits.get(budget) is not None:
            parts.append(f"{budget}={limits[budget]}")
    return " ".join(parts) or "-"


ACCOUNT_COLUMNS = [("ID", "id"), ("NAME", "name"), ("ROLE", "role"), ("STATUS", "status"),
                   ("BALANCE", "balance"), ("HELD", lambda r: r.get("held", "-")),
                   ("EARNINGS", "earnings"),
                   ("LIMITS", lambda r: limits_text(r.get("limits"))),
                   ("CREATED", lambda r: when(r.get("created_at")))]
KEY_COLUMNS = [("ID", "id"), ("ACCOUNT", "account_id"), ("NAME", "name"),
               ("PREFIX", "prefix"), ("GROUP", "group"), ("MODELS", "models"),
               ("LIMITS", lambda r: limits_text(r.get("limits"))),
               ("EXPIRES", lambda r: when(r.get("expires_at"))),
               ("REVOKED", lambda r: when(r.get("revoked_at")))]
GROUP_COLUMNS = [("ID", "id"), ("NAME", "name"), ("OWNER", "owner_id"),
                 ("PUBLIC NODES", "public_nodes"), ("MEMBERS", "members"),
                 ("CREATED", lambda r: when(r.get("created_at")))]
INVITE_COLUMNS = [("ID", "id"), ("PREFIX", "prefix"), ("USES", "uses"),
                  ("MAX", "max_uses"), ("EXPIRES", lambda r: when(r.get("expires_at"))),
                  ("REVOKED", lambda r: when(r.get("revoked_at")))]
TOKEN_COLUMNS = [("ID", "id"), ("ACCOUNT", "account_id"), ("GROUP", "group"),
                 ("NAME", "name"), ("PREFIX", "prefix"),
                 ("CREATED", lambda r: when(r.get("created_at"))),
                 ("REVOKED", lambda r: when(r.get("revoked_at")))]
CODE_COLUMNS = [("ID", "id"), ("PREFIX", "prefix"), ("AMOUNT", "amount"),
                ("EXPIRES", lambda r: when(r.get("expires_at"))),
                ("REDEEMED BY", "redeemed_by"),
                ("REDEEMED", lambda r: when(r.get("redeemed_at")))]


def _list(columns: Sequence[tuple[str, Any]]) -> Callable[[Any], str]:
    return lambda answer: table(answer["data"], columns) if answer["data"] else "(none)"


def _one(columns: Sequence[tuple[str, Any]]) -> Callable[[Any], str]:
    return lambda answer: table([answer], columns)


def _secret(columns: Sequence[tuple[str, Any]], member: str, what: str
            ) -> Callable[[Any], str]:
    return lambda answer: (f"{table([answer], columns)}\n\n{what}: {answer[member]}\n"
                           "(shown this once: store it now; it cannot be shown again)")


# ------------------------------------------------------------ commands

def _accounts_create(c: AdminClient, a: argparse.Namespace) -> int:
    return emit(a, c.post("/admin/v1/accounts", {"name": a.name, "role": a.role}),
                _one(ACCOUNT_COLUMNS))


def _accounts_list(c: AdminClient, a: argparse.Namespace) -> int:
    return emit(a, c.get("/admin/v1/accounts"), _list(ACCOUNT_COLUMNS))


def _accounts_show(c: AdminClient, a: argparse.Namespace) -> int:
    return emit(a, c.get(f"/admin/v1/accounts/{a.account}"), _one(ACCOUNT_COLUMNS))


def _set_status(status: str) -> Handler:
    def run(c: AdminClient, a: argparse.Namespace) -> int:
        return emit(a, c.patch(f"/admin/v1/accounts/{a.account}", {"status": status}),
                    _one(ACCOUNT_COLUMNS))
    return run


def _accounts_limits(c: AdminClient, a: argparse.Namespace) -> int:
    limits = {"rpm": a.rpm, "tpm": a.tpm, "concurrency": a.concurrency}
    return emit(a, c.patch(f"/admin/v1/accounts/{a.account}", {"limits": limits}),
                _one(ACCOUNT_COLUMNS))


def _accounts_login_link(c: AdminClient, a: argparse.Namespace) -> int:
    answer = c.post(f"/admin/v1/accounts/{a.account}/login-link", {"ttl": a.ttl})
    # The gateway's public address when it has one (network.public_url), else --gateway.
    url = answer.get("url") or c.base_url + answer["path"]
    return emit(a, {**answer, "url": url}, lambda r: (
        f"{url}\n(a one-time login link for {r.get('account') or r['account_id']}, valid "
        f"until {when(r.get('expires_at'))} UTC: give it to its owner privately)"))


def read_password(stdin: Any = None) -> str:
    """The new password: typed twice at a prompt (not echoed) when stdin is a terminal,
    else the first line of stdin (without its line end). Never an argument."""
    stdin = sys.stdin if stdin is None else stdin
    if stdin.isatty():
        first = getpass.getpass("new password: ")
        if getpass.getpass("again: ") != first:
            raise AdminError("the two passwords differ")
        return first
    return stdin.readline().rstrip("\r\n")


def _accounts_set_password(c: AdminClient, a: argparse.Namespace) -> int:
    password = read_password()
    if not password:
        raise AdminError("no password given (type it at the prompt, or pipe it on stdin)")
    c.put_no_content(f"/admin/v1/accounts/{a.account}/password", {"password": password})
    return emit(a, {"account": a.account, "password_set": True}, lambda _: (
        f"password of {a.account} set; its console sessions were ended"))


def _accounts_logout(c: AdminClient, a: argparse.Namespace) -> int:
    return emit(a, c.post(f"/admin/v1/accounts/{a.account}/logout", {}), lambda r: (
        f"ended {r['revoked']} console session{'s' if r['revoked'] != 1 else ''} of "
        f"{r['account_id']}"))


def _keys_create(c: AdminClient, a: argparse.Namespace) -> int:
    body = {"account": a.account, "name": a.name, "group": a.group, "models": a.model,
            "expires_in": a.expires_in, "rpm": a.rpm, "tpm": a.tpm,
            "concurrency": a.concurrency, "budget_day": a.budget_day,
            "budget_month": a.budget_month}
    return emit(a, c.post("/admin/v1/keys", body), _secret(KEY_COLUMNS, "key", "API key"))


def _keys_list(c: AdminClient, a: argparse.Namespace) -> int:
    return emit(a, c.get("/admin/v1/keys", account=a.account), _list(KEY_COLUMNS))


def _keys_revoke(c: AdminClient, a: argparse.Namespace) -> int:
    return emit(a, c.delete(f"/admin/v1/keys/{a.key_id}"), lambda _: f"revoked {a.key_id}")


def _groups_create(c: AdminClient, a: argparse.Namespace) -> int:
    body = {"name": a.name, "owner": a.owner, "public_nodes": not a.no_public_nodes}
    return emit(a, c.post("/admin/v1/groups", body), _one(GROUP_COLUMNS))


def _groups_list(c: AdminClient, a: argparse.Namespace) -> int:
    return emit(a, c.get("/admin/v1/groups", account=a.account), _list(GROUP_COLUMNS))


def _groups_members(c: AdminClient, a: argparse.Namespace) -> int:
    return emit(a, c.get(f"/admin/v1/groups/{a.group}/members"), _list(ACCOUNT_COLUMNS))


def _groups_remove(c: AdminClient, a: argparse.Namespace) -> int:
    return emit(a, c.delete(f"/admin/v1/groups/{a.group}/members/{a.account}"),
                lambda _: f"removed {a.account} from {a.group}")


def _invites_create(c: AdminClient, a: argparse.Namespace) -> int:
    body = {"group": a.group, "max_uses": a.max_uses, "expires_in": a.expires_in}
    return emit(a, c.post("/admin/v1/invites", body),
                _secret(INVITE_COLUMNS, "code", "invite code"))


def _invites_list(c: AdminClient, a: argparse.Namespace) -> int:
    return emit(a, c.get("/admin/v1/invites", group=a.group), _list(INVITE_COLUMNS))


def _invites_revoke(c: AdminClient, a: argparse.Namespace) -> int:
    return emit(a, c.delete(f"/admin/v1/invites/{a.invite_id}"),
                lambda _: f"revoked {a.invite_id}")


def _invites_redeem(c: AdminClient, a: argparse.Namespace) -> int:
    answer = c.post("/admin/v1/invites/redeem", {"code": a.code, "account": a.account})
    return emit(a, answer, lambda r: f"{r['account_id']} is a member of {r['group']['name']}")


def _tokens_create(c: AdminClient, a: argparse.Namespace) -> int:
    body = {"account": a.account, "group": a.group, "name": a.name}
    return emit(a, c.post("/admin/v1/join-tokens", body),
                _secret(TOKEN_COLUMNS, "token", "join token"))


def _tokens_list(c: AdminClient, a: argparse.Namespace) -> int:
    return emit(a, c.get("/admin/v1/join-tokens", account=a.account), _list(TOKEN_COLUMNS))


def _tokens_revoke(c: AdminClient, a: argparse.Namespace) -> int:
    return emit(a, c.delete(f"/admin/v1/join-tokens/{a.token_id}"),
                lambda _: f"revoked {a.token_id}")


def idem_key(a: argparse.Namespace, command: str) -> str:
    """``--idem-key``, or a new one, printed on stderr before the request is sent (so a
    failed or timed-out command can be retried with it)."""
    if a.idem_key:
        return str(a.idem_key)
    key = "cli-" + secrets.token_hex(12)
    print(f"idempotency key {key} (if this fails or times out, repeat it with "
          f"'tooti {command} ... --idem-key {key}': it moves the money at most once)",
          file=sys.stderr, flush=True)
    return key


def _credits_top_up(c: AdminClient, a: argparse.Namespace) -> int:
    body = {"account": a.account, "amount": a.amount,
            "idem_key": idem_key(a, "credits top-up"), "memo": a.memo}
    return emit(a, c.post("/admin/v1/credits/top-up", body), lambda r: (
        f"added {r['amount']} to {r['account_id']}: balance {r['balance']} "
        f"(idempotency key {r['idem_key']})"))


def _credits_code(c: AdminClient, a: argparse.Namespace) -> int:
    body = {"amount": a.amount, "expires_in": a.expires_in}
    return emit(a, c.post("/admin/v1/credits/codes", body),
                _secret(CODE_COLUMNS, "code", "credit code"))


def _credits_codes(c: AdminClient, a: argparse.Namespace) -> int:
    return emit(a, c.get("/admin/v1/credits/codes"), _list(CODE_COLUMNS))


def _credits_redeem(c: AdminClient, a: argparse.Namespace) -> int:
    answer = c.post("/admin/v1/credits/redeem", {"code": a.code, "account": a.account})
    return emit(a, answer, lambda r: f"{r['account_id']}: balance {r['balance']}")


OPERATOR_COLUMNS = [("OPERATOR", "owner_id"), ("NODES", "nodes"), ("REQUESTS", "requests"),
                    ("PROMPT", "prompt_tokens"), ("COMPLETION", "completion_tokens"),
                    ("EARNED", "earned"), ("FEE", "fee")]
NODE_COLUMNS = [("OPERATOR", "owner_id"), ("NODE", "node_id"), ("REQUESTS", "requests"),
                ("PROMPT", "prompt_tokens"), ("COMPLETION", "completion_tokens"),
                ("EARNED", "earned"), ("FEE", "fee")]


def _report_text(report: dict[str, Any]) -> str:
    """An earnings report: per operator, then per node."""
    span = f"from {when(report.get('since')) if report.get('since') else 'the start'} " \
           f"until {when(report.get('until')) if report.get('until') else 'now'}"
    lines = [f"earnings {span}", "", "by operator:"]
    lines.append(table(report["operators"], OPERATOR_COLUMNS) if report["operators"]
                 else "(none)")
    lines += ["", "by node:"]
    lines.append(table(report["nodes"], NODE_COLUMNS) if report["nodes"] else "(none)")
    return "\n".join(lines)


def _earnings(c: AdminClient, a: argparse.Namespace) -> int:
    if a.export:
        response = c.raw("GET", "/admin/v1/earnings/export",
                         params={"format": a.export, "since": a.since, "until": a.until})
        sys.stdout.write(response.text)
        return 0
    answer = c.get("/admin/v1/earnings", since=a.since, until=a.until, account=a.account)
    return emit(a, answer, _report_text)


def _earnings_payout(c: AdminClient, a: argparse.Namespace) -> int:
    body = {"account": a.account, "amount": a.amount,
            "idem_key": idem_key(a, "earnings payout")}
    return emit(a, c.post("/admin/v1/earnings/payouts", body), lambda r: (
        f"paid {r['amount']} to {r['account_id']}: {r['earnings']} unpaid left "
        f"(idempotency key {r['idem_key']})"))


def _ledger_check(c: AdminClient, a: argparse.Namespace) -> int:
    answer = c.get("/admin/v1/ledger/check")
    if a.json:
        print(json.dumps(answer, indent=2))
    elif answer.get("ok"):
        summary = answer.get("summary") or {}
        print("ledger ok")
        for key, value in summary.items():
            if not key.endswith("_micros") or key[:-7] not in summary:
                print(f"  {key}: {_safe(value)}")
    if not answer.get("ok"):
        violations = answer.get("violations") or ["(no detail)"]
        print(f"tooti: ledger check failed ({len(violations)} violation"
              f"{'s' if len(violations) != 1 else ''}): {_safe(violations[0])}",
              file=sys.stderr)
        return 1
    return 0


def _ledger_replay(c: AdminClient, a: argparse.Namespace) -> int:
    answer = c.post("/admin/v1/ledger/replay", {})
    failed = answer.get("failed") or []
    emit(a, answer, lambda r: (
        f"replayed {len(r.get('replayed') or [])} quarantined requests "
        f"({len(r.get('already') or [])} were billed before), {len(failed)} still refused"))
    for line in failed[:20]:
        print(f"tooti: still refused: {_safe(line)}", file=sys.stderr)
    return 1 if failed else 0


# ------------------------------------------------------------ the parser

def _run(handler: Handler) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        gateway = args.gateway or os.environ.get("TOOTI_GATEWAY") or DEFAULT_GATEWAY
        admin_key = args.admin_key or os.environ.get("TOOTI_ADMIN_KEY") or ""
        try:
            with AdminClient(gateway, admin_key) as client:
                return handler(client, args)
        except AdminError as exc:
            print(f"tooti: error: {exc}", file=sys.stderr)
            return 1
    return run


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--gateway", metavar="URL",
                        help=f"gateway base URL [TOOTI_GATEWAY, default {DEFAULT_GATEWAY}]")
    common.add_argument("--admin-key", metavar="K",
                        help="the gateway's admin key; prefer the variable [TOOTI_ADMIN_KEY]")
    common.add_argument("--json", action="store_true", help="print the gateway's JSON")
    return common


def _limit_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rpm", type=int, metavar="N", help="requests per minute")
    parser.add_argument("--tpm", type=int, metavar="N", help="tokens per minute")
    parser.add_argument("--concurrency", type=int, metavar="N", help="requests at once")


def register(commands: Any) -> None:
    """Add the accounts commands to ``tooti``'s subcommands (an argparse subparsers
    action)."""
    common = _common()

    def group(name: str, help: str) -> Any:
        parser = commands.add_parser(name, help=help, description=help + ", through a "
                                     "running gateway's admin API.")
        return parser.add_subparsers(dest=f"{name}_command", required=True,
                                     metavar="COMMAND")

    def leaf(sub: Any, name: str, help: str, handler: Handler) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(name, help=help, parents=[common],
                                                         description=help)
        parser.set_defaults(handler=_run(handler))
        return parser

    accounts = group("accounts", "manage accounts")
    p = leaf(accounts, "create", "create an account", _accounts_create)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--role", choices=("user", "operator", "admin"), default="user")
    leaf(accounts, "list", "list accounts", _accounts_list)
    for name, help, handler in (("show", "show an account", _accounts_show),
                                ("suspend", "suspend an account (its keys stop working)",
                                 _set_status("suspended")),
                                ("activate", "activate a suspended account",
                                 _set_status("active"))):
        leaf(accounts, name, help, handler).add_argument("account", metavar="ACCOUNT")
    p = leaf(accounts, "limits", "set an account's limits (one not given: unlimited)",
             _accounts_limits)
    p.add_argument("account", metavar="ACCOUNT")
    _limit_flags(p)
    p = leaf(accounts, "login-link", "print a one-time console login link for an account",
             _accounts_login_link)
    p.add_argument("account", metavar="ACCOUNT")
    p.add_argument("--ttl", type=duration, default=900, metavar="DURATION",
                   help="how long the link works (default 15m, at most 7d)")
    leaf(accounts, "set-password", "set an account's console password (read from a "
         "prompt, or stdin; never an argument)", _accounts_set_password).add_argument(
        "account", metavar="ACCOUNT")
    leaf(accounts, "logout", "end every console session of an account",
         _accounts_logout).add_argument("account", metavar="ACCOUNT")

    keys = group("keys", "manage API keys")
    p = leaf(keys, "create", "create an API key (its secret is shown once)", _keys_create)
    p.add_argument("account", metavar="ACCOUNT")
    p.add_argument("--name", default="")
    p.add_argument("--group", default="", help="the group whose nodes the key reaches")
    p.add_argument("--model", action="append", default=[],
                   help="a model the key may use (repeatable; default: all)")
    p.add_argument("--expires-in", type=duration, metavar="DURATION")
    _limit_flags(p)
    p.add_argument("--budget-day", metavar="CREDITS", help="spending cap per UTC day")
    p.add_argument("--budget-month", metavar="CREDITS", help="spending cap per UTC month")
    leaf(keys, "list", "list API keys (never their secrets)", _keys_list).add_argument(
        "--account", metavar="ACCOUNT")
    leaf(keys, "revoke", "revoke an API key", _keys_revoke).add_argument(
        "key_id", metavar="KEY_ID")

    groups = group("groups", "manage private groups")
    p = leaf(groups, "create", "create a group", _groups_create)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--owner", required=True, metavar="ACCOUNT",
                   help="its owner (an operator account)")
    p.add_argument("--no-public-nodes", action="store_true",
                   help="members' keys reach only the group's nodes")
    leaf(groups, "list", "list groups", _groups_list).add_argument(
        "--account", metavar="ACCOUNT", help="only the groups of this account")
    leaf(groups, "members", "list a group's members", _groups_members).add_argument(
        "group", metavar="GROUP")
    p = leaf(groups, "remove-member", "remove an account from a group", _groups_remove)
    p.add_argument("group", metavar="GROUP")
    p.add_argument("account", metavar="ACCOUNT")

    invites = group("invites", "manage invite codes")
    p = leaf(invites, "create", "create an invite code to a group (shown once)",
             _invites_create)
    p.add_argument("group", metavar="GROUP")
    p.add_argument("--max-uses", type=int, default=1, metavar="N")
    p.add_argument("--expires-in", type=duration, metavar="DURATION")
    leaf(invites, "list", "list a group's invites", _invites_list).add_argument(
        "group", metavar="GROUP")
    leaf(invites, "revoke", "revoke an invite", _invites_revoke).add_argument(
        "invite_id", metavar="INVITE_ID")
    p = leaf(invites, "redeem", "redeem an invite code for an account", _invites_redeem)
    p.add_argument("code", metavar="CODE")
    p.add_argument("--account", required=True, metavar="ACCOUNT")

    tokens = group("join-tokens", "manage node join tokens")
    p = leaf(tokens, "create", "mint a join token for an operator's nodes (shown once)",
             _tokens_create)
    p.add_argument("account", metavar="ACCOUNT")
    p.add_argument("--group", default="", help="admit the nodes into this group")
    p.add_argument("--name", default="")
    leaf(tokens, "list", "list join tokens", _tokens_list).add_argument(
        "--account", metavar="ACCOUNT")
    leaf(tokens, "revoke", "revoke a join token", _tokens_revoke).add_argument(
        "token_id", metavar="TOKEN_ID")

    credits = group("credits", "top up credit and manage credit codes")
    p = leaf(credits, "top-up", "add credit to an account", _credits_top_up)
    p.add_argument("account", metavar="ACCOUNT")
    p.add_argument("amount", metavar="AMOUNT", help="credits, e.g. 10 or 2.50")
    p.add_argument("--idem-key", metavar="K",
                   help="idempotency key: a retry with the same key adds nothing "
                   "(default: a new one, printed on stderr first)")
    p.add_argument("--memo", default="")
    p = leaf(credits, "code", "create a single-use credit code (shown once)", _credits_code)
    p.add_argument("amount", metavar="AMOUNT", help="credits, e.g. 10 or 2.50")
    p.add_argument("--expires-in", type=duration, metavar="DURATION")
    leaf(credits, "codes", "list credit codes", _credits_codes)
    p = leaf(credits, "redeem", "redeem a credit code for an account", _credits_redeem)
    p.add_argument("code", metavar="CODE")
    p.add_argument("--account", required=True, metavar="ACCOUNT")

    earnings = commands.add_parser(
        "earnings", help="what node operators earned; pay it out", parents=[common],
        description="Report what operators' nodes earned (per operator and node), export "
        "it for payouts, or record a payout, through a running gateway's admin API.")
    earnings.add_argument("--since", type=moment, metavar="TIME",
                          help="Unix seconds or an ISO date (default: all time)")
    earnings.add_argument("--until", type=moment, metavar="TIME")
    earnings.add_argument("--account", metavar="ACCOUNT", help="one operator only")
    earnings.add_argument("--export", choices=("csv", "json"),
                          help="print the payout export instead of the report")
    earnings.set_defaults(handler=_run(_earnings))
    payouts = earnings.add_subparsers(dest="earnings_command", metavar="COMMAND")
    p = leaf(payouts, "payout", "record a payout of an operator's earnings",
             _earnings_payout)
    p.add_argument("account", metavar="ACCOUNT")
    p.add_argument("amount", metavar="AMOUNT", help="credits, e.g. 10 or 2.50")
    p.add_argument("--idem-key", metavar="K",
                   help="idempotency key: a retry with the same key pays nothing "
                   "(default: a new one, printed on stderr first)")

    ledger = group("ledger", "check the ledger")
    leaf(ledger, "check", "verify the ledger's invariants (exit 1 with the first violation)",
         _ledger_check)
    leaf(ledger, "replay", "bill the quarantined requests again (idempotent)",
         _ledger_replay)
