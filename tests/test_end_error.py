"""END's error members: built one way by nodes and relays, read one way by the gateway."""

from __future__ import annotations

from typing import Any

import pytest

from tooti.errors import from_end_info
from tooti.protocol.usage import EndError, end_error, read_end, read_end_error


def test_the_builder_writes_the_wire_members() -> None:
    assert end_error(503, "relay_busy", "full") == {
        "error": {"status": 503, "code": "relay_busy", "message": "full"}}
    assert end_error(400, "bad_body", "no", retryable=False) == {
        "error": {"status": 400, "code": "bad_body", "message": "no"}, "retryable": False}
    assert end_error(502, "node_unavailable", "gone", retryable=True)["retryable"] is True


def test_what_the_builder_writes_fits_the_schema_and_reads_back() -> None:
    info = end_error(429, "rate_limited", "slow down", retryable=True)
    assert read_end(info).error == EndError(429, "rate_limited", "slow down")
    assert read_end_error(info) == EndError(429, "rate_limited", "slow down")
    error = from_end_info(info)
    assert (error.status, error.code, error.message, error.type) == (
        429, "rate_limited", "slow down", "rate_limit_error")


@pytest.mark.parametrize(("error", "read"), [
    ({"status": 200, "message": 5, "code": ["x"]}, EndError(502, None, "backend error")),
    ({"status": True}, EndError(502, None, "backend error")),
    ({"status": 404, "param": "model", "type": "invalid_request_error", "message": "no"},
     EndError(404, None, "no", "model", "invalid_request_error")),
])
def test_the_reader_is_lenient(error: dict[str, Any], read: EndError) -> None:
    assert read_end_error({"error": error}) == read


def test_no_error_object_is_a_bad_gateway() -> None:
    assert read_end_error({"error": "boom"}) is None
    error = from_end_info({})
    assert (error.status, error.code) == (502, "bad_gateway")
