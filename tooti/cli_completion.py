"""``tooti completion SHELL``: a completion script for bash, zsh or fish, generated from
``tooti``'s own argparse parser each time it is printed, so it never drifts from the
command line.

What it completes, at every level of nesting (``tooti config check``, ``tooti keys
create``, ``tooti earnings payout``): the subcommands (with their help as descriptions
in zsh and fish), each subcommand's own flags, the values of a flag or positional that
has ``choices`` (``tooti usage --by <TAB>``, ``tooti completion <TAB>``) or words given by
:func:`offer` (``tooti run --role <TAB>``), file names for
a ``FILE`` metavar and directory names for ``DIR``. Other values (``HOST:PORT``, a key)
are not guessed. Options hidden from ``--help`` are not offered. ``--flag=value`` works
as well as ``--flag value``.

The three scripts share one shape: tables generated from the parser (the subcommands of
a path, its flags, what kind of value a flag or the N-th positional takes) and a small
walker that reads the words before the cursor (skipping flag values, descending into
subcommands, counting positionals) to know where the cursor is. Loading them::

    source <(tooti completion bash)      # ~/.bashrc
    source <(tooti completion zsh)       # ~/.zshrc, after compinit (or save as _tooti on $fpath)
    tooti completion fish | source       # or save as ~/.config/fish/completions/tooti.fish

:func:`register` adds the command to ``tooti``'s parser (:mod:`tooti.cli`); :func:`script`
builds a script from any parser (the tests use it).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

SHELLS = ("bash", "zsh", "fish")
"""The shells ``tooti completion`` writes a script for."""

_SAFE_WORD = re.compile(r"[A-Za-z0-9_.,:+=@%/-]+")
"""A command name, flag or choice the scripts can hold without quoting."""


# ------------------------------------------------------------ the parser, as data

@dataclass(frozen=True)
class Value:
    """What a flag or a positional takes: ``commands`` (a subcommand of the path),
    ``choices`` (one of :attr:`choices`), ``file``, ``dir`` or ``any`` (not completed)."""

    kind: str
    choices: tuple[str, ...] = ()

    def code(self) -> str:
        """The kind as the scripts' tables hold it: ``choices a b c``, ``file``, ..."""
        return " ".join(("choices", *self.choices)) if self.kind == "choices" else self.kind


@dataclass(frozen=True)
class Option:
    """One flag of a command: its spellings (``-h``, ``--help``), its help and the value
    it takes (``None`` for a flag that takes none)."""

    flags: tuple[str, ...]
    help: str
    value: Value | None


@dataclass
class Command:
    """One command of the tree: the root ``tooti`` (path ``()``) or a subcommand."""

    path: tuple[str, ...]
    help: str = ""
    options: list[Option] = field(default_factory=list)
    positionals: list[Value] = field(default_factory=list)
    commands: dict[str, Command] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The path as the scripts name it: ``""`` for the root, ``config/check``."""
        return "/".join(self.path)

    def walk(self) -> Iterator[Command]:
        """This command and every command below it, depth first."""
        yield self
        for command in self.commands.values():
            yield from command.walk()


def _one_line(text: str | None) -> str:
    """A help text as one line, without argparse's ``%(default)s`` placeholders."""
    if not text or text == argparse.SUPPRESS:
        return ""
    return " ".join(text.replace("%(default)s", "").replace("%%", "%").split())


_OFFERED = "tooti_completion_choices"
"""The attribute :func:`offer` sets on an argparse action."""


def offer(action: argparse.Action, words: Iterable[str]) -> argparse.Action:
    """Complete ``action``'s value with ``words`` though argparse does not restrict it to
    them (no ``choices``): for a flag whose value is checked elsewhere, in a form
    ``choices`` would refuse (``--role gateway,node``, ``--log-level DEBUG``). Returns
    ``action``."""
    setattr(action, _OFFERED, tuple(words))
    return action


