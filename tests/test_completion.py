"""``tooti completion SHELL`` (tooti.cli_completion): scripts generated from the parser.

bash is exercised for real: the script ``python -m tooti completion bash`` prints is
sourced in a ``bash`` and its completion function run with ``COMP_WORDS`` /
``COMP_CWORD`` set, as bash does on TAB. zsh and fish are syntax-checked (``zsh -n``,
``fish -n``) and, where installed, driven too (fish through ``complete -C``; zsh with
its completion builtins replaced by functions that print what they are given); where
they are not installed those tests skip, saying so.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tooti.cli import _parser, main
from tooti.cli_completion import SHELLS, command_tree, register, script

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX shells")


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


def _by_choices() -> list[str]:
    return list(_option(_subparsers(_parser()).choices["usage"], "--by").choices or ())


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each shell's script as the command prints it (``python -m tooti``), in a file."""
    root = tmp_path_factory.mktemp("completion")
    files: dict[str, Path] = {}
    for shell in SHELLS:
        out = subprocess.run([sys.executable, "-m", "tooti", "completion", shell],
                             capture_output=True, text=True, check=True, timeout=60).stdout
        files[shell] = root / f"tooti.{shell}"
        files[shell].write_text(out)
    return files


# ------------------------------------------------------------ bash, for real

def complete_bash(script: Path, words: list[str], cwd: Path | None = None) -> list[str]:
    """What ``_tooti`` offers for the command line ``words`` (the last is the word under
    the cursor), run in a real bash."""
    assert shutil.which("bash"), "bash is needed for these tests"
    program = (f"source {shlex.quote(str(script))}\n"
               f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})\n"
               f"COMP_CWORD={len(words) - 1}\n"
               "_tooti\n"
               "printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", program],
                          capture_output=True, text=True, timeout=30, cwd=cwd)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return [line for line in done.stdout.splitlines() if line]


def test_bash_completes_subcommands(scripts: dict[str, Path]) -> None:
    assert complete_bash(scripts["bash"], ["tooti", "r"]) == ["run"]
    everything = complete_bash(scripts["bash"], ["tooti", ""])
    assert everything == list(_subparsers(_parser()).choices)  # every one, from the parser
    assert {"run", "usage", "config", "accounts", "completion"} <= set(everything)


def test_bash_completes_nested_subcommands(scripts: dict[str, Path]) -> None:
    assert complete_bash(scripts["bash"], ["tooti", "config", ""]) == ["check"]
    assert complete_bash(scripts["bash"], ["tooti", "accounts", "s"]) == [
        "show", "suspend", "set-password"]
    # earnings takes flags and an optional subcommand: a flag's value is skipped
    assert complete_bash(scripts["bash"], ["tooti", "earnings", "--since", "3", "p"]) == [
        "payout"]


def test_bash_completes_each_subcommands_own_flags(scripts: dict[str, Path]) -> None:
    assert complete_bash(scripts["bash"], ["tooti", "run", "--ro"]) == ["--role"]
    run = _subparsers(_parser()).choices["run"]
    flags = [f for a in run._actions for f in a.option_strings if f.startswith("--")]
    assert complete_bash(scripts["bash"], ["tooti", "run", "--"]) == flags
    # `--role` belongs to run (and accounts create), not to usage
    assert complete_bash(scripts["bash"], ["tooti", "usage", "--ro"]) == []
    assert complete_bash(scripts["bash"], ["tooti", "keys", "create", "--exp"]) == [
        "--expires-in"]


def test_bash_completes_choices(scripts: dict[str, Path]) -> None:
    by = _by_choices()
    assert by and complete_bash(scripts["bash"], ["tooti", "usage", "--by", ""]) == by
    assert complete_bash(scripts["bash"], ["tooti", "usage", "--by", "mo"]) == ["model"]
    # bash splits --by=mo at the '=' (COMP_WORDBREAKS)
    assert complete_bash(scripts["bash"], ["tooti", "usage", "--by", "=", "mo"]) == ["model"]
    assert complete_bash(scripts["bash"], ["tooti", "usage", "--by", "="]) == by
    assert complete_bash(scripts["bash"], ["tooti", "run", "--auth", ""]) == ["keys", "open"]
    # flags checked by tooti.config, not by argparse's choices (--role gateway,node and
    # --log-level DEBUG stay accepted), offer their words all the same
    assert complete_bash(scripts["bash"], ["tooti", "run", "--role", ""]) == [
        "gateway", "node", "relay"]
    assert complete_bash(scripts["bash"], ["tooti", "run", "--role", "r"]) == ["relay"]
    assert complete_bash(scripts["bash"], ["tooti", "run", "--log-level", ""]) == [
        "debug", "info", "warning", "error"]
    assert complete_bash(scripts["bash"], ["tooti", "run", "--log-format", ""]) == [
        "text", "json"]
    assert _parser().parse_args(["run", "--role", "gateway,node", "--log-level",
                                 "DEBUG"]).role == ["gateway,node"]
    assert complete_bash(scripts["bash"], ["tooti", "completion", ""]) == list(SHELLS)
    # a value that is not completed offers nothing, not the flags
    assert complete_bash(scripts["bash"], ["tooti", "run", "--listen", ""]) == []


def test_bash_completes_files_and_directories(scripts: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "tooti.toml").write_text("")
    (tmp_path / "tooti-data").mkdir()
    bash = scripts["bash"]
    assert sorted(complete_bash(bash, ["tooti", "config", "check", "too"], cwd=tmp_path)) == [
        "tooti-data", "tooti.toml"]
    assert complete_bash(bash, ["tooti", "run", "--config", "tooti."], cwd=tmp_path) == [
        "tooti.toml"]
    assert complete_bash(bash, ["tooti", "run", "--data-dir", "too"], cwd=tmp_path) == [
        "tooti-data"]
    (tmp_path / "my data*").mkdir()  # a space and a glob character stay as they are
    (tmp_path / "my-data").mkdir()
    assert sorted(complete_bash(bash, ["tooti", "run", "--data-dir", "my"], cwd=tmp_path)) == [
        "my data*", "my-data"]


