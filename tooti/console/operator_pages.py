"""The console's operator pages (being written)."""

from __future__ import annotations

from quart import Blueprint

blueprint = Blueprint("operator", __name__)