def _value_of(action: argparse.Action) -> Value:
    choices = action.choices if action.choices is not None else getattr(action, _OFFERED, None)
    if choices is not None and not isinstance(action, argparse._SubParsersAction):
        words = tuple(str(choice) for choice in choices)
        return Value("choices", tuple(w for w in words if _SAFE_WORD.fullmatch(w)))
    metavar = action.metavar if isinstance(action.metavar, str) else ""
    if isinstance(action.type, argparse.FileType) or metavar.upper().endswith("FILE"):
        return Value("file")
    if metavar.upper().endswith("DIR"):
        return Value("dir")
    return Value("any")


def command_tree(parser: argparse.ArgumentParser, path: tuple[str, ...] = (),
                 help: str = "") -> Command:
    """The commands, flags and positionals of ``parser`` and of its subparsers."""
    command = Command(path, _one_line(help or parser.description))
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: _one_line(a.help) for a in action._choices_actions}
            for name, sub in action.choices.items():
                if _SAFE_WORD.fullmatch(name):
                    command.commands[name] = command_tree(sub, (*path, name),
                                                          helps.get(name, ""))
            command.positionals.append(Value("commands"))
        elif action.option_strings:
            if action.help == argparse.SUPPRESS:
                continue
            flags = tuple(f for f in action.option_strings if _SAFE_WORD.fullmatch(f))
            value = None if action.nargs == 0 else _value_of(action)
            command.options.append(Option(flags, _one_line(action.help), value))
        elif action.help != argparse.SUPPRESS:
            command.positionals.append(_value_of(action))
    return command


# ------------------------------------------------------------ quoting

def _sh(text: str) -> str:
    """``text`` single-quoted for bash and zsh."""
    return "'" + text.replace("'", "'\\''") + "'"


def _fish(text: str) -> str:
    """``text`` single-quoted for fish."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# ------------------------------------------------------------ tables (bash and zsh)

def _case(function: str, subject: str, rows: list[tuple[str, str]], comment: str) -> list[str]:
    """A shell function printing the value of the row whose key matches ``subject``."""
    lines = [f"# {comment}", f"{function}() {{", f'    case "{subject}" in']
    lines += [f"        {_sh(key)}) echo {_sh(value)} ;;" for key, value in rows]
    return [*lines, "    esac", "}", ""]


def _described(function: str, rows: list[tuple[str, list[tuple[str, str]]]],
               comment: str) -> list[str]:
    """A shell function printing ``name:description`` lines for a path (zsh)."""
    lines = [f"# {comment}", f"{function}() {{", '    case "$1" in']
    for key, entries in rows:
        if entries:
            body = " ".join(_sh(f"{name}:{help}" if help else name) for name, help in entries)
            lines.append(f"        {_sh(key)}) printf '%s\\n' {body} ;;")
    return [*lines, "    esac", "}", ""]


def _tables(root: Command, prefix: str) -> list[str]:
    commands = [(c.key, " ".join(c.commands)) for c in root.walk() if c.commands]
    options = [(c.key, " ".join(f for o in c.options for f in o.flags)) for c in root.walk()]
    values = [(f"{c.key} {flag}", o.value.code()) for c in root.walk() for o in c.options
              if o.value is not None for flag in o.flags]
    positionals = [(f"{c.key} {i}", v.code()) for c in root.walk()
                   for i, v in enumerate(c.positionals)]
    return [
        *_case(f"{prefix}_commands", "$1", commands, "The subcommands of a path."),
        *_case(f"{prefix}_options", "$1", options, "The flags of a path."),
        *_case(f"{prefix}_value", "$1 $2", values, "What a path's flag takes: commands, "
               "'choices V...', file, dir or any; nothing for a flag that takes no value."),
        *_case(f"{prefix}_positional", "$1 $2", positionals,
               "What the path's N-th positional takes (the same kinds)."),
    ]


# ------------------------------------------------------------ bash

_BASH_MAIN = r"""# Completes the values of one kind ($1) for the word $2 at the path $3.
_tooti_reply() {
    case $1 in
        commands) COMPREPLY=($(compgen -W "$(_tooti_commands "$3")" -- "$2")) ;;
        choices\ *) COMPREPLY=($(compgen -W "${1#choices }" -- "$2")) ;;
        file|dir)
            local name flag=-f
            [ "$1" = dir ] && flag=-d
            while IFS= read -r name; do
                COMPREPLY+=("$name")
            done < <(compgen "$flag" -- "$2")
            compopt -o filenames 2>/dev/null ;;
    esac
}

