"""Where keys are defined in TOML source text.

``tomllib`` reports no positions for the keys it parses, so :func:`locate_keys` scans
the text for table headers and ``key =`` lines; :mod:`tooti.config` uses it to put
the line number into an error about a key.
"""

from __future__ import annotations

import re

Path = tuple[str | int, ...]
"""A key path into the TOML document: table keys, and indexes into arrays."""

_KEY_PART = re.compile(r"""\s*(?:([A-Za-z0-9_-]+)|"((?:[^"\\]|\\.)*)"|'([^']*)')\s*""")


def line_of(lines: dict[Path, int], path: Path) -> int | None:
    """The line of ``path``, else of its nearest located ancestor."""
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def locate_keys(text: str) -> dict[Path, int]:
    """Map key paths to the (1-based) line where they are defined.

    Understands ``[a.b]`` and ``[[a.b]]`` headers (the n-th ``[[a.b]]`` is
    element n-1), ``key =`` and ``a.b =`` lines, and skips multi-line arrays,
    inline tables and strings. Keys inside inline tables map to their line via
    the parent key.
    """
    found: dict[Path, int] = {}
    counts: dict[Path, int] = {}  # array-of-tables path -> elements seen so far
    table: Path = ()
    src = text.splitlines()
    i = 0
    while i < len(src):
        lineno, line = i + 1, src[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            is_array = line.startswith("[[")
            start = 2 if is_array else 1
            end = _find_unquoted(line, "]]" if is_array else "]", start)
            keys = _split_key(line[start:end]) if end >= 0 else None
            if not keys:
                continue
            table = (*_resolve(keys[:-1], counts), keys[-1])
            found.setdefault(table, lineno)
            if is_array:
                index = counts.get(table, 0)
                counts[table] = index + 1
                table = (*table, index)
                found[table] = lineno
            continue
        eq = _find_unquoted(line, "=", 0)
        keys = _split_key(line[:eq]) if eq > 0 else None
        if not keys:
            continue
        path = table + tuple(keys)
        for end in range(len(table) + 1, len(path) + 1):
            found.setdefault(path[:end], lineno)
        i = _skip_value(src, i, line[eq + 1 :])
    return found


def _resolve(keys: list[str], counts: dict[Path, int]) -> Path:
    """Turn header keys into a path, entering the last element of each array of tables."""
    path: Path = ()
    for key in keys:
        path = (*path, key)
        if path in counts:
            path = (*path, counts[path] - 1)
    return path


def _split_key(text: str) -> list[str] | None:
    """Split a (possibly dotted, possibly quoted) TOML key; None if it is not one."""
    keys, pos = [], 0
    while True:
        m = _KEY_PART.match(text, pos)
        if not m or m.end() == pos:
            return None
        bare, basic, literal = m.groups()
        keys.append(bare if bare is not None else basic if basic is not None else literal)
        pos = m.end()
        if pos == len(text):
            return keys
        if text[pos] != ".":
            return None
        pos += 1


def _find_unquoted(line: str, target: str, start: int) -> int:
    """Index of ``target`` in ``line`` outside quoted strings, or -1."""
    quote: str | None = None
    j = start
    while j < len(line):
        c = line[j]
        if quote:
            if c == "\\" and quote == '"':
                j += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif line.startswith(target, j):
            return j
        j += 1
    return -1


def _skip_value(src: list[str], i: int, text: str) -> int:
    """Return the index of the first line after the value starting with ``text``.

    ``i`` indexes the line after the one holding ``text``; arrays, inline
    tables and triple-quoted strings may continue over several lines.
    """
    depth, quote = 0, ""
    while True:
        j = 0
        while j < len(text):
            if quote in ('"""', "'''"):
                if text.startswith(quote, j):
                    quote, j = "", j + 3
                    continue
                j += 2 if quote == '"""' and text[j] == "\\" else 1
                continue
            if quote:
                if text[j] == "\\" and quote == '"':
                    j += 1
                elif text[j] == quote:
                    quote = ""
                j += 1
                continue
            if text.startswith('"""', j) or text.startswith("'''", j):
                quote, j = text[j : j + 3], j + 3
                continue
            c = text[j]
            if c == "#":
                break
            if c in "\"'":
                quote = c
            elif c in "[{":
                depth += 1
            elif c in "]}":
                depth -= 1
            j += 1
        if quote in ('"', "'"):
            quote = ""  # single-line strings cannot span lines
        if (depth <= 0 and not quote) or i >= len(src):
            return i
        text = src[i]
        i += 1
