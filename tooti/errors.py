"""OpenAI-style error objects and the HTTP status each error code carries."""

from __future__ import annotations

from typing import Any

import msgspec

from tooti.protocol.usage import read_end_error

_encoder = msgspec.json.Encoder()

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class APIError(Exception):
    """An error answered to the client as ``{"error": {...}}`` with ``status``."""

    def __init__(
        self, status: int, message: str, *, code: str | None = None,
        param: str | None = None, type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or ERROR_TYPES.get(status, "api_error" if status >= 500 else
                                            "invalid_request_error")
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        """Return the OpenAI error object."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def to_json(self) -> bytes:
        """Return the OpenAI error object as JSON bytes."""
        return _encoder.encode(self.to_dict())


def from_end_info(info: dict[str, Any]) -> APIError:
    """Build an APIError from a tunnel END frame's ``error`` member
    (:func:`tooti.protocol.usage.read_end_error`)."""
    err = read_end_error(info)
    if err is None:
        return APIError(502, "node ended the stream without a response", code="bad_gateway")
    return APIError(err.status or 502, err.message or "backend error", code=err.code,
                    param=err.param, type=err.type)