_tooti() {
    local cur word path='' npos=0 i=1 kind option=''
    COMPREPLY=()
    cur=${COMP_WORDS[COMP_CWORD]}
    # The words before the cursor: skip flag values (bash splits --flag=value at the '='),
    # descend into subcommands, count positionals.
    while [ "$i" -lt "$COMP_CWORD" ]; do
        word=${COMP_WORDS[i]}
        case $word in
            -*)
                if [ -n "$(_tooti_value "$path" "$word")" ]; then
                    i=$((i + 1))
                    [ "${COMP_WORDS[i]}" = = ] && i=$((i + 1))
                fi ;;
            *)
                kind=$(_tooti_positional "$path" "$npos")
                if [ "$kind" = commands ] &&
                    [[ " $(_tooti_commands "$path") " == *" $word "* ]]; then
                    path=${path:+$path/}$word
                    npos=0
                else
                    npos=$((npos + 1))
                fi ;;
        esac
        i=$((i + 1))
    done
    if [ "$cur" = = ]; then
        option=${COMP_WORDS[COMP_CWORD-1]}
        cur=''
    elif [ "$COMP_CWORD" -ge 2 ] && [ "${COMP_WORDS[COMP_CWORD-1]}" = = ]; then
        option=${COMP_WORDS[COMP_CWORD-2]}
    elif [ "$COMP_CWORD" -ge 1 ]; then
        option=${COMP_WORDS[COMP_CWORD-1]}
    fi
    case $option in
        -*)
            kind=$(_tooti_value "$path" "$option")
            if [ -n "$kind" ]; then
                _tooti_reply "$kind" "$cur" "$path"
                return 0
            fi ;;
    esac
    kind=$(_tooti_positional "$path" "$npos")
    if [ -z "$kind" ] || [ "${cur#-}" != "$cur" ]; then
        COMPREPLY=($(compgen -W "$(_tooti_options "$path")" -- "$cur"))
    else
        _tooti_reply "$kind" "$cur" "$path"
    fi
    return 0
}

complete -F _tooti tooti
"""


def bash_script(root: Command) -> str:
    """The bash completion script for the command tree ``root``."""
    head = ["# bash completion for tooti, generated from its command line by "
            "`tooti completion bash`.", "# Load it with: source <(tooti completion bash)", ""]
    return "\n".join([*head, *_tables(root, "_tooti"), _BASH_MAIN])


# ------------------------------------------------------------ zsh

_ZSH_MAIN = r"""# Completes the values of one kind ($1) at the path $2.
_tooti_reply() {
    local -a entries
    case $1 in
        commands)
            entries=(${(f)"$(_tooti_commands_described "$2")"})
            _describe -t commands 'tooti command' entries ;;
        choices\ *)
            entries=(${=${1#choices }})
            compadd -a entries ;;
        file) _files ;;
        dir) _files -/ ;;
        *) return 1 ;;
    esac
}

_tooti() {
    local word path_='' npos=0 i=2 kind option='' cur=${words[CURRENT]}
    local -a entries
    # The words before the cursor: skip flag values, descend into subcommands, count
    # positionals ($words[1] is tooti).
    while (( i < CURRENT )); do
        word=${words[i]}
        case $word in
            --*=*) ;;
            -*)
                [[ -n $(_tooti_value "$path_" "$word") ]] && (( i++ )) ;;
            *)
                kind=$(_tooti_positional "$path_" $npos)
                if [[ $kind == commands && " $(_tooti_commands "$path_") " == *" $word "* ]]; then
                    path_=${path_:+$path_/}$word
                    npos=0
                else
                    (( npos++ ))
                fi ;;
        esac
        (( i++ ))
    done
    if [[ $cur == --*=* ]]; then
        option=${cur%%=*}
        compset -P '*='
    elif (( CURRENT > 2 )); then
        option=${words[CURRENT-1]}
    fi
    if [[ $option == -* ]]; then
        kind=$(_tooti_value "$path_" "$option")
        if [[ -n $kind ]]; then
            _tooti_reply "$kind" "$path_"
            return
        fi
    fi
    kind=$(_tooti_positional "$path_" $npos)
    if [[ -z $kind || $cur == -* ]]; then
        entries=(${(f)"$(_tooti_options_described "$path_")"})
        _describe -t options 'option' entries
    else
        _tooti_reply "$kind" "$path_"
    fi
}

