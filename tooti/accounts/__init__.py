"""Accounts, API keys, groups, invite and credit codes, credits and earnings: the state a
gateway run as a service keeps in its database (SQLite alone, PostgreSQL when several
gateways share it). See ``docs/accounts.md``. Imports no role."""
