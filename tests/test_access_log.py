"""The access log (one record per ``/v1`` request, :mod:`tooti.gateway.access_log`) and
the log formats (:mod:`tooti.logging_setup`), against a real gateway on a loopback port.

Records are caught by a handler on ``tooti.access`` that wakes the test when one
arrives (no sleeps): the record is written when the request ends, which for a client
that walked away is after the client's own call returned.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import Network, simulated
from tests.log_capture import LogWatch, watching
from tooti.gateway.access_log import AccessRecord
from tooti.gateway.app import Gateway
from tooti.logging_setup import JsonFormatter, formatter_for, iso_utc
from tooti.settings import GatewaySettings, TunnelSettings

CHAT = "/v1/chat/completions"


def chat(model: str = "tooti-sim", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


class Records(LogWatch):
    """The access records; :meth:`wait` returns once enough have arrived."""

    async def wait(self, count: int) -> list[AccessRecord]:
        await self.wait_count(count)
        return self.entries()

    def entries(self) -> list[AccessRecord]:
        entries = [r.msg for r in self.records]
        assert all(isinstance(e, AccessRecord) for e in entries)
        return entries  # type: ignore[return-value]

    def fields(self) -> list[dict[str, Any]]:
        return [entry.log_fields() for entry in self.entries()]


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    with watching("tooti.access", logging.INFO, handler):
        yield handler


async def test_served_requests_are_logged_with_node_tokens_and_timing(
        network: Network, records: Records) -> None:
    await network.add_node([simulated(tokens=7)], node_id="node-a")
    async with network.client() as http:
        plain = await http.post(CHAT, json=chat())
        streamed = await http.post(CHAT, json=chat(stream=True))
        models = await http.get("/v1/models")
    assert plain.status_code == streamed.status_code == models.status_code == 200
    entries = await records.wait(3)
    fields = records.fields()
    ids = [plain.headers["x-request-id"], streamed.headers["x-request-id"],
           models.headers["x-request-id"]]
    assert [f["request_id"] for f in fields] == ids
    for f, stream in zip(fields[:2], (False, True), strict=True):
        assert f["status"] == 200 and f["outcome"] == "ok" and f["error"] is None
        assert f["node"] == "node-a" and f["model"] == "tooti-sim" and f["attempts"] == 1
        assert f["completion_tokens"] == 7 and isinstance(f["prompt_tokens"], int)
        assert f["prompt_tokens"] > 0 and f["tokens_estimated"] is False
        assert f["stream"] is stream and f["key_id"] is None
        assert isinstance(f["ttft_ms"], float) and f["duration_ms"] >= f["ttft_ms"]
        assert f["method"] == "POST" and f["path"] == CHAT
    text = str(entries[1])
    assert text.startswith(f"req={ids[1]} key=- method=POST path={CHAT} model=tooti-sim "
                           "node=node-a status=200 outcome=ok tokens=")
    assert "/7 ttft_ms=" in text and " ms=" in text and text.endswith(" stream=yes")
    assert fields[2]["path"] == "/v1/models" and fields[2]["status"] == 200
    assert str(entries[2]).endswith("status=200 outcome=ok tokens=- ms=" +
                                    f"{entries[2].duration_ms:.0f}")


async def test_refusals_are_logged_with_status_and_code(
        network: Network, records: Records) -> None:
    await network.add_node([simulated()], node_id="node-a")
    async with network.client() as http:
        answers = [
            await http.post(CHAT, content=b"{not json"),  # 400
            await http.post(CHAT, json=chat("no-such-model")),  # 404
            await http.get(CHAT),  # 405
            await http.get("/v1/nothing-here"),  # 404, no route
        ]
    statuses = [a.status_code for a in answers]
    assert statuses == [400, 404, 405, 404]
    await records.wait(4)
    fields = records.fields()
    assert [f["status"] for f in fields] == statuses
    assert all(f["outcome"] == "error" for f in fields)
    assert [f["error"] for f in fields] == [a.json()["error"]["code"] for a in answers]
    assert fields[1]["model"] == "no-such-model" and fields[1]["node"] is None
    assert fields[1]["prompt_tokens"] is None
    assert "tokens=-" in str(records.entries()[1])


async def test_failover_names_the_node_that_served_and_the_attempts(
        network: Network, records: Records) -> None:
    await network.add_node([simulated(fail_rate=1.0, fail_status=503)], node_id="node-bad")
    await network.add_node([simulated(tokens=3)], node_id="node-good")
    async with network.client() as http:
        answer = await http.post(CHAT, json=chat(
            provider={"order": ["node-bad", "node-good"]}))
    assert answer.status_code == 200
    [entry] = await records.wait(1)
    fields = entry.log_fields()
    assert (fields["node"], fields["attempts"], fields["outcome"]) == ("node-good", 2, "ok")
    assert "node=node-good attempts=2 status=200 outcome=ok tokens=" in str(entry)


async def test_a_client_that_leaves_is_logged_cancelled(
        network: Network, records: Records, nursery: trio.Nursery) -> None:
    await network.add_node([simulated(stall=30)], node_id="node-a")
    routed = trio.Event()
    network.gateway.registry.bus.listeners.append(
        lambda event: routed.set() if event.kind == "request.routed" else None)
    async with network.client() as http, trio.open_nursery() as inner:
        inner.start_soon(lambda: http.post(CHAT, json=chat(stream=True)))
        with trio.fail_after(10):
            await routed.wait()
        inner.cancel_scope.cancel()  # the client gives up before any byte
    [entry] = await records.wait(1)
    fields = entry.log_fields()
    assert (fields["status"], fields["outcome"]) == (499, "cancelled")
    assert fields["node"] is None and fields["attempts"] == 1  # no node answered
    assert fields["stream"] is True and fields["model"] == "tooti-sim"
    assert "status=499 outcome=cancelled" in str(entry)


async def test_off_switch_writes_nothing(records: Records, nursery: trio.Nursery) -> None:
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0", access_log=False),
                      TunnelSettings())
    urls = await nursery.start(gateway.serve)
    async with httpx.AsyncClient(base_url=urls[0]) as http:
        assert (await http.get("/v1/models")).status_code == 200
        assert (await http.get("/healthz")).status_code == 200
    gateway.shutdown()
    assert records.records == []


async def test_admin_and_healthz_are_not_access_logged(
        network: Network, records: Records) -> None:
    async with network.client() as http:
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/admin/v1/peers")).status_code == 200
        last = await http.get("/v1/models")
    [entry] = await records.wait(1)
    assert entry.request_id == last.headers["x-request-id"]


async def test_client_chosen_values_cannot_forge_a_line(
        network: Network, records: Records) -> None:
    await network.add_node([simulated()], node_id="node-a")
    model = 'evil\nreq=forged status=200 "x'
    async with network.client() as http:
        assert (await http.post(CHAT, json=chat(model))).status_code == 404
    [entry] = await records.wait(1)
    text = str(entry)
    assert "\n" not in text and text.count(" req=") == 0
    assert 'model="evil\\u000areq=forged status=200 \\"x"' in text


# ------------------------------------------------------------ formats


def _record(msg: Any, args: tuple[Any, ...] = (), exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("tooti.gateway", logging.WARNING, __file__, 1, msg, args,
                               exc_info)
    record.created = 86400.25
    return record


def test_json_format_is_one_object_per_line_with_the_core_fields() -> None:
    line = JsonFormatter().format(_record("peer %s left\n(twice)", ("n1",), exc=True))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["ts"] == "1970-01-02T00:00:00.250Z" == iso_utc(86400.25)
    assert (entry["level"], entry["logger"]) == ("warning", "tooti.gateway")
    assert entry["msg"] == "peer n1 left\n(twice)"
    assert entry["exc"].startswith("Traceback") and "ValueError: boom" in entry["exc"]


async def test_json_format_types_an_access_records_fields() -> None:
    record = AccessRecord("req_1", "POST", CHAT)
    record.model, record.stream, record.status = "m", True, 429
    record.error, record.duration_ms = "rate_limited", 12.34
    entry = json.loads(JsonFormatter().format(_record(record)))
    assert entry["msg"] == f"POST {CHAT} 429"
    assert entry["status"] == 429 and entry["duration_ms"] == 12.3
    assert entry["stream"] is True and entry["outcome"] == "error"
    assert entry["error"] == "rate_limited" and entry["prompt_tokens"] is None
    text = formatter_for("text").format(_record(record))
    assert text.endswith(f"WARNING tooti.gateway: req=req_1 key=- method=POST path={CHAT} "
                         "model=m status=429 outcome=error error=rate_limited tokens=- "
                         "ms=12 stream=yes")


@pytest.mark.parametrize("access_log", [True, False])
def test_setup_logging_one_format_for_every_logger(access_log: bool) -> None:
    """In a fresh process (the root logger unconfigured, as in ``tooti run``): JSON lines
    for tooti's and the libraries' records, INFO hidden at ``warning`` but the access
    log's, which follows its own switch."""
    script = (
        "import logging\n"
        "from tooti.logging_setup import setup_logging\n"
        f"setup_logging('warning', 'json', access_log={access_log})\n"
        "logging.getLogger('tooti.access').info('a request')\n"
        "logging.getLogger('tooti.gateway').info('hidden at warning')\n"
        "logging.getLogger('tooti.gateway').warning('shown')\n"
        "logging.getLogger('hypercorn.error').info('library chatter')\n"
        "logging.getLogger('hypercorn.error').error('library error')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout == ""
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    expected = [("tooti.gateway", "shown"), ("hypercorn.error", "library error")]
    if access_log:
        expected.insert(0, ("tooti.access", "a request"))
    assert [(e["logger"], e["msg"]) for e in lines] == expected
