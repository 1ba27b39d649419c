"""The accounts database's schema: versioned migrations, one text for SQLite and
PostgreSQL (``BIGINT`` money in integer micro-units, ``DOUBLE PRECISION`` Unix times,
``TEXT`` ids and SHA-256 hex digests). Migrations are applied in order at open
(:meth:`tooti.accounts.database.Database.migrate`); never edit one that has shipped,
add the next.

Tables:

* ``accounts``: id, name (unique), role (``admin`` / ``operator`` / ``user``), status
  (``active`` / ``suspended``), created_at; the balance is the ``account:<id>`` book.
* ``api_keys``: the SHA-256 of each key (never the key), its visible prefix, expiry,
  revocation, allowed models (JSON list, ``""`` = all) and per-key limits.
* ``node_groups``, ``memberships``: private groups, owned by an operator account; members.
* ``invites``, ``invite_redemptions``: hashed invite codes with ``max_uses`` and expiry.
* ``join_tokens``: hashed node join tokens minted for an account (``group_id`` ``""`` =
  its public nodes).
* ``node_owners``: a node's proven id → the account (and group) it joined for, and the
  hex key that proved it (:mod:`tooti.accounts.join_directory`).
* ``credit_codes``: hashed single-use codes worth an amount.
* ``journal``, ``journal_lines``, ``books``: the double-entry ledger
  (:mod:`tooti.accounts.journal`); ``books`` caches each book's balance.
* ``leases``: credit a gateway took from an account's balance to reserve requests from
  without a database round trip (:mod:`tooti.billing.credits`).
* ``usage``: one row per request (what the usage ledger always recorded), with the
  integer cost charged, the operator's share and the fee.
* ``quota_windows``: shared counters of rate limits and budgets per window.
* ``gateways``: gateways sharing this database, with when each was last seen.
* ``changes``: a counter bumped by every change a gateway caches (keys, accounts,
  groups, join tokens), polled to invalidate caches within a second.

Migration 2 (the web console, :mod:`tooti.console`):

* ``usage.ttft_ms``: the time to the first token of a request (NULL when unknown, and
  for every row written before the column existed).
* ``console_sessions``: signed-in browser sessions, by the SHA-256 of their cookie
  token (:mod:`tooti.accounts.console_sessions`), with their CSRF token.
* ``login_links``: hashed one-time login links (:mod:`tooti.accounts.login_links`).
* ``login_failures``: failed password checks per sign-in name, for the lockout
  (:mod:`tooti.accounts.passwords`), keyed by ``subject``, the SHA-256 of the name
  (unknown names too, so they lock alike), indexed by ``window_start`` to purge rows
  whose window and lock have passed; the password hash is ``accounts.password_hash``.
* ``console_secrets``: the key that signs the console's cookies, shared by every
  gateway on the database.
"""

from __future__ import annotations

MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
        """CREATE TABLE accounts (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            role TEXT NOT NULL,
            status TEXT NOT NULL,
            password_hash TEXT NOT NULL DEFAULT '',
            created_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            account_id TEXT NOT NULL REFERENCES accounts(id),
            name TEXT NOT NULL DEFAULT '',
            prefix TEXT NOT NULL,
            hash TEXT NOT NULL UNIQUE,
            group_id TEXT NOT NULL DEFAULT '',
            models TEXT NOT NULL DEFAULT '',
            rpm BIGINT,
            tpm BIGINT,
            concurrency BIGINT,
            budget_day BIGINT,
            budget_month BIGINT,
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION,
            revoked_at DOUBLE PRECISION
        )""",
        "CREATE INDEX api_keys_account ON api_keys(account_id)",
        """CREATE TABLE account_limits (
            account_id TEXT PRIMARY KEY REFERENCES accounts(id),
            rpm BIGINT,
            tpm BIGINT,
            concurrency BIGINT
        )""",
        """CREATE TABLE node_groups (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            owner_id TEXT NOT NULL REFERENCES accounts(id),
            public_nodes INTEGER NOT NULL DEFAULT 1,
            created_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE memberships (
            group_id TEXT NOT NULL REFERENCES node_groups(id),
            account_id TEXT NOT NULL REFERENCES accounts(id),
            joined_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (group_id, account_id)
        )""",
        """CREATE TABLE invites (
            id TEXT PRIMARY KEY,
            group_id TEXT NOT NULL REFERENCES node_groups(id),
            prefix TEXT NOT NULL,
            hash TEXT NOT NULL UNIQUE,
            max_uses BIGINT NOT NULL,
            uses BIGINT NOT NULL DEFAULT 0,
            expires_at DOUBLE PRECISION,
            created_by TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            revoked_at DOUBLE PRECISION
        )""",
        """CREATE TABLE invite_redemptions (
            invite_id TEXT NOT NULL REFERENCES invites(id),
            account_id TEXT NOT NULL REFERENCES accounts(id),
            redeemed_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (invite_id, account_id)
        )""",
        """CREATE TABLE join_tokens (
            id TEXT PRIMARY KEY,
            account_id TEXT NOT NULL REFERENCES accounts(id),
            group_id TEXT NOT NULL DEFAULT '',
            name TEXT NOT NULL DEFAULT '',
            prefix TEXT NOT NULL,
            hash TEXT NOT NULL UNIQUE,
            created_at DOUBLE PRECISION NOT NULL,
            revoked_at DOUBLE PRECISION
        )""",
        """CREATE TABLE node_owners (
            node_id TEXT PRIMARY KEY,
            account_id TEXT NOT NULL REFERENCES accounts(id),
            group_id TEXT NOT NULL DEFAULT '',
            token_id TEXT NOT NULL DEFAULT '',
            public_key TEXT NOT NULL DEFAULT '',
            bound_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE credit_codes (
            id TEXT PRIMARY KEY,
            prefix TEXT NOT NULL,
            hash TEXT NOT NULL UNIQUE,
            amount BIGINT NOT NULL,
            created_by TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION,
            redeemed_by TEXT,
            redeemed_at DOUBLE PRECISION
        )""",
        """CREATE TABLE journal (
            id TEXT PRIMARY KEY,
            idem_key TEXT NOT NULL UNIQUE,
            kind TEXT NOT NULL,
            request_id TEXT NOT NULL DEFAULT '',
            memo TEXT NOT NULL DEFAULT '',
            at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE journal_lines (
            entry_id TEXT NOT NULL REFERENCES journal(id),
            book TEXT NOT NULL,
            amount BIGINT NOT NULL
        )""",
        "CREATE INDEX journal_lines_entry ON journal_lines(entry_id)",
        "CREATE INDEX journal_lines_book ON journal_lines(book)",
        """CREATE TABLE books (
            book TEXT PRIMARY KEY,
            balance BIGINT NOT NULL
        )""",
        """CREATE TABLE leases (
            id TEXT PRIMARY KEY,
            gateway_id TEXT NOT NULL,
            account_id TEXT NOT NULL REFERENCES accounts(id),
            amount BIGINT NOT NULL,
            acquired_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL,
            closed_at DOUBLE PRECISION
        )""",
        "CREATE INDEX leases_open ON leases(closed_at, expires_at)",
        """CREATE TABLE usage (
            request_id TEXT PRIMARY KEY,
            ts DOUBLE PRECISION NOT NULL,
            account_id TEXT NOT NULL DEFAULT '',
            key_id TEXT NOT NULL,
            model TEXT NOT NULL,
            node_id TEXT NOT NULL,
            owner_id TEXT NOT NULL DEFAULT '',
            endpoint TEXT NOT NULL,
            stream INTEGER NOT NULL,
            prompt_tokens BIGINT NOT NULL,
            completion_tokens BIGINT NOT NULL,
            estimated INTEGER NOT NULL,
            price_input BIGINT NOT NULL,
            price_output BIGINT NOT NULL,
            cost BIGINT NOT NULL,
            charged BIGINT NOT NULL DEFAULT 0,
            earned BIGINT NOT NULL DEFAULT 0,
            fee BIGINT NOT NULL DEFAULT 0,
            lease_id TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL,
            latency_ms DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX usage_account_ts ON usage(account_id, ts)",
        "CREATE INDEX usage_owner_ts ON usage(owner_id, ts)",
        """CREATE TABLE usage_quarantine (
            request_id TEXT,
            ts DOUBLE PRECISION NOT NULL,
            error TEXT NOT NULL,
            row_json TEXT NOT NULL
        )""",
        """CREATE TABLE quota_windows (
            subject TEXT NOT NULL,
            window_start BIGINT NOT NULL,
            used BIGINT NOT NULL,
            PRIMARY KEY (subject, window_start)
        )""",
        """CREATE TABLE gateways (
            id TEXT PRIMARY KEY,
            started_at DOUBLE PRECISION NOT NULL,
            last_seen DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE changes (
            id INTEGER PRIMARY KEY,
            counter BIGINT NOT NULL
        )""",
        "INSERT INTO changes VALUES (1, 0)",
    ]),
    (2, [
        "ALTER TABLE usage ADD COLUMN ttft_ms DOUBLE PRECISION",
        """CREATE TABLE console_sessions (
            hash TEXT PRIMARY KEY,
            account_id TEXT NOT NULL REFERENCES accounts(id),
            csrf TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL,
            last_seen DOUBLE PRECISION NOT NULL,
            revoked_at DOUBLE PRECISION
        )""",
        "CREATE INDEX console_sessions_account ON console_sessions(account_id)",
        """CREATE TABLE login_links (
            id TEXT PRIMARY KEY,
            hash TEXT NOT NULL UNIQUE,
            account_id TEXT NOT NULL REFERENCES accounts(id),
            created_by TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL,
            used_at DOUBLE PRECISION
        )""",
        """CREATE TABLE login_failures (
            subject TEXT PRIMARY KEY,
            failures BIGINT NOT NULL,
            window_start DOUBLE PRECISION NOT NULL,
            locked_until DOUBLE PRECISION
        )""",
        "CREATE INDEX login_failures_window ON login_failures(window_start)",
        """CREATE TABLE console_secrets (
            name TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )""",
    ]),
]
