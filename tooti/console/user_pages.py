"""The console's user pages (being written)."""

from __future__ import annotations

from quart import Blueprint

blueprint = Blueprint("user", __name__)


@blueprint.route("/console/", methods=["GET"])
async def overview() -> str:
    from quart import render_template

    from tooti.console.guard import signed_in

    @signed_in()
    async def page() -> str:
        return await render_template("error.html", status=200, message="overview")

    return await page()
