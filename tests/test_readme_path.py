"""The README's newcomer path, run as written: a gateway, a relay dialling it and a node
dialling the relay, each its own ``tooti run`` process, then the ``curl``,
``tooti peers`` and ``tooti usage`` the README shows.

The commands are read from the ``sh`` block between the ``<!-- newcomer-path: begin``
and ``<!-- newcomer-path: end -->`` comments of README.md, so the README cannot drift
from what works. Only what must differ in a test is substituted: ``.venv/bin/tooti``
becomes this interpreter's ``python -m tooti``, the ports 8080 and 9090 become free
ones, and the ``/tmp/tooti-…`` data dirs move into the test's temporary directory.
Every ``tooti run`` is started in the README's order and waited for by its log line
(listening, connected); the gateway's "peer my-node serves" line marks the node
routable through the relay. ``curl`` runs as a real process when it is installed (its
arguments are otherwise replayed with httpx, so the test needs no curl).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import trio

from tests.processes import Tooti

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- newcomer-path: begin"
END = "<!-- newcomer-path: end -->"
START_TIMEOUT = 30.0
"""Hang guard for one process to start (imports on a loaded 2-core machine are slow)."""


def child_env() -> dict[str, str]:
    """This environment without ``TOOTI_*`` settings: the commands say everything."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TOOTI_")}


def readme_commands() -> list[str]:
    """The newcomer path's commands: the ``sh`` block between the markers, backslash
    continuations joined, comments and blank lines dropped."""
    text = (ROOT / "README.md").read_text()
    assert BEGIN in text and END in text, "README.md lost the newcomer-path markers"
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    body = block.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = []
    for line in body.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            commands.append(re.sub(r"\s+", " ", line))
    return commands


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def substitute(command: str, ports: dict[str, int], data: Path) -> list[str]:
    for readme_port, port in ports.items():
        command = command.replace(f"127.0.0.1:{readme_port}", f"127.0.0.1:{port}")
    command = command.replace("/tmp/tooti-", f"{data}/tooti-")
    argv = shlex.split(command)
    if argv[0] == ".venv/bin/tooti":
        argv = [sys.executable, "-m", "tooti", *argv[1:]]
    return argv


def test_readme_path_has_the_three_roles_on_their_own_data_dirs() -> None:
    commands = readme_commands()
    runs = [c for c in commands if c.startswith(".venv/bin/tooti run ")]
    assert [re.search(r"--role (\w+)", c).group(1) for c in runs] == [  # type: ignore[union-attr]
        "gateway", "relay", "node"]
    data_dirs = [re.search(r"--data-dir (\S+)", c).group(1) for c in runs]  # type: ignore[union-attr]
    assert len(set(data_dirs)) == 3, data_dirs  # one process per data dir: it is locked
    assert any(c.startswith("curl ") for c in commands)
    assert any(c.startswith(".venv/bin/tooti peers ") for c in commands)
    assert any(c.startswith(".venv/bin/tooti usage ") for c in commands)


async def run_curl(argv: list[str]) -> str:
    """``curl`` as a process when installed; else its -H/-d/-i arguments through httpx."""
    if shutil.which("curl"):
        result = await trio.run_process(["curl", "-sS", *argv[1:]], capture_stdout=True,
                                        capture_stderr=True, check=False)
        assert result.returncode == 0, result.stderr.decode()
        return result.stdout.decode()
    url = next(a for a in argv[1:] if a.startswith("http"))
    headers = dict(h.split(": ", 1) for h in
                   (argv[i + 1] for i, a in enumerate(argv) if a == "-H"))
    body = argv[argv.index("-d") + 1]
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(url, content=body, headers=headers)
    head = "".join(f"{k}: {v}\r\n" for k, v in response.headers.items())
    return f"HTTP/1.1 {response.status_code}\r\n{head}\r\n{response.text}"


async def test_readme_newcomer_path_serves_through_the_relay(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    ports = {"8080": free_port(), "9090": free_port()}
    started: dict[str, Tooti] = {}
    ready = {"gateway": r"gateway listening on http://", "relay": r"connected to ws://",
             "node": r"connected to ws://"}
    outputs: list[str] = []
    try:
        for command in readme_commands():
            argv = substitute(command, ports, tmp_path)
            if command.startswith(".venv/bin/tooti run "):
                role = argv[argv.index("--role") + 1]
                process = await trio.lowlevel.open_process(
                    argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, env=child_env())
                assert process.stdout is not None
                tooti = started[role] = Tooti(process, role)
                nursery.start_soon(tooti.pump, process.stdout)
                with trio.fail_after(START_TIMEOUT):
                    await tooti.wait_for(ready[role])
                continue
            if not outputs:  # the first request: once the gateway routes to the node
                with trio.fail_after(START_TIMEOUT):
                    await started["gateway"].wait_for(r"peer my-node serves tooti-sim \(via ")
            if argv[0] == "curl":
                outputs.append(await run_curl(argv))
            else:
                result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                                check=False, env=child_env())
                assert result.returncode == 0, result.stderr.decode()
                outputs.append(result.stdout.decode())
    except BaseException:
        for tooti in started.values():
            await tooti.kill()
            print(f"--- {tooti.name}\n{tooti.text}")
        raise
    for tooti in started.values():
        tooti.signal(signal.SIGINT)  # what Ctrl-C in its terminal sends
    answer, peers, usage = outputs
    head, _, body = answer.replace("\r\n", "\n").partition("\n\n")
    assert head.startswith("HTTP/1.1 200"), answer
    assert re.search(r"^x-tooti-node: my-node$", head, re.MULTILINE | re.IGNORECASE), head
    completion = json.loads(body)
    assert completion["model"] == "tooti-sim"
    assert completion["usage"]["completion_tokens"] == 8
    relay = re.search(r"^\s+(\S+)\s+relay\s+live\s+direct", peers, re.MULTILINE)
    assert relay, peers
    assert re.search(rf"^\s+my-node\s+node\s+live\s+via {re.escape(relay.group(1))}\b.*tooti-sim",
                     peers, re.MULTILINE), peers
    by_node = usage.split("by node:", 1)[1]
    assert re.search(r"^\s+my-node\s+1\s+\d+\s+8\b", by_node, re.MULTILINE), usage
    for tooti in started.values():
        with trio.fail_after(START_TIMEOUT):
            assert await tooti.process.wait() == 0, tooti.text
