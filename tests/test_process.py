"""`tooti run` as a real process: drain on SIGTERM, exit at once on a second signal."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from tests.backend_fixtures import have_local_extra
from tests.processes import Tooti
from tooti.backends.llamacpp import LOCAL_EXTRA_HINT

CONFIG = """
roles = ["gateway", "node"]
drain_grace = 20.0
log_level = "info"

[gateway]
listen = "127.0.0.1:0"

[node]
id = "proc-node"

[[node.backends]]
type = "simulated"
[node.backends.options]
tokens = 12
tokens_per_second = 20.0
"""

STREAM = {"model": "tooti-sim", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


async def _start(nursery: trio.Nursery, tmp_path: Path) -> tuple[Tooti, str]:
    config = tmp_path / "tooti.toml"
    config.write_text(CONFIG)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tooti", "run", "--config", str(config),
         "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    tooti = Tooti(process)
    nursery.start_soon(tooti.pump, process.stdout)
    with trio.fail_after(30):
        match = await tooti.wait_for(r"tooti is ready on (http://\S+)")
    return tooti, match.group(1)


async def test_sigterm_drains_in_flight_stream_and_exits_zero(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    tooti, url = await _start(nursery, tmp_path)
    lines: list[str] = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        async with http.stream("POST", "/v1/chat/completions", json=STREAM) as response:
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    if not lines:
                        tooti.process.send_signal(signal.SIGTERM)
                        with trio.fail_after(10):
                            await tooti.wait_for("draining")
                    lines.append(line)
    with trio.fail_after(30):
        code = await tooti.process.wait()
    assert lines[-1] == "data: [DONE]"
    assert not any('"error"' in line for line in lines), (lines, tooti.text)
    assert sum(" tok" in line for line in lines) == 12
    assert code == 0, tooti.text


async def test_second_signal_exits_at_once(nursery: trio.Nursery, tmp_path: Path) -> None:
    tooti, url = await _start(nursery, tmp_path)
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        async with http.stream("POST", "/v1/chat/completions", json=STREAM) as response:
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    break
            tooti.process.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                await tooti.wait_for("draining")
            tooti.process.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                code = await tooti.process.wait()
    assert code == 130, tooti.text


@pytest.mark.llamacpp
@pytest.mark.skipif(not have_local_extra(), reason=LOCAL_EXTRA_HINT)
async def test_default_run_serves_the_embedded_model(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """`tooti run` with no role: gateway + in-process node + embedded llama.cpp."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tooti", "run", "--listen", "127.0.0.1:0",
         "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    tooti = Tooti(process)
    nursery.start_soon(tooti.pump, process.stdout)
    with trio.fail_after(120):
        match = await tooti.wait_for(r"tooti is ready on (http://\S+) serving (\S+)\.")
    url, model = match.group(1), match.group(2)
    assert model == "gemma-3-270m"
    curl = (await tooti.wait_for(r"curl (http://\S+) -H '([^']+)' -d '([^']+)'"))
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(curl.group(1), content=curl.group(3),
                                   headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] > 0
    assert url in curl.group(1)
    process.send_signal(signal.SIGTERM)
    with trio.fail_after(30):
        assert await process.wait() == 0, tooti.text
