"""A real browser for the console's tests: Debian's headless Chromium driven by selenium.

What it gives a test
--------------------
* the ``browser`` fixture (every test has it: ``tests/conftest.py`` loads this module
  as a plugin): a :class:`selenium.webdriver.Chrome` on ``/usr/bin/chromium``
  through ``/usr/bin/chromedriver`` (Debian's ``chromium`` and ``chromium-driver``
  packages, which ``make test`` installs with ``scripts/install-chromium.sh``). One browser
  is started per test session (start-up costs a second or two); before each test it is
  reset to a clean state: every cookie and every origin's storage cleared, the desktop
  window size, ``about:blank``. A browser that died in an earlier test is started again.
* :func:`in_thread`: every selenium call is blocking (an HTTP request to chromedriver,
  which itself waits for the page). The tests' servers (gateway, console) run in the
  test's own trio loop, so a selenium call made on that loop would block the very loop
  that has to answer the browser: a deadlock. Make every call through
  ``await in_thread(fn, *args)`` (``trio.to_thread.run_sync``), e.g.
  ``await in_thread(driver.get, url)``, ``await in_thread(wait_for, driver, "#balance")``.
  A server started in a thread of its own (``http.server``) does not need this.
* :func:`wait_for`: waits for a CSS selector (visible, and optionally containing a text)
  with selenium's ``WebDriverWait``; never a ``sleep``.
* :func:`screenshot`: a PNG of the page into :data:`OUTPUT` (``tests/.output/console/``,
  or ``$TOOTI_SCREENSHOTS``), named by the test (``screenshot(driver, "user-keys")`` →
  ``user-keys.png``), whole page by default. The directory is kept after the run (the
  docs take the main ones from there) and ignores itself in git (a ``.gitignore`` of ``*``).
* :func:`phone`: a context manager that shows the page as a phone does (390x844 CSS
  pixels, mobile viewport rules) for one screenshot or check, then the desktop again.
* :func:`browser_errors`: what the page logged as errors (JavaScript exceptions, CSP
  refusals, failed loads), so a test can assert a page runs clean under its CSP.

Offline, always
---------------
Selenium Manager (which would download a driver or a browser) is never used: the
driver's path is given in an explicit :class:`Service`, the browser's in
``binary_location``, and ``SE_OFFLINE=true`` is set besides. Chromium starts with
background networking, component updates, sync and QUIC off, in a fresh temporary
``--user-data-dir`` removed at the end.

When there is no browser
------------------------
A missing ``/usr/bin/chromium`` or ``/usr/bin/chromedriver`` (the install script could
not install them) skips the tests that use the fixture with the reason (which binary,
and that ``bash scripts/install-chromium.sh`` installs it); an installed browser that
cannot start fails them. Set ``TOOTI_REQUIRE_BROWSER=1`` to make a missing browser a
failure too.
"""

from __future__ import annotations

import atexit
import base64
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL_HINT = "bash scripts/install-chromium.sh installs it (Debian's chromium, chromium-driver)"

DESKTOP = (1280, 900)
PHONE = (390, 844)

OUTPUT = Path(os.environ.get("TOOTI_SCREENSHOTS")
              or Path(__file__).resolve().parent / ".output" / "console")
"""Where :func:`screenshot` writes; kept after the run."""

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
)

T = TypeVar("T")


class BrowserUnavailable(RuntimeError):
    """The browser is missing or cannot start; the message says which and why."""


def missing_binaries() -> str | None:
    """Why the browser cannot be used here, or None when both binaries are present."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (Debian's {package} package): {INSTALL_HINT}"
    return None


def start_chromium(user_data_dir: Path) -> Any:
    """A new headless Chromium session on ``user_data_dir``; BrowserUnavailable if not."""
    reason = missing_binaries()
    if reason is not None:
        raise BrowserUnavailable(reason)
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager, if ever reached, downloads nothing
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={user_data_dir}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER)
    try:
        driver = webdriver.Chrome(service=service, options=options)
    except (WebDriverException, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BrowserUnavailable(f"Chromium did not start: {first} ({INSTALL_HINT})") from exc
    driver.set_page_load_timeout(30)
    return driver


def _unavailable(reason: str) -> None:
    """Skip only when the browser is not installed (the install script could not install
    it); an installed browser that cannot start is a failure, as it would hide a broken
    console from the suite."""
    if os.environ.get("TOOTI_REQUIRE_BROWSER", "") not in ("", "0"):
        pytest.fail(f"TOOTI_REQUIRE_BROWSER is set but {reason}", pytrace=False)
    if not missing_binaries():
        pytest.fail(f"Chromium is installed but unusable: {reason}", pytrace=False)
    pytest.skip(reason)


class _Chromium:
    """The session's one browser, started on first use and again if it has died."""

    def __init__(self) -> None:
        self.driver: Any = None
        self.profile: Path | None = None
        self.unavailable: BrowserUnavailable | None = None  # once, not once per test

    def get(self) -> Any:
        if self.unavailable is not None:
            raise self.unavailable
        if self.driver is not None:
            try:
                reset(self.driver)
                return self.driver
            except Exception:  # a browser that crashed or hung in an earlier test
                self.close()
        self.profile = Path(tempfile.mkdtemp(prefix="tooti-chromium-"))
        try:
            self.driver = start_chromium(self.profile)
        except BrowserUnavailable as exc:
            self.close()
            self.unavailable = exc
            raise
        return self.driver

    def close(self) -> None:
        if self.driver is not None:
            try:
                self.driver.quit()
            except Exception:  # already gone; quit() is best effort
                pass
            self.driver = None
        if self.profile is not None:
            shutil.rmtree(self.profile, ignore_errors=True)
            self.profile = None


