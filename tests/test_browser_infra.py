"""The real-browser machinery of the console's tests (``tests/browser.py``), proved on a
tiny page rather than on the console itself.

A small ASGI app runs under hypercorn in the test's own trio loop, on a real loopback
port, exactly as the gateway does in the console's browser tests. Its page carries the
console's kind of Content-Security-Policy (scripts from the page's origin only) and loads
one local script file; a click on its button makes that script ask the server for an
answer and write it into the page. The tests drive it with headless Chromium through
``in_thread`` (so the trio loop keeps serving while selenium waits) and check:

* the click's result arrives from the server (a fetch by a CSP-allowed local script);
* the browser enforces the CSP (the page's inline script does not run, and
  ``browser_errors`` reports the refusal), so the console's tests can rely on it;
* ``screenshot`` writes a non-empty PNG of the whole page, and ``phone`` renders at a
  phone's width (the PNG is 390 CSS pixels wide at scale 2) and restores the desktop;
* each test gets a clean browser: a cookie set in one test is gone in the next;
* with a binary missing, the fixture's reason names it and the install script;
* ``make test`` runs ``scripts/install-chromium.sh``, and the script never fails the
  build: without apt-get, or with an apt-get that fails, it prints one line saying why
  and exits 0 (run on a copy pointed at binaries that do not exist, with a stand-in
  apt-get, so nothing is installed).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

import tests.browser as browser_module
from tests.browser import (
    BrowserUnavailable,
    browser_errors,
    in_thread,
    phone,
    screenshot,
    start_chromium,
    wait_for,
)

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'")

PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>browser infra</title><link rel="stylesheet" href="/page.css"></head>
<body><h1>browser infra</h1>
<button id="go" type="button">Ask the server</button>
<p>Answer: <output id="result"></output></p>
<p id="inline">the inline script did not run</p>
<p id="cookie"></p>
<script src="/page.js"></script>
<script>document.getElementById("inline").textContent = "the inline script ran";</script>
</body></html>
"""

SCRIPT = b"""document.getElementById("cookie").textContent = "cookie:" + document.cookie;
document.getElementById("go").addEventListener("click", async () => {
  const answer = await fetch("/answer", {method: "POST"});
  document.getElementById("result").textContent = await answer.text();
});
"""

STYLE = b"""body { font-family: sans-serif; margin: 2rem; }
h1 { font-size: 3rem; }
@media (max-width: 600px) { h1 { font-size: 1.5rem; } }
"""


class Site:
    """The tiny ASGI app: the page, its script and stylesheet, and ``POST /answer``
    (which counts its calls and sets a cookie)."""

    def __init__(self) -> None:
        self.answers = 0
        self.cookies_seen: list[tuple[str, str]] = []  # (path, Cookie header) per request

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                      send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": message["type"] + ".complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path, method = scope["path"], scope["method"]
        self.cookies_seen.append((path, dict(scope["headers"]).get(b"cookie", b"").decode()))
        extra: list[tuple[bytes, bytes]] = []
        if (method, path) == ("GET", "/"):
            status, kind, body = 200, b"text/html; charset=utf-8", PAGE
        elif (method, path) == ("GET", "/page.js"):
            status, kind, body = 200, b"text/javascript", SCRIPT
        elif (method, path) == ("GET", "/page.css"):
            status, kind, body = 200, b"text/css", STYLE
        elif (method, path) == ("POST", "/answer"):
            self.answers += 1
            status, kind, body = 200, b"text/plain", f"pong {self.answers}".encode()
            extra.append((b"set-cookie", b"seen=yes; Path=/; SameSite=Strict"))
        else:
            status, kind, body = 404, b"text/plain", b"not found"
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", kind), (b"content-security-policy", CSP.encode()),
            (b"cache-control", b"no-store"), *extra]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def site(nursery: trio.Nursery) -> AsyncIterator[tuple[Site, str]]:
    """The site on a free loopback port, served from the test's trio loop; its URL."""
    app = Site()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    done = trio.Event()
    binds = await nursery.start(partial(serve, app, config, shutdown_trigger=done.wait))
    yield app, binds[0]
    done.set()


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's header; fails when the file is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def test_click_runs_a_local_script_that_asks_the_server(
        browser: Any, site: tuple[Site, str]) -> None:
    app, url = site
    await in_thread(browser.get, url + "/")
    button = await in_thread(wait_for, browser, "#go")
    await in_thread(button.click)
    result = await in_thread(wait_for, browser, "#result", text="pong")
    assert await in_thread(lambda: result.text) == "pong 1"
    assert app.answers == 1
    # the browser enforces the CSP: the inline script was refused, and it says so
    inline = await in_thread(wait_for, browser, "#inline")
    assert await in_thread(lambda: inline.text) == "the inline script did not run"
    errors = await in_thread(browser_errors, browser)
    assert len(errors) == 1 and "Content Security Policy" in errors[0], errors

    shot = await in_thread(screenshot, browser, "infra-desktop")
    assert shot.parent == browser_module.OUTPUT and shot.stat().st_size > 1000
    assert png_size(shot)[0] == 1280

    def on_a_phone() -> tuple[int, Path]:
        with phone(browser):
            width = browser.execute_script("return window.innerWidth")
            return width, screenshot(browser, "infra-phone")

    width, phone_shot = await in_thread(on_a_phone)
    assert width == 390
    assert png_size(phone_shot)[0] == 390 * 2  # the phone's device scale factor
    assert await in_thread(browser.execute_script, "return window.innerWidth") == 1280


