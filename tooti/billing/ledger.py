"""The built-in billing plugins' registration, and ``tooti usage``'s summary.

The usage ledger folded into :mod:`tooti.billing.credits`: one usage row per request
in the accounts database's ``usage`` table (SQLite ``<data_dir>/tooti.sqlite3`` or
the gateway's PostgreSQL), written with group commit before a completed answer's last
bytes leave. Both ``credits`` and ``usage-ledger`` name that plugin, so existing
configs keep working: a request without an account is recorded and charged nothing.
:func:`summarize` reads the table for ``tooti usage``; costs are integer micro-units.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tooti.accounts.database import SQLITE_FILENAME, Database, Tx
from tooti.billing.base import Billing, BillingSetup
from tooti.billing.credits import QUARANTINE_FILE, Credits, plugins
from tooti.hookspecs import hookimpl

__all__ = ["FILENAME", "GROUPS", "QUARANTINE_FILE", "SummaryRow", "UsageLedger", "summarize",
           "tooti_billing"]

UsageLedger = Credits
"""The former name of the plugin (``usage-ledger``)."""
FILENAME = SQLITE_FILENAME
"""The SQLite file in the data dir holding the ``usage`` table (the accounts database)."""


@dataclass(frozen=True)
class SummaryRow:
    """One line of ``tooti usage``."""

    group: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: int
    """Micro-units (what the tokens cost at the nodes' prices)."""
    charged: int
    """Micro-units taken from accounts' credit."""


GROUPS = {"key": "key_id", "model": "model", "node": "node_id", "status": "status",
          "account": "account_id", "owner": "owner_id"}


def summarize(db: Database, by: str) -> list[SummaryRow]:
    """Totals per key, model, node, status, account or owner from the usage table."""
    column = GROUPS[by]

    def query(tx: Tx) -> list[tuple[object, ...]]:
        return tx.all(
            f"SELECT {column}, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), "
            f"SUM(cost), SUM(charged) FROM usage GROUP BY {column} "
            f"ORDER BY SUM(cost) DESC, COUNT(*) DESC, {column}")

    return [SummaryRow(str(r[0]) or "-", int(r[1]), int(r[2] or 0),  # type: ignore[call-overload]
                       int(r[3] or 0), int(r[4] or 0), int(r[5] or 0))  # type: ignore[call-overload]
            for r in db.read_sync(query)]


@hookimpl
def tooti_billing() -> Mapping[str, Callable[[BillingSetup], Billing]]:
    """The built-in ``credits`` plugin, also named ``usage-ledger``."""
    return plugins()