def reset(driver: Any) -> None:
    """A clean browser for the next test: no cookies, no storage, desktop size, blank."""
    set_desktop(driver)  # a test that left the phone size on
    driver.execute_cdp_cmd("Network.clearBrowserCookies", {})
    driver.execute_cdp_cmd("Storage.clearDataForOrigin",
                           {"origin": "*", "storageTypes": "all"})
    driver.get("about:blank")
    driver.get_log("browser")  # drop what the previous test's pages logged


_SESSION = _Chromium()
"""The test session's one browser, shared by every test module."""
atexit.register(_SESSION.close)  # a run that never reaches pytest_sessionfinish


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The session's browser quits (and its profile goes) with the test session."""
    _SESSION.close()


@pytest.fixture
def browser() -> Any:
    """Headless Chromium (a selenium ``WebDriver``), clean for this test; skips (with the
    reason) when the browser is missing or cannot start. Use it through :func:`in_thread`
    when the server runs in the test's trio loop. Every test has it: tests/conftest.py
    loads this module as a plugin."""
    try:
        return _SESSION.get()
    except BrowserUnavailable as exc:
        _unavailable(str(exc))


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a worker thread, so the test's trio loop keeps serving
    the page meanwhile (``await in_thread(wait_for, driver, "#keys", text="ci-key")``)."""
    return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))


def wait_for(driver: Any, css: str, timeout: float = 10.0, *, text: str | None = None,
             visible: bool = True) -> Any:
    """The first element matching ``css`` once it is there (displayed, unless
    ``visible=False``; containing ``text`` when given); TimeoutException after
    ``timeout`` seconds, naming the selector and what the page showed."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def found(d: Any) -> Any:
        for element in d.find_elements(By.CSS_SELECTOR, css):
            try:
                if visible and not element.is_displayed():
                    continue
                if text is not None and text not in element.text:
                    continue
            except StaleElementReferenceException:
                continue
            return element
        return False

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(found)
    except TimeoutException as exc:
        want = f"{css!r}" + (f" containing {text!r}" if text is not None else "")
        page = driver.find_element(By.TAG_NAME, "body").text[:500] if driver.find_elements(
            By.TAG_NAME, "body") else ""
        raise TimeoutException(f"no {want} after {timeout}s at {driver.current_url}; "
                               f"the page shows: {page!r}") from exc


def screenshot(driver: Any, name: str, *, full_page: bool = True) -> Path:
    """The page as a PNG in :data:`OUTPUT` / ``<name>.png`` (the whole page, or only the
    window with ``full_page=False``); the path."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"a screenshot name is letters, digits, '-', '_', '.': {name!r}")
    OUTPUT.mkdir(parents=True, exist_ok=True)
    ignore = OUTPUT.parent / ".gitignore" if OUTPUT.parent.name == ".output" else None
    if ignore is not None and not ignore.exists():
        ignore.write_text("# screenshots of the browser tests (tests/browser.py)\n*\n")
    if full_page:
        shot = driver.execute_cdp_cmd(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        png = base64.b64decode(shot["data"])
    else:
        png = driver.get_screenshot_as_png()
    path = OUTPUT / f"{name.removesuffix('.png')}.png"
    path.write_bytes(png)
    return path


def set_phone(driver: Any, width: int = PHONE[0], height: int = PHONE[1]) -> None:
    """Show pages as a phone does: a ``width`` x ``height`` CSS-pixel viewport, the mobile
    viewport rules (``<meta name=viewport>``) honoured, touch on."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 2, "mobile": True})
    driver.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": True})


def set_desktop(driver: Any) -> None:
    """Back to the desktop window (undoes :func:`set_phone`)."""
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    driver.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": False})


@contextmanager
def phone(driver: Any, width: int = PHONE[0], height: int = PHONE[1]) -> Iterator[Any]:
    """``with phone(driver): screenshot(driver, "keys-phone")``: phone-sized inside, the
    desktop again after. In a trio test, call it inside a function run by :func:`in_thread`
    (or use :func:`set_phone` / :func:`set_desktop` through it)."""
    set_phone(driver, width, height)
    try:
        yield driver
    finally:
        set_desktop(driver)


def browser_errors(driver: Any) -> list[str]:
    """The messages the page logged as errors since the last call (JavaScript exceptions,
    Content-Security-Policy refusals, resources that failed to load). A missing
    ``/favicon.ico`` is left out: the browser asks for it on its own, not the page."""
    return [entry["message"] for entry in driver.get_log("browser")
            if entry.get("level") == "SEVERE"
            and not entry["message"].split(" ", 1)[0].endswith("/favicon.ico")]