async def test_each_test_gets_a_clean_browser(browser: Any,
                                             site: tuple[Site, str]) -> None:
    """The previous test's server set a cookie on 127.0.0.1; it is gone here (each test
    starts with no cookies, even though the browser is the session's one)."""
    app, url = site
    await in_thread(browser.get, url + "/")
    await in_thread(wait_for, browser, "#cookie", text="cookie:")
    await in_thread((await in_thread(wait_for, browser, "#go")).click)
    await in_thread(wait_for, browser, "#result", text="pong 1")
    assert app.cookies_seen[0] == ("/", "")  # the page itself came without a cookie
    await in_thread(browser.get, url + "/")  # now this server's own cookie is sent
    await in_thread(wait_for, browser, "#cookie", text="seen=yes")
    assert [c for p, c in app.cookies_seen if p == "/"] == ["", "seen=yes"]


def test_a_missing_binary_is_named_with_the_install_script(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(browser_module, "CHROMEDRIVER", str(tmp_path / "chromedriver"))
    with pytest.raises(BrowserUnavailable) as caught:
        start_chromium(tmp_path / "profile")
    reason = str(caught.value)
    assert str(tmp_path / "chromedriver") in reason and "chromium-driver" in reason
    assert "bash scripts/install-chromium.sh" in reason


def test_a_browser_that_cannot_start_says_so(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    """A Chromium that exits at once (here a stand-in script) is BrowserUnavailable with
    the driver's first line, so the fixture skips with it rather than erroring."""
    if browser_module.missing_binaries() is not None:
        pytest.skip(browser_module.missing_binaries())
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\necho 'no display, no luck' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(browser_module, "CHROMIUM", str(fake))
    with pytest.raises(BrowserUnavailable, match="Chromium did not start") as caught:
        start_chromium(tmp_path / "profile")
    assert "install-chromium.sh" in str(caught.value)


ROOT = Path(__file__).resolve().parent.parent
SCRIPT_PATH = ROOT / "scripts" / "install-chromium.sh"


def run_install_script(tmp_path: Path, apt_get: str | None) -> subprocess.CompletedProcess[str]:
    """The install script as on a machine without Chromium: a copy whose binaries are
    paths that do not exist, with only the tools it needs on PATH (``apt_get``, when
    given, is the stand-in apt-get's shell body)."""
    script = tmp_path / "install-chromium.sh"
    script.write_text(SCRIPT_PATH.read_text().replace("/usr/bin/chrom", str(tmp_path / "chrom")))
    shutil.copy(SCRIPT_PATH.parent / "apt-optional.sh", tmp_path)  # what it sources
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("bash", "mktemp", "tail", "id", "rm", "sudo"):
        found = shutil.which(tool)
        if found:
            (tools / tool).symlink_to(found)
    if apt_get is not None:
        (tools / "apt-get").write_text("#!/bin/sh\n" + apt_get)
        (tools / "apt-get").chmod(0o755)
    env = {**os.environ, "PATH": str(tools)}
    return subprocess.run([str(tools / "bash"), str(script)], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(("apt_get", "why"), [
    (None, "no apt-get here"),
    ("echo 'E: Unable to locate package chromium' >&2; exit 100\n",
     "E: Unable to locate package chromium"),
])
def test_the_install_script_never_fails_the_build(tmp_path: Path, apt_get: str | None,
                                                  why: str) -> None:
    if apt_get is not None and os.geteuid() != 0 and shutil.which("sudo") is None:
        pytest.skip("the apt-get path runs as root or with sudo")
    result = run_install_script(tmp_path, apt_get)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and why in lines[0], result.stderr
    assert "browser tests will skip" in lines[0]
    assert result.stdout == ""


def test_the_install_script_does_nothing_when_chromium_is_there(tmp_path: Path) -> None:
    """Both binaries present (stand-ins here): no apt-get is run, nothing is printed."""
    for name in ("chromium", "chromedriver"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    result = run_install_script(tmp_path, "echo apt-get ran >&2; exit 1\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_test_installs_chromium() -> None:
    result = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    commands = result.stdout.splitlines()
    assert "bash scripts/install-chromium.sh" in commands
    assert commands.index("bash scripts/install-chromium.sh") < commands.index(
        ".venv/bin/python -m pytest -q")