if [[ $funcstack[1] == _tooti ]]; then
    _tooti "$@"
else
    compdef _tooti tooti
fi
"""


def zsh_script(root: Command) -> str:
    """The zsh completion script for the command tree ``root``."""
    head = ["#compdef tooti", "# zsh completion for tooti, generated from its command line "
            "by `tooti completion zsh`.", "# Load it with: source <(tooti completion zsh) "
            "(after compinit), or save it as _tooti in a directory on $fpath.", ""]
    commands = [(c.key, [(name, sub.help) for name, sub in c.commands.items()])
                for c in root.walk() if c.commands]
    options = [(c.key, [(flag, o.help) for o in c.options for flag in o.flags])
               for c in root.walk()]
    return "\n".join([
        *head, *_tables(root, "_tooti"),
        *_described("_tooti_commands_described", commands,
                    "The subcommands of a path, as name:description lines."),
        *_described("_tooti_options_described", options,
                    "The flags of a path, as name:description lines."),
        _ZSH_MAIN])


# ------------------------------------------------------------ fish

_FISH_MAIN = r"""# Where the cursor is: "PATH N" (the subcommand path, the positional's index).
function __tooti_state
    set -l path ''
    set -l npos 0
    set -l skip 0
    set -l words (commandline -opc)
    set -e words[1]
    for word in $words
        if test $skip = 1
            set skip 0
            continue
        end
        switch $word
            case '--*=*'
            case '-*'
                set -l kind (__tooti_value "$path" $word)
                test -n "$kind"; and set skip 1
            case '*'
                set -l kind (__tooti_positional "$path" $npos)
                if test "$kind" = commands; and contains -- $word (__tooti_commands "$path")
                    if test -z "$path"
                        set path $word
                    else
                        set path "$path/$word"
                    end
                    set npos 0
                else
                    set npos (math $npos + 1)
                end
        end
    end
    echo "$path $npos"
end

# True at the path $argv[1] (and, given, at its positional $argv[2]).
function __tooti_at
    set -l state (__tooti_state)
    set -l here (string split -r -m1 ' ' -- "$state")
    test "$here[1]" = "$argv[1]"; or return 1
    test (count $argv) -lt 2; or test "$here[2]" = "$argv[2]"
