"""The data dir: the suite never reaches the user's, and one process holds each.

* Isolation (issue 14, bug 2): ``tests/conftest.py`` points HOME (and XDG_DATA_HOME,
  TOOTI_DATA_DIR) at a session directory before any test runs, so the default data dir
  ``~/.local/share/tooti`` resolves there, in this process and in its children.
* Lock (bug 3): ``tooti run`` holds ``<data_dir>/tooti.lock`` (:mod:`tooti.data_dir_lock`);
  a second process on the same dir exits 2 with one line naming the dir and
  ``--data-dir``; the kernel drops the lock when its holder dies, even by SIGKILL.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.conftest import SESSION_HOME
from tests.processes import START_TIMEOUT, Tooti, spawn
from tooti.config import ConfigError
from tooti.data_dir_lock import LOCK_FILE, lock_data_dir
from tooti.settings import Settings

GATEWAY_CONFIG = 'roles = ["gateway"]\ndrain_grace = 1.0\n[gateway]\nlisten = "127.0.0.1:0"\n'
LISTENING = r"gateway listening on http://127\.0\.0\.1:\d+"


def default_data_dir() -> Path:
    """Where ``Settings().data_dir`` resolves in this process."""
    return Path(os.path.expanduser(Settings().data_dir)).resolve()


# ---------------------------------------------------------------- isolation (bug 2)


def test_the_default_data_dir_is_inside_the_session_home() -> None:
    real_home = Path(os.environ["TOOTI_TEST_REAL_HOME"]).resolve()
    session = SESSION_HOME.resolve()
    assert default_data_dir().is_relative_to(session)
    assert not default_data_dir().is_relative_to(real_home / ".local")
    assert default_data_dir() != (real_home / ".local" / "share" / "tooti")
    assert Path(os.environ["TOOTI_DATA_DIR"]).resolve().is_relative_to(session)
    assert Path(os.environ["XDG_DATA_HOME"]).resolve().is_relative_to(session)


def test_children_resolve_the_default_data_dir_inside_the_session_home() -> None:
    """A child process (``tooti run`` in tests/processes.py drops TOOTI_* variables)
    still finds HOME in the session directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOOTI_")}
    script = ("import os; from tooti.settings import Settings; "
              "print(os.path.realpath(os.path.expanduser(Settings().data_dir)))")
    out = subprocess.run([sys.executable, "-c", script], env=env, check=True,
                         capture_output=True, text=True).stdout.strip()
    assert Path(out).is_relative_to(SESSION_HOME.resolve())


# ---------------------------------------------------------------- the lock (bug 3)


def test_a_second_lock_on_the_same_dir_is_refused_naming_the_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with lock_data_dir(data_dir) as held:
        assert held.held and (data_dir / LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(ConfigError) as refused:
            lock_data_dir(data_dir)
        message = str(refused.value)
        assert str(data_dir) in message and "--data-dir" in message
        assert "\n" not in message
        with lock_data_dir(tmp_path / "other"):  # another dir is another lock
            pass
    assert not held.held
    with lock_data_dir(data_dir):  # released: the next process may take it
        pass


def test_a_lock_file_left_behind_does_not_block(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILE).write_text("999999999\n")  # a dead process's file
    with lock_data_dir(tmp_path) as held:
        assert held.held


def test_the_runner_refuses_a_locked_data_dir(tmp_path: Path) -> None:
    from tooti.runner import run

    settings = Settings(roles=["gateway"], data_dir=str(tmp_path))
    with lock_data_dir(tmp_path), pytest.raises(ConfigError, match="--data-dir"):
        run(settings)


async def test_a_second_tooti_run_on_the_same_data_dir_exits_naming_it(
    nursery: trio.Nursery, tmp_path: Path,
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(GATEWAY_CONFIG)
    data_dir = tmp_path / "data"
    children: list[Tooti] = []
    try:
        first = await spawn(nursery, config, data_dir, "first")
        children.append(first)
        with trio.fail_after(START_TIMEOUT):
            await first.wait_for(LISTENING)
        second = await spawn(nursery, config, data_dir, "second")
        children.append(second)
        with trio.fail_after(START_TIMEOUT):
            code = await second.process.wait()
            await second.eof.wait()
        assert code == 2, second.text
        lines = [line for line in second.text.splitlines() if line.strip()]
        assert len(lines) == 1, second.text
        assert lines[0].startswith("tooti: error:")
        assert str(data_dir) in lines[0] and "--data-dir" in lines[0]
        assert first.alive
        # The holder dies without cleaning up: its lock file stays, its lock does not.
        await first.kill()
        assert (data_dir / LOCK_FILE).exists()
        third = await spawn(nursery, config, data_dir, "third")
        children.append(third)
        with trio.fail_after(START_TIMEOUT):
            await third.wait_for(LISTENING)
    finally:
        for child in children:
            await child.kill()
