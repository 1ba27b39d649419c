"""The console's admin pages (being written)."""

from __future__ import annotations

from quart import Blueprint

blueprint = Blueprint("admin", __name__)