end
"""


def _fish_switch(function: str, subject: str, rows: list[tuple[str, str]],
                 comment: str) -> list[str]:
    lines = [f"# {comment}", f"function {function}", f'    switch "{subject}"']
    for key, value in rows:
        lines += [f"        case {_fish(key)}", f"            printf '%s\\n' {value}"]
    return [*lines, "    end", "end", ""]


def _fish_value_flags(value: Value) -> str:
    if value.kind == "choices":
        return "-x -a " + _fish(" ".join(value.choices))
    if value.kind == "file":
        return "-r -F"
    if value.kind == "dir":
        return "-x -a '(__fish_complete_directories)'"
    return "-x"


def _fish_positional(condition: str, value: Value, command: Command) -> list[str]:
    if value.kind == "commands":
        return [f"complete -c tooti -f -n {condition} -a {_fish(name)}"
                + (f" -d {_fish(sub.help)}" if sub.help else "")
                for name, sub in command.commands.items()]
    if value.kind == "choices":
        return [f"complete -c tooti -f -n {condition} -a {_fish(' '.join(value.choices))}"]
    if value.kind == "file":
        return [f"complete -c tooti -F -n {condition}"]
    if value.kind == "dir":
        return [f"complete -c tooti -f -n {condition} -a '(__fish_complete_directories)'"]
    return []


def fish_script(root: Command) -> str:
    """The fish completion script for the command tree ``root``."""
    commands = [(c.key, " ".join(_fish(n) for n in c.commands)) for c in root.walk()
                if c.commands]
    values = [(f"{c.key} {flag}", _fish(o.value.code())) for c in root.walk()
              for o in c.options if o.value is not None for flag in o.flags]
    positionals = [(f"{c.key} {i}", _fish(v.code())) for c in root.walk()
                   for i, v in enumerate(c.positionals)]
    lines = ["# fish completion for tooti, generated from its command line by "
             "`tooti completion fish`.", "# Load it with: tooti completion fish | source "
             "(or save it as ~/.config/fish/completions/tooti.fish)", "",
             *_fish_switch("__tooti_commands", "$argv[1]", commands,
                           "The subcommands of a path."),
             *_fish_switch("__tooti_value", "$argv[1] $argv[2]", values,
                           "What a path's flag takes (nothing for a flag without value)."),
             *_fish_switch("__tooti_positional", "$argv[1] $argv[2]", positionals,
                           "What the path's N-th positional takes."),
             _FISH_MAIN, "complete -c tooti -f"]
    for command in root.walk():
        at = _fish(f"__tooti_at {_fish(command.key)}")
        for index, value in enumerate(command.positionals):
            lines += _fish_positional(_fish(f"__tooti_at {_fish(command.key)} {index}"),
                                      value, command)
        for option in command.options:
            spell = []
            for flag in option.flags:
                if flag.startswith("--"):
                    spell.append(f"-l {flag[2:]}")
                elif len(flag) == 2:
                    spell.append(f"-s {flag[1]}")
                else:
                    spell.append(f"-o {flag[1:]}")
            if not spell:
                continue
            extra = "" if option.value is None else " " + _fish_value_flags(option.value)
            help = f" -d {_fish(option.help)}" if option.help else ""
            lines.append(f"complete -c tooti -n {at} {' '.join(spell)}{extra}{help}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------ the command

_SCRIPTS: dict[str, Callable[[Command], str]] = {
    "bash": bash_script, "zsh": zsh_script, "fish": fish_script,
}


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    """The completion script for ``shell`` (one of :data:`SHELLS`) of ``parser``.

    Raises :class:`ValueError` for another shell."""
    if shell not in _SCRIPTS:
        raise ValueError(f"no completion for shell {shell!r} (expected one of "
                         f"{', '.join(SHELLS)})")
    return _SCRIPTS[shell](command_tree(parser))


def register(commands: Any, root: argparse.ArgumentParser | None = None) -> None:
    """Add ``tooti completion SHELL`` to ``tooti``'s subcommands (an argparse subparsers
    action). ``root`` is the parser the script describes (``tooti``'s own); without it,
    the subcommands of ``commands`` under a bare ``tooti`` with ``--help``."""
    parser = commands.add_parser(
        "completion", help="print a shell completion script (bash, zsh or fish)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print a completion script for SHELL, generated from this command line\n"
        "(subcommands, flags, their choices, file and directory names). Load it:\n\n"
        "  bash  source <(tooti completion bash)     in ~/.bashrc\n"
        "  zsh   source <(tooti completion zsh)      in ~/.zshrc, after compinit\n"
        "  fish  tooti completion fish | source      in ~/.config/fish/config.fish\n\n"
        "Where tooti is not on PATH (a virtualenv not activated), write its full path\n"
        "instead, e.g. source <(/path/to/tooti/.venv/bin/tooti completion bash). The\n"
        "script completes the command named tooti: typed as tooti, or in bash as a\n"
        "path ending in /tooti (bash falls back to the name after the last slash).",
    )
    parser.add_argument("shell", metavar="SHELL", choices=SHELLS,
                        help="bash, zsh or fish")

    def handler(args: argparse.Namespace) -> int:
        described = root
        if described is None:
            described = argparse.ArgumentParser(prog="tooti")
            described._actions.append(commands)
        sys.stdout.write(script(args.shell, described))
        return 0

    parser.set_defaults(handler=handler)