# ------------------------------------------------------------ zsh and fish

def _shell(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed here: its script is checked only by the tests "
                    "of the generator (bash is run for real)")
    return found


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_script_is_valid_syntax(shell: str, scripts: dict[str, Path]) -> None:
    binary = _shell(shell)
    done = subprocess.run([binary, "-n", str(scripts[shell])], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_zsh_walks_the_command_line(scripts: dict[str, Path]) -> None:
    """The zsh script's walker, with compsys's builtins replaced by printing functions."""
    binary = _shell("zsh")
    stubs = (
        "compdef() { :; }\n"
        f"source {shlex.quote(str(scripts['zsh']))}\n"
        "_describe() { [[ $1 == -t ]] && shift 2; shift; local e\n"
        "  for e in \"${(@P)1}\"; do print -r -- \"${e%%:*}\"; done }\n"
        "compadd() { [[ $1 == -a ]] && print -rl -- \"${(@P)2}\" }\n"
        "_files() { print -r -- \"FILES $*\" }\n"
        "compset() { : }\n"
        "comp() { words=(\"$@\"); CURRENT=${#words}; _tooti; print -r -- '--' }\n"
        "comp tooti ''\ncomp tooti config ''\ncomp tooti usage --by ''\n"
        "comp tooti config check ''\ncomp tooti run --data-dir ''\n"
    )
    done = subprocess.run([binary, "-f", "-c", stubs], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    root, config, by, check, data_dir, _ = done.stdout.split("--\n")
    assert root.split() == list(_subparsers(_parser()).choices)
    assert config.split() == ["check"]
    assert by.split() == _by_choices()
    assert check.strip() == "FILES"
    assert data_dir.strip() == "FILES -/"


def test_fish_completes(scripts: dict[str, Path]) -> None:
    binary = _shell("fish")
    program = (f"source {shlex.quote(str(scripts['fish']))}\n"
               "for line in 'tooti r' 'tooti run --ro' 'tooti usage --by ' 'tooti config '\n"
               "    complete -C$line | string replace -r '\\t.*' ''\n"
               "    echo ==\n"
               "end\n")
    done = subprocess.run([binary, "--no-config", "-c", program], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    run, role, by, config, _ = done.stdout.split("==\n")
    assert run.split() == ["run"]
    assert role.split() == ["--role"]
    assert sorted(by.split()) == sorted(_by_choices())
    assert config.split() == ["check"]


# ------------------------------------------------------------ the command

def test_unknown_shell_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "tcsh"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'tcsh'" in err
    assert "'bash', 'zsh', 'fish'" in err
    with pytest.raises(ValueError, match="tcsh"):
        script("tcsh", _parser())


def test_scripts_follow_the_parser() -> None:
    """A command, flag or choice added to the parser is in every script at once."""
    parser = argparse.ArgumentParser(prog="tooti")
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="serve it")
    serve.add_argument("--colour", choices=("red", "green"))
    serve.add_argument("--quiet", action="store_true")
    serve.add_argument("--secret", help=argparse.SUPPRESS)
    serve.add_argument("--state-dir", metavar="DIR")
    tree = command_tree(parser)
    assert list(tree.commands) == ["serve"]
    options = {f: o for o in tree.commands["serve"].options for f in o.flags}
    assert "--secret" not in options  # hidden from --help, hidden here
    assert options["--quiet"].value is None
    assert options["--colour"].value is not None
    assert options["--colour"].value.code() == "choices red green"
    assert options["--state-dir"].value is not None
    assert options["--state-dir"].value.kind == "dir"
    for shell in SHELLS:
        text = script(shell, parser)
        assert "serve" in text and "red green" in text and "state-dir" in text
        assert "secret" not in text


def test_completion_has_its_own_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "--help"]) == 0
    out = capsys.readouterr().out
    assert "source <(tooti completion bash)" in out
    assert "{bash,zsh,fish}" not in out  # the metavar, SHELL, not the choices


def test_operations_doc_loads_the_scripts_as_the_help_says(
        capsys: pytest.CaptureFixture[str]) -> None:
    """docs/operations.md gives, for each shell, the same line to load the script, in the
    same file, as ``tooti completion --help``."""
    assert main(["completion", "--help"]) == 0
    helped = dict((m[1], (m[2], m[3].split(",")[0])) for m in re.finditer(
        r"^  (\w+) +(\S.*?)  +in (\S.*)$", capsys.readouterr().out, re.MULTILINE))
    assert set(helped) == set(SHELLS)
    doc = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    rows = {m[1]: (m[2].replace("\\|", "|"), m[3]) for m in re.finditer(
        r"^\| (\w+) \| `(.+?)` \| `([^`]+)`", doc, re.MULTILINE)}
    assert rows == helped


def test_register_without_the_root_parser(capsys: pytest.CaptureFixture[str]) -> None:
    """``register(commands)`` alone (as cli_accounts is hooked): the script describes the
    subcommands under a bare ``tooti``."""
    parser = argparse.ArgumentParser(prog="tooti")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve").add_argument("--colour", choices=("red", "green"))
    register(commands)
    args = parser.parse_args(["completion", "bash"])
    assert args.handler(args) == 0
    text = capsys.readouterr().out
    assert "'') echo 'serve completion' ;;" in text
    assert "'serve --colour') echo 'choices red green' ;;" in text
