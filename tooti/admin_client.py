"""A small synchronous client of a running gateway's admin API (the accounts routes of
:mod:`tooti.admin.accounts_api`), used by the ``tooti accounts / keys / groups / invites /
join-tokens / credits / earnings / ledger`` commands (:mod:`tooti.cli_accounts`).

Every refusal, and every failure to reach the gateway, is an :class:`AdminError` whose
message is meant for a person (the gateway's OpenAI error message, with the HTTP
status); the admin key is sent as a bearer token and never appears in a message.
"""

from __future__ import annotations

from typing import Any

import httpx

DEFAULT_GATEWAY = "http://127.0.0.1:8080"


class AdminError(Exception):
    """The gateway could not be reached or refused the request."""

    def __init__(self, message: str, status: int | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class AdminClient:
    """Requests to one gateway's admin API with its admin key."""

    def __init__(self, base_url: str = DEFAULT_GATEWAY, admin_key: str = "", *,
                 timeout: float = 30.0, transport: httpx.BaseTransport | None = None) -> None:
        headers = {"authorization": f"Bearer {admin_key}"} if admin_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                  transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def raw(self, method: str, path: str, *, json: Any = None,
            params: dict[str, Any] | None = None) -> httpx.Response:
        """One request; the response if it is a success, else :class:`AdminError`."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self._http.request(method, path, json=json, params=query)
        except httpx.HTTPError as exc:
            raise AdminError(f"cannot reach {self.base_url}: {exc} (the gateway is "
                             "--gateway URL or TOOTI_GATEWAY)") from None
        if response.is_success:
            return response
        message, code = response.text[:300], None
        try:
            error = response.json()["error"]
            message, code = str(error["message"]), error.get("code")
        except (ValueError, KeyError, TypeError):
            pass
        if code in ("invalid_admin_key", "admin_loopback_only"):
            message += " (the admin key is TOOTI_ADMIN_KEY or --admin-key)"
        raise AdminError(f"{method} {path} answered {response.status_code}: {message}",
                         response.status_code, code)

    def call(self, method: str, path: str, *, json: Any = None,
             params: dict[str, Any] | None = None) -> Any:
        """One request whose answer is JSON; the decoded answer."""
        response = self.raw(method, path, json=json, params=params)
        try:
            return response.json()
        except ValueError:
            raise AdminError(f"{method} {path} did not answer JSON") from None

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, params=params)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.call("POST", path, json=_compact(body))

    def patch(self, path: str, body: dict[str, Any]) -> Any:
        return self.call("PATCH", path, json=_compact(body))

    def delete(self, path: str) -> Any:
        return self.call("DELETE", path)

    def put_no_content(self, path: str, body: dict[str, Any]) -> None:
        """A ``PUT`` the gateway answers with 204 (no body)."""
        self.raw("PUT", path, json=_compact(body))


def _compact(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` without the members left unset (None), so the gateway's defaults apply."""
    return {key: value for key, value in body.items() if value is not None}
