"""Tests for the ``tooti`` command line (tooti.cli)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest

import tooti
from tooti.cli import GATEWAY_HELP, _parser, main, usage_table
from tooti.config import ConfigError
from tooti.settings import BackendSettings, Settings

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
SECRETS = ("s3cret-join", "s3cret-admin", "sk-s3cret")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TOOTI_"):
            monkeypatch.delenv(name)


@pytest.fixture
def reloads() -> list[Callable[[], Settings]]:
    """The ``reload`` functions the fake runner got (how SIGHUP rebuilds the settings)."""
    return []


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch,
           reloads: list[Callable[[], Settings]]) -> list[Settings]:
    """Replace tooti.runner with a fake that records the Settings it gets."""
    calls: list[Settings] = []

    def run(settings: Settings, reload: Callable[[], Settings] | None = None,
            config_file: str = "") -> int:
        calls.append(settings)
        if reload is not None:
            reloads.append(reload)
        return 0

    monkeypatch.setitem(sys.modules, "tooti.runner", types.SimpleNamespace(run=run))
    return calls


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tooti.toml"
    path.write_text(text)
    return path


# -- config check ----------------------------------------------------------


def test_config_check_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path,
        'roles = ["gateway", "node"]\n[gateway]\nlisten = "0.0.0.0:8080"\n'
        f'join_token = "{SECRETS[0]}"\nadmin_key = "{SECRETS[1]}"\n'
        '[node]\npeers = ["ws://a:1", "ws://b:2"]\n'
        f'[[node.backends]]\ntype = "openai"\nurl = "http://h/v1"\napi_key = "{SECRETS[2]}"\n',
    )
    assert main(["config", "check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"{path}: ok",
        "  roles: gateway, node",
        "  listen: 0.0.0.0:8080",
        "  backends: 1 (openai)",
        "  peers: 2",
    ]
    assert err == ""
    assert not any(secret in out for secret in SECRETS)


@pytest.mark.parametrize(("text", "line"), [
    ("", "  backends: default (llamacpp)"),  # a node with none runs the embedded model
    ('roles = ["node"]\n', "  backends: default (llamacpp)"),
    ('roles = ["gateway"]\n', "  backends: none (no node role)"),
    ('[[node.backends]]\ntype = "simulated"\n[[node.backends]]\ntype = "openai"\n'
     'url = "http://h/v1"\n', "  backends: 2 (simulated, openai)"),
])
def test_config_check_names_the_backends_a_node_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, line: str) -> None:
    assert main(["config", "check", str(write(tmp_path, text))]) == 0
    assert line in capsys.readouterr().out.splitlines()


def test_config_check_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(EXAMPLE)]) == 0
    assert capsys.readouterr().out.startswith(f"{EXAMPLE}: ok\n")


def test_config_check_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, '[gateway]\nlisten = "127.0.0.1:1"\nmax_body_bytes = "big"\n')
    assert main(["config", "check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f'tooti: error: {path}:3: gateway.max_body_bytes: expected integer, got string "big"\n'
    )


def test_config_check_syntax_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "[gateway\n")
    assert main(["config", "check", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"tooti: error: {path}:1: invalid TOML")


def test_config_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err
    assert "cannot read config file" in err and "Traceback" not in err


def test_config_check_does_not_echo_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "[gateway]\nadmin_key = 987654321\n")
    assert main(["config", "check", str(path)]) == 2
    assert "987654321" not in capsys.readouterr().err


def test_python_m_tooti_config_check() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tooti", "config", "check", str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{EXAMPLE}: ok")


# -- run -------------------------------------------------------------------


def test_run_passes_settings_to_runner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runner: list[Settings]
) -> None:
    path = write(tmp_path, 'data_dir = "/file"\n[gateway]\nmax_attempts = 5\n')
    monkeypatch.setenv("TOOTI_LISTEN", "127.0.0.1:9999")
    monkeypatch.setenv("TOOTI_LOG_LEVEL", "debug")
    argv = [
        "run", "--config", str(path), "--role", "gateway", "--role", "node",
        "--peer", "ws://gw:8080", "--backend", "openai=http://127.0.0.1:8000/v1",
        "--backend", "simulated", "--join-token", "t", "--admin-key", "k",
        "--node-id", "n1", "--log-level", "warning", "--drain-grace", "3",
    ]  # fmt: skip
    assert main(argv) == 0
    (s,) = runner
    assert s.roles == ["gateway", "node"]
    assert s.data_dir == "/file" and s.gateway.max_attempts == 5
    assert s.gateway.listen == "127.0.0.1:9999"
    assert s.log_level == "warning"
    assert s.node.peers == ["ws://gw:8080/tooti/v1/tunnel"]
    assert s.node.backends == [
        BackendSettings(type="openai", url="http://127.0.0.1:8000/v1"),
        BackendSettings(type="simulated"),
    ]
    assert (s.gateway.join_token, s.node.join_token, s.gateway.admin_key) == ("t", "t", "k")
    assert (s.node.id, s.drain_grace) == ("n1", 3.0)


def test_run_reloads_settings_the_way_it_built_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runner: list[Settings],
    reloads: list[Callable[[], Settings]],
) -> None:
    """What SIGHUP reads: the same file again, the same environment and flags."""
    path = write(tmp_path, '[gateway]\nmax_attempts = 5\n[gateway.join_tokens]\nold = "o"\n')
    monkeypatch.setenv("TOOTI_LISTEN", "127.0.0.1:9999")
    assert main(["run", "--config", str(path), "--role", "gateway", "--admin-key", "k"]) == 0
    write(tmp_path, '[gateway]\nmax_attempts = 6\n[gateway.join_tokens]\nnew = "n"\n')
    (reload,) = reloads
    s = reload()
    assert s.gateway.join_tokens == {"new": "n"} and s.gateway.max_attempts == 6
    assert (s.roles, s.gateway.listen, s.gateway.admin_key) == (
        ["gateway"], "127.0.0.1:9999", "k")
    write(tmp_path, "[gateway\n")
    with pytest.raises(ConfigError):
        reload()


def test_run_returns_runner_exit_code(monkeypatch: pytest.MonkeyPatch,
                                      tmp_path: Path) -> None:
    files: list[str] = []
    fake = types.SimpleNamespace(
        run=lambda settings, reload=None, config_file="": files.append(config_file) or 3)
    monkeypatch.setitem(sys.modules, "tooti.runner", fake)
    monkeypatch.delenv("TOOTI_CONFIG", raising=False)
    assert main(["run"]) == 3
    monkeypatch.setenv("TOOTI_CONFIG", str(write(tmp_path, "")))
    assert main(["run"]) == 3
    assert files == ["", str(tmp_path / "tooti.toml")]  # SIGHUP says if it reads a file


def test_run_bad_flag(runner: list[Settings], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", "--join-token", SECRETS[0], "--admin-key", SECRETS[1], "--listen", "nope"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith("tooti: error: --listen: invalid listen address 'nope'")
    assert runner == []
    assert not any(secret in out + err for secret in SECRETS)


def test_run_bad_env(
    monkeypatch: pytest.MonkeyPatch, runner: list[Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TOOTI_PEER", "http://gw:8080")
    assert main(["run"]) == 2
    assert capsys.readouterr().err.startswith("tooti: error: TOOTI_PEER: peer URL")
    assert runner == []


def test_run_bad_config_file(
    tmp_path: Path, runner: list[Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "\n\ngatewy = 1\n")
    assert main(["run", "--config", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"tooti: error: {path}:3: unknown key 'gatewy'")


def test_run_runner_config_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(settings: Settings, reload: Callable[[], Settings] | None = None,
            config_file: str = "") -> int:
        raise ConfigError("unknown backend type 'nope'", key="node.backends[0].type")

    monkeypatch.setitem(sys.modules, "tooti.runner", types.SimpleNamespace(run=run))
    assert main(["run", "--backend", "nope"]) == 2
    assert capsys.readouterr().err == (
        "tooti: error: node.backends[0].type: unknown backend type 'nope'\n"
    )


# -- misc ------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"tooti {tooti.__version__}\n"


def test_usage_errors_return_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["config"]) == 2
    assert main(["run", "--bogus"]) == 2
    assert "usage: tooti" in capsys.readouterr().err


# -- help ------------------------------------------------------------------


def _commands(parser: argparse.ArgumentParser,
              path: tuple[str, ...] = ()) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every (sub)command of ``parser`` with its path, nested ones included."""
    found = [(" ".join(("tooti", *path)), parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, (*path, name))
    return found


def test_every_command_describes_itself() -> None:
    commands = _commands(_parser())
    assert len(commands) > 40  # nested ones (config check, keys create, ...) included
    missing = [name for name, parser in commands if not (parser.description or "").strip()]
    assert missing == []


@pytest.mark.parametrize("command", ["peers", "tui"])
def test_peers_and_tui_take_gateway_and_url_alike(command: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``tooti peers --url`` and ``tooti tui --gateway`` were each other's spelling: both
    commands take both (``--gateway`` as the accounts commands, ``--url`` kept)."""
    for flag in ("--gateway", "--url"):
        args = _parser().parse_args([command, flag, "http://gw.example:8080"])
        assert args.gateway == "http://gw.example:8080"
    assert main([command, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--gateway URL, --url URL" in out and " ".join(GATEWAY_HELP.split()) in out


def test_usage_columns_fit_the_widest_value() -> None:
    node = "tooti-" + "a" * 26  # a derived node id, 32 characters
    lines = usage_table("node", [(node, "3", "120", "48", "0.0012", "0"),
                                 ("my-node", "12", "7", "1000000", "0", "0")])
    assert lines == [
        f"  node{' ' * 28}  requests  prompt  completion    cost  charged",
        f"  {node}         3     120          48  0.0012        0",
        f"  my-node{' ' * 25}        12       7     1000000       0        0"]
    assert len({len(line) for line in lines}) == 1  # every row as wide: nothing shifted


@pytest.mark.parametrize(("argv", "says"), [
    (["usage", "--help"], "Summarize the usage ledger"),
    (["config", "check", "--help"], "Validate a TOML config file"),
    (["config", "--help"], "config files"),
])
def test_help_describes_the_command(argv: list[str], says: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the description
    head, _, _ = out.partition("options:")
    assert says in head
