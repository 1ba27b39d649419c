"""Answers every console page gives the same way: a redirect after a form, and the
HTML page of a refusal or failure."""

from __future__ import annotations

from quart import Response, render_template


def redirect_to(path: str, status: int = 303) -> Response:
    """A redirect within the console (303 after a form, so a reload never re-posts)."""
    return Response("", status=status, headers={"location": path})


async def error_page(status: int, message: str) -> str:
    """The HTML page of a refusal or failure (what a browser shows for it)."""
    return await render_template("error.html", status=status, message=message)
